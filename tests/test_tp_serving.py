"""`evalpipe serve --tp 2` as a user runs it (CPU, gloo): two processes that answer like one, stop together on
SIGTERM or Ctrl-C, fail fast with a clear error when a rank dies, and leave no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from runtime.models import load_model
from runtime.server.options import EngineOptions
from runtime.testing.local_server import local_server

CLI = [sys.executable, "-c", "from evalpipe.cli import main; main()", "serve"]
PROMPTS = [[1, 200, 300, 400], [5, 6, 7, 8, 9, 10, 11, 12, 13], [4242] * 20]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def rank_workers(port: int) -> list[int]:
    """Rank processes of the server on `port`, wherever they are in the process tree (orphans included)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "runtime.server.rank_worker" in args and f'"port": {port},' in args:
            found.append(int(cmdline.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class TPServer:
    def __init__(self, model_dir: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [*CLI, "--model", str(model_dir), "--port", str(self.port), "--tp", "2", "--dtype", "float32",
             "--max-model-len", "512", "--kv-cache-gib", "0.01", "--max-num-seqs", "8", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        self.ranks = descendants(self.proc.pid)

    def complete(self, prompt: list[int], max_tokens: int) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})

    def stop(self, sig: int) -> tuple[int, str]:
        self.proc.send_signal(sig)
        output = self.proc.communicate(timeout=60)[0]
        return self.proc.returncode, output


@pytest.mark.slow
def test_two_ranks_answer_like_one_and_stop_together_on_sigterm(tiny_model_dir, tokenizer):
    server = TPServer(tiny_model_dir, "--served-model-name", "tiny")
    try:
        assert len(server.ranks) == 1 and all(alive(p) for p in server.ranks)  # rank 1, a child of rank 0
        texts = [server.complete(p, 12).json()["choices"][0]["text"] for p in PROMPTS]
    finally:
        code, output = server.stop(signal.SIGTERM)
    assert code == 0 and "Traceback" not in output, output
    assert not any(alive(p) for p in server.ranks)
    model, _ = load_model(tiny_model_dir, dtype="float32")
    with local_server(model, tokenizer, "tiny", EngineOptions(max_model_len=512, kv_cache_gib=0.01)) as url:
        for prompt, text in zip(PROMPTS, texts):
            ref = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 12,
                                                             "temperature": 0, "ignore_eos": True})
            assert ref.json()["choices"][0]["text"] == text


@pytest.mark.slow
def test_a_killed_rank_fails_the_server_fast_with_a_clear_error(tiny_model_dir):
    server = TPServer(tiny_model_dir, "--served-model-name", "tiny")
    try:
        (rank1,) = server.ranks
        assert server.complete(PROMPTS[0], 4).status_code == 200
        body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            assert "choices" in json.loads(first[6:])
            os.kill(rank1, signal.SIGKILL)
            killed = time.monotonic()
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert time.monotonic() - killed < 10  # the stream ended instead of hanging
        assert events[-1]["error"]["type"] == "service_unavailable"
        assert "tensor-parallel rank 1" in events[-1]["error"]["message"]
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and "tensor-parallel rank 1" in health.json()["error"]
        later = server.complete(PROMPTS[0], 4)
        assert later.status_code == 503 and "rank 1" in later.json()["error"]["message"]
        assert httpx.get(f"{server.url}/metrics").status_code == 200
    finally:
        code, output = server.stop(signal.SIGINT)
    assert not any(alive(p) for p in server.ranks)
    assert "killed by signal 9" in output


def test_ranks_that_cannot_load_end_the_command_with_one_error_line(tiny_model_dir):
    # tp=3 cannot split the tiny model's 4 attention heads: every rank fails while loading
    port = free_port()
    proc = subprocess.run([*CLI, "--model", str(tiny_model_dir), "--port", str(port), "--tp", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "num_attention_heads=4 is not divisible by the tensor-parallel size 3" in errors[0]
    assert rank_workers(port) == []
