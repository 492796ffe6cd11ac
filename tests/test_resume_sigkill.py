"""A real `evalpipe run` process is SIGKILLed at several points and resumed each time: the final summary equals
an uninterrupted run's, and no sample already in the journal is ever sent again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evalpipe.journal import read_journal
from evalpipe.runner import plan_from_config
from evalpipe.testing.fake_server import FakeServer, answer_key_for_plans, text_key
from orch_helpers import needs_shared_data, run_cli, write_config

pytestmark = [needs_shared_data, pytest.mark.slow]

TASKS = [
    {"task": "aime24", "samples": 3, "max_tokens": 200, "limit": 6},
    {"task": "math500", "samples": 2, "max_tokens": 200, "limit": 10},
    {"task": "gpqa_diamond", "samples": 2, "max_tokens": 200, "limit": 8},
    {"task": "mmlu", "samples": 1, "max_tokens": 200, "limit": 16},
]  # 18 + 20 + 16 + 16 = 70 samples


def start(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evalpipe", "run", str(config), "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def journal_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def kill_when(proc: subprocess.Popen, runs: Path, new_lines: int, timeout: float = 60) -> Path | None:
    """SIGKILL the run once it added `new_lines` lines to the journal (0: at once, while it starts up)."""
    deadline = time.monotonic() + timeout
    found = sorted(runs.glob("t/*/candidate/journal.jsonl"))
    journal = found[0] if found else None
    threshold = (journal_lines(journal) if journal else 0) + new_lines
    while new_lines and time.monotonic() < deadline and proc.poll() is None:
        found = sorted(runs.glob("t/*/candidate/journal.jsonl"))
        journal = found[0] if found else None
        if journal is not None and journal_lines(journal) >= threshold:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return journal


def test_sigkill_at_several_points_then_resume_gives_the_uninterrupted_summary(tmp_path: Path) -> None:
    behaviour = dict(accuracy=0.6, truncation_rate=0.1, no_answer_rate=0.05, latency_s=0.03, tokens_per_s=2000)
    reference_cfg = write_config(tmp_path / "reference.yaml", "http://127.0.0.1:1/v1", TASKS, concurrency=4)
    _, plans = plan_from_config(reference_cfg)
    key = answer_key_for_plans(plans)
    wire_key = {r.key: (text_key(r.messages[-1]["content"]), r.seed) for p in plans for r in p.requests}

    with FakeServer({**behaviour, "answer_key": key}) as server:
        write_config(reference_cfg, server.base_url, TASKS, concurrency=4)
        done = run_cli("run", str(reference_cfg), "--no-progress")  # uninterrupted, in this process
        assert done.exit_code == 0, done.output
        reference = json.loads((Path(done.stdout.strip().splitlines()[-1]) / "candidate/summary.json").read_text())

    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    with FakeServer({**behaviour, "answer_key": key}) as server:
        config = write_config(interrupted / "run.yaml", server.base_url, TASKS, concurrency=4)
        runs = interrupted / "runs"
        journal = kill_when(start(config), runs, new_lines=1)  # the pilot batch is journaled first
        assert journal is not None and 0 < journal_lines(journal) < 70
        run_dir = journal.parent.parent
        for new_lines in (0, 7, 15):  # during start-up, then twice mid-run
            answered = {wire_key[r.key] for r in read_journal(journal)}
            sent_before = len(server.requests)
            kill_when(start(config, "--resume", str(run_dir)), runs, new_lines=new_lines)
            assert journal_lines(journal) < 70
            resent = {(r["key"], r["seed"]) for r in server.requests[sent_before:]} & answered
            assert not resent, "a sample already in the journal was sent again"
        answered = {wire_key[r.key] for r in read_journal(journal)}
        sent_before = len(server.requests)
        final = subprocess.run([sys.executable, "-m", "evalpipe", "run", str(config), "--resume", str(run_dir),
                                "--no-progress"], capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stderr
        assert Path(final.stdout.strip().splitlines()[-1]) == run_dir
        assert not {(r["key"], r["seed"]) for r in server.requests[sent_before:]} & answered

    resumed = json.loads((run_dir / "candidate/summary.json").read_text())
    assert resumed["tasks"] == reference["tasks"]
    assert resumed["run_id"] == run_dir.name != reference["run_id"]
    records = read_journal(journal)
    assert {r.key for r in records} == set(wire_key)  # every planned sample answered
