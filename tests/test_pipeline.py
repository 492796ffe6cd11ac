"""`evalpipe.run` from Python against two fake servers, and the typed run files it leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import evalpipe
from evalpipe.errors import UserError
from evalpipe.run_files import (
    ComparisonFile,
    SideSummary,
    read_comparison,
    read_details,
    read_summary,
    summary_path,
)
from evalpipe.testing.fake_server import FakeServer, answer_key_for_plans
from evalpipe.runner import plan_from_config
from orch_helpers import needs_shared_data, write_config

BASELINE = {"label": "fp8", "model": "fake-model", "base_url": "http://127.0.0.1:1/v1"}
TASK = {"task": "aime24", "samples": 2, "max_tokens": 256, "limit": 20}


def _run_from_python(tmp_path: Path, candidate_accuracy: float) -> evalpipe.RunOutcome:
    """A config given as a dict (as a notebook would), both sides served by fake servers."""
    path = write_config(tmp_path / "run.yaml", "http://127.0.0.1:1/v1", [TASK], baseline=BASELINE,
                        gate={"margin": 0.1}, preflight={"pilot_samples": 2})
    config = yaml.safe_load(path.read_text())
    key = answer_key_for_plans(plan_from_config(path)[1])
    with FakeServer({"answer_key": key, "accuracy": candidate_accuracy}) as cand, \
            FakeServer({"answer_key": key, "accuracy": 0.8}) as base:
        config["candidate"]["base_url"], config["baseline"]["base_url"] = cand.base_url, base.base_url
        return evalpipe.run(config)


@needs_shared_data
def test_a_whole_run_from_python_returns_what_it_wrote(tmp_path: Path) -> None:
    outcome = _run_from_python(tmp_path, candidate_accuracy=0.8)
    assert outcome.run_dir.is_dir() and set(outcome.summaries) == {"candidate", "baseline"}
    for side, summary in outcome.summaries.items():
        assert isinstance(summary, SideSummary) and summary == read_summary(outcome.run_dir, side)
        assert outcome.details[side] == read_details(outcome.run_dir, side)
        assert summary.tasks["aime24"].n_questions == 20 and summary.tasks["aime24"].samples == 2
        written = json.loads(summary_path(outcome.run_dir, side).read_text())
        assert next(iter(written)) == "schema_version" and written["schema_version"] == 1
    assert isinstance(outcome.comparison, ComparisonFile) and outcome.comparison == read_comparison(outcome.run_dir)
    assert outcome.verdict == outcome.comparison.verdict == outcome.comparison.tasks["aime24"].verdict
    assert outcome.gate == outcome.comparison.gate.status
    assert outcome.exit_code == (0 if outcome.gate == "pass" else 1)


@needs_shared_data
def test_a_regression_seen_from_python_fails_with_exit_code_1(tmp_path: Path) -> None:
    outcome = _run_from_python(tmp_path, candidate_accuracy=0.1)
    assert outcome.verdict == "fail" and outcome.gate == "fail" and outcome.exit_code == 1
    assert outcome.comparison.tasks["aime24"].flipped.baseline_only


def test_bad_config_from_python_is_a_user_error_naming_the_field() -> None:
    with pytest.raises(UserError, match="concurrency"):
        evalpipe.run({"name": "t", "candidate": {"base_url": "http://127.0.0.1:1/v1", "model": "m"},
                      "tasks": [{"task": "aime24"}], "concurrency": 0})


def _side_dir(tmp_path: Path, document: dict) -> Path:
    (tmp_path / "candidate").mkdir(parents=True)
    (tmp_path / "candidate" / "summary.json").write_text(json.dumps(document))
    return tmp_path


SUMMARY = {"run_id": "r", "config_name": "c", "label": "l", "tasks": {"t": {
    "card_hash": "h", "n_questions": 1, "samples": 1, "accuracy": 1.0, "stderr": None, "ci95": None, "cons_at_k": 1.0,
    "pass_at_k": 1.0, "truncation_rate": 0.0, "no_answer_rate": 0.0, "error_rate": 0.0,
    "completion_tokens": {"mean": 3.0, "p50": 3.0, "p99": 3.0}}}}


def test_a_summary_written_before_schema_version_existed_still_reads(tmp_path: Path) -> None:
    assert read_summary(_side_dir(tmp_path, SUMMARY)).tasks["t"].accuracy == 1.0


def test_a_foreign_or_newer_file_is_refused_naming_file_and_field(tmp_path: Path) -> None:
    foreign = {**SUMMARY, "tasks": {"t": {**SUMMARY["tasks"]["t"], "accuracy": "high"}}}
    with pytest.raises(UserError, match=r"candidate/summary.json: tasks\.t\.accuracy: "):
        read_summary(_side_dir(tmp_path / "a", foreign))
    with pytest.raises(UserError, match=r"summary.json: schema_version: 2 is not a version this evalpipe reads"):
        read_summary(_side_dir(tmp_path / "b", {**SUMMARY, "schema_version": 2}))
    with pytest.raises(UserError, match=r"summary.json: run_id: Field required.*not a SideSummary"):
        read_summary(_side_dir(tmp_path / "c", {"verdict": "pass", "tasks": {}}))
