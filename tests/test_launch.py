"""Servers started by evalpipe (`launch:`): command lines per engine, and the lifecycle with real processes - a
stand-in server (the fake OpenAI server behind a shell script that also leaves a grandchild in its process
group) is started, waited for, and stopped with its whole group on success, failure, Ctrl-C and SIGTERM."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evalpipe.config import LaunchSpec, parse_config
from evalpipe.errors import EndpointError, UserError
from evalpipe.launch import launched_sides, resolve_model, server_command
from orch_helpers import SHARED_DATA, needs_shared_data

# ---------------------------------------------------------------------------------------------------------
# Command construction


def test_evalpipe_recipe_serves_the_side_model_on_loopback() -> None:
    spec = LaunchSpec(engine="evalpipe", model="/m/r1", tp=8, args=["--moe-backend", "cutlass"], python="/py")
    assert server_command(spec, "deepseek-r1", 4321) == [
        "/py", "-m", "evalpipe", "serve", "--model", "/m/r1", "--tp", "8", "--host", "127.0.0.1", "--port", "4321",
        "--served-model-name", "deepseek-r1", "--moe-backend", "cutlass"]
    single = server_command(LaunchSpec(model="/m/demo"), "demo", 1)
    assert "--tp" not in single and single[0] == sys.executable


def test_sglang_recipe() -> None:
    spec = LaunchSpec(engine="sglang", model="/m/r1-w4afp8", tp=8, python="/opt/sglang/bin/python",
                      args=["--reasoning-parser", "deepseek-r1", "--context-length", "36864"])
    assert server_command(spec, "deepseek-r1", 30001) == [
        "/opt/sglang/bin/python", "-m", "sglang.launch_server", "--model-path", "/m/r1-w4afp8", "--tp-size", "8",
        "--host", "127.0.0.1", "--port", "30001", "--served-model-name", "deepseek-r1",
        "--reasoning-parser", "deepseek-r1", "--context-length", "36864"]


def test_vllm_recipe() -> None:
    spec = LaunchSpec(engine="vllm", model="deepseek-ai/DeepSeek-R1", tp=4, python="python3")
    assert server_command(spec, "r1", 8000) == [
        "python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "deepseek-ai/DeepSeek-R1",
        "--tensor-parallel-size", "4", "--host", "127.0.0.1", "--port", "8000", "--served-model-name", "r1"]


def test_demo_model_reference_is_checked() -> None:
    with pytest.raises(UserError, match="names no demo variant"):
        resolve_model("demo:int2")
    assert resolve_model("~/models/x") == os.path.expanduser("~/models/x")


@pytest.mark.parametrize("side, message", [
    ({"label": "a", "model": "m"}, "give base_url"),
    ({"label": "a", "model": "m", "base_url": "http://h/v1", "launch": {"model": "/x"}}, "not both"),
    ({"label": "a", "model": "m", "launch": {"model": "/x", "engine": "trtllm"}}, "candidate.launch.engine"),
    ({"label": "a", "model": "m", "launch": {"model": "/x", "tp": 0}}, "candidate.launch.tp"),
])
def test_side_config_errors_name_the_field(side: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_config({"name": "x", "candidate": side, "tasks": [{"task": "mmlu"}]}, "c.yaml")


# ---------------------------------------------------------------------------------------------------------
# Lifecycle with real processes

SHIM = """#!/usr/bin/env bash
# Stands in for `python -m evalpipe serve ...`: the fake OpenAI server on the given port and model name, plus a
# grandchild in the same process group that only a group-wide stop ends.
while [ $# -gt 0 ]; do
  case "$1" in --port) port="$2"; shift;; --served-model-name) name="$2"; shift;; esac; shift
