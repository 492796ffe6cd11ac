"""`evalpipe serve` as a user runs it: a subprocess that loads a checkpoint directory, serves on 127.0.0.1,
answers the openai client and stops cleanly on Ctrl-C; a bad directory or option gives one line and exit code 2."""

from __future__ import annotations

import subprocess

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
