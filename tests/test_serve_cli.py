"""`evalpipe serve` as a user runs it: a subprocess that loads a checkpoint directory, serves on 127.0.0.1,
answers the openai client and stops cleanly on Ctrl-C; bad arguments give one line and an exit code."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

CLI = [sys.executable, "-c", "from evalpipe.cli import main; main()", "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_loads_a_checkpoint_and_answers_until_interrupted(tiny_model_dir):
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "--model", str(tiny_model_dir), "--port", str(port), "--dtype", "float32", "--max-model-len", "200",
         "--served-model-name", "tiny-cli", "--api-key", "k", "--kv-cache-gib", "0.01", "--max-num-seqs", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        (card,) = client.models.list().data
        assert (card.id, card.max_model_len) == ("tiny-cli", 200)
        r = client.chat.completions.create(model="tiny-cli", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert "Traceback" not in output


def test_serve_reports_an_unloadable_directory_in_one_line(tmp_path):
    proc = subprocess.run([*CLI, "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("evalpipe serve:") and "Traceback" not in proc.stderr


def test_serve_rejects_an_unknown_quantization_before_loading(tmp_path):
    proc = subprocess.run([*CLI, "--model", str(tmp_path), "--quantization", "int3"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--quantization" in proc.stderr
