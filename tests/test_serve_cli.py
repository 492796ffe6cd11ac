"""`evalpipe serve` as a user runs it: a subprocess that loads a checkpoint directory, serves on 127.0.0.1,
answers the openai client and stops cleanly on Ctrl-C; a bad directory or option gives one line and exit code 2."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import httpx
import openai
import pytest

from evalpipe.testing.serve_process import CLI, evalpipe_serve


@pytest.mark.slow
def test_serve_loads_a_checkpoint_and_answers_until_interrupted(tiny_model_dir):
    with evalpipe_serve("--model", str(tiny_model_dir), "--dtype", "float32", "--max-model-len", "200",
                        "--served-model-name", "tiny-cli", "--api-key", "k", "--kv-cache-gib", "0.01",
                        "--max-num-seqs", "4") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
        (card,) = client.models.list().data
        assert (card.id, card.max_model_len) == ("tiny-cli", 200)
        r = client.chat.completions.create(model="tiny-cli", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    assert server.proc.returncode == 0, server.output
    assert "Traceback" not in server.output


@pytest.mark.slow
def test_ctrl_c_during_a_streamed_request_ends_the_stream_and_the_server(tiny_model_dir):
    """The engine loop runs on the main thread, where Ctrl-C lands: the open stream must end with an error event
    and the process exit 0, not hang on the connection or print a traceback."""
    with evalpipe_serve("--model", str(tiny_model_dir), "--dtype", "float32", "--max-model-len", "4000",
                        "--served-model-name", "tiny-cli", "--kv-cache-gib", "0.05") as server:
        body = {"model": "tiny-cli", "prompt": "Hi", "max_tokens": 3900, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            assert "choices" in json.loads(next(line for line in lines if line.startswith("data: {"))[6:])
            server.proc.send_signal(signal.SIGINT)
            interrupted = time.monotonic()
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert time.monotonic() - interrupted < 15
        assert events[-1]["error"]["type"] == "service_unavailable"
        assert "shutting down" in events[-1]["error"]["message"]
        server.proc.wait(timeout=30)
    assert server.proc.returncode == 0, server.output
    assert "Traceback" not in server.output


@pytest.mark.slow
def test_ctrl_c_stops_a_server_started_with_sigint_ignored(tiny_model_dir):
    """A shell starts background jobs with SIGINT ignored; the server still stops on Ctrl-C, as it did while
    uvicorn (which installs its own handler) ran on the main thread."""
    with evalpipe_serve("--model", str(tiny_model_dir), "--dtype", "float32", "--max-model-len", "200",
                        "--kv-cache-gib", "0.01", sigint_ignored=True) as server:
        pass  # leaving the block sends SIGINT
    assert server.proc.returncode == 0, server.output
    assert "Traceback" not in server.output


def test_serve_reports_an_unloadable_directory_in_one_line(tmp_path):
    proc = subprocess.run([*CLI, "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_serve_names_an_unknown_moe_backend(tiny_model_dir):
    proc = subprocess.run([*CLI, "--model", str(tiny_model_dir), "--moe-backend", "warp-drive"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'warp-drive'" in proc.stderr and "torch" in proc.stderr  # names the bad value and what exists


def test_serve_rejects_an_unknown_quantization_before_loading(tmp_path):
    proc = subprocess.run([*CLI, "--model", str(tmp_path), "--quantization", "int3"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--quantization" in proc.stderr