done
sleep 600 &
echo "$! $$" >> "{pids}"
{behaviour}
exec "{python}" -m evalpipe.testing.fake_server --port "$port" --model "$name" --latency-s "${{FAKE_LATENCY:-0}}"
"""


def make_shim(tmp_path: Path, behaviour: str = "") -> tuple[Path, Path]:
    pids = tmp_path / "pids"
    shim = tmp_path / "fake-python"
    shim.write_text(SHIM.format(pids=pids, python=sys.executable, behaviour=behaviour))
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return shim, pids


def recorded_pids(pids: Path) -> list[int]:
    return [int(p) for p in pids.read_text().split()] if pids.is_file() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    return state != "Z"


def wait_gone(pids: list[int], timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def side(label: str, shim: Path, **launch) -> dict:
    return {"label": label, "model": f"{label}-model",
            "launch": {"model": "/unused", "python": str(shim), "startup_timeout": 30, **launch}}


def lifecycle_config(tmp_path: Path, shim: Path, **launch) -> dict:
    return {"name": "t", "output_dir": str(tmp_path / "runs"), "data_dir": str(SHARED_DATA),
            "candidate": side("cand", shim, **launch), "baseline": side("base", shim, **launch),
            "tasks": [{"task": "mmlu", "samples": 1, "limit": 4, "max_tokens": 64}],
            "client": {"max_retries": 0}}


def test_servers_start_answer_and_are_stopped_with_their_group(tmp_path: Path) -> None:
    shim, pids = make_shim(tmp_path)
    config = parse_config(lifecycle_config(tmp_path, shim), "c.yaml")
    with launched_sides(config, tmp_path / "logs") as live:
        urls = [live.candidate.base_url[0], live.baseline.base_url[0]]
        assert all(url.startswith("http://127.0.0.1:") for url in urls) and urls[0] != urls[1]
        assert live.candidate.engine == "evalpipe tp1" and live.candidate.launch.model == "/unused"
        import httpx

        assert httpx.get(urls[0] + "/models").json()["data"][0]["id"] == "cand-model"
        started = recorded_pids(pids)
        assert len(started) == 4 and all(alive(p) for p in started)  # two servers, two grandchildren
    assert wait_gone(started) == []
    log = (tmp_path / "logs" / "candidate.log").read_text()
    assert log.startswith("$ ") and "--served-model-name cand-model" in log and "listening" in log


def test_an_error_inside_the_block_still_stops_the_servers(tmp_path: Path) -> None:
    shim, pids = make_shim(tmp_path)
    config = parse_config(lifecycle_config(tmp_path, shim), "c.yaml")
    with pytest.raises(RuntimeError, match="boom"), launched_sides(config, tmp_path / "logs"):
        raise RuntimeError("boom")
    assert len(recorded_pids(pids)) == 4 and wait_gone(recorded_pids(pids)) == []


def test_a_server_that_dies_while_starting_is_reported_with_its_log(tmp_path: Path) -> None:
    shim, pids = make_shim(tmp_path, behaviour='[ "$name" = base-model ] && { echo "CUDA out of memory"; exit 7; }')
    config = parse_config(lifecycle_config(tmp_path, shim), "c.yaml")
    with pytest.raises(EndpointError, match=r"baseline: the evalpipe server exited with code 7.*CUDA out of memory"):
        with launched_sides(config, tmp_path / "logs"):
            pass
    assert wait_gone(recorded_pids(pids)) == []  # the healthy candidate was stopped too


def test_startup_timeout(tmp_path: Path) -> None:
    shim, pids = make_shim(tmp_path, behaviour="sleep 600")
    config = parse_config(lifecycle_config(tmp_path, shim, startup_timeout=1), "c.yaml")
    with pytest.raises(EndpointError, match="not ready within startup_timeout 1 s"):
        with launched_sides(config, tmp_path / "logs"):
            pass
    assert wait_gone(recorded_pids(pids)) == []


def start_run(tmp_path: Path, shim: Path) -> subprocess.Popen:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(lifecycle_config(tmp_path, shim)))
    env = {**os.environ, "FAKE_LATENCY": "120"}  # every request hangs: the run is mid-flight when signalled
    return subprocess.Popen([sys.executable, "-m", "evalpipe", "run", str(path), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_servers(proc: subprocess.Popen, pids: Path, tmp_path: Path) -> list[int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list((tmp_path / "runs").glob("t/*/servers/*.log"))
        if len(recorded_pids(pids)) == 4 and len(logs) == 2 and all("listening" in p.read_text() for p in logs):
            time.sleep(1.0)  # into preflight: requests in flight
            return recorded_pids(pids)
        time.sleep(0.1)
    raise AssertionError(f"servers did not come up: {proc.communicate(timeout=30)}")


@needs_shared_data
@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_to_a_running_evalpipe_stop_every_server(tmp_path: Path, sig: int, code: int) -> None:
    shim, pids = make_shim(tmp_path)
    proc = start_run(tmp_path, shim)
    started = wait_for_servers(proc, pids, tmp_path)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert wait_gone(started) == []


@needs_shared_data
@pytest.mark.slow
def test_a_killed_evalpipe_takes_its_servers_down(tmp_path: Path) -> None:
    """SIGKILL runs no cleanup; each server still gets SIGTERM from the kernel (PR_SET_PDEATHSIG)."""
    shim, pids = make_shim(tmp_path)
    proc = start_run(tmp_path, shim)
    started = wait_for_servers(proc, pids, tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    servers = started[1::2]  # each line is "grandchild server"; only the direct child gets the parent-death signal
    assert wait_gone(servers) == []
    for grandchild in started[0::2]:  # orphaned sleeps of the stand-in (a real server stops its own children)
        if alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)
