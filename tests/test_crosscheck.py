"""`evalpipe crosscheck`: the comparison itself (pure), the report section, the missing-harness messages, and
end-to-end re-grading of a styled fake-server run with EvalScope and lm-eval in their own environments."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from evalpipe.interop.crosscheck import compare, update_report
from evalpipe.journal import read_journal
from evalpipe.records import SampleRecord
from interop_helpers import needs_harness, styled_run
from orch_helpers import needs_shared_data, run_cli


def record(task: str, qid: str, outcome: str, extracted: str | None, rule: str = "boxed_last") -> SampleRecord:
    return SampleRecord(task=task, card_hash="h", question_id=qid, sample_index=0, gold="5", content="x",
                        extracted=extracted, rule=rule, outcome=outcome,
                        finish_reason="length" if outcome == "truncated" else "stop")


def verdict(correct: bool | None, extracted: str | None) -> dict:
    return {"correct": correct, "extracted": extracted, "details": {}, "error": None if correct is not None else "x"}


def test_compare_counts_agreement_kinds_and_where_they_part() -> None:
    pairs = [
        (record("math500", "a", "correct", "5"), verdict(True, "5")),  # agree
        (record("math500", "b", "wrong", "4"), verdict(False, "4")),  # agree
        (record("math500", "c", "truncated", "5"), verdict(True, "5")),  # theirs only, truncation
        (record("math500", "d", "no_answer", None, "none"), verdict(True, "5")),  # theirs only, extraction
        (record("math500", "e", "correct", "025"), verdict(False, "025")),  # ours only, grading
        (record("math500", "f", "correct", "5"), verdict(None, None)),  # ungraded
        (record("mmlu", "g", "correct", "B", "mc_boxed"), verdict(False, "(B)")),  # brackets: still grading
    ]
    per_task, disagreements, ungraded = compare([r for r, _ in pairs], [v for _, v in pairs],
                                                {"math500": "math_500", "mmlu": "mmlu"})
    math = per_task["math500"].to_dict()
    assert (math["graded"], math["ungraded"], math["agreement"]) == (5, 1, 2 / 5)
    assert (math["ours_correct_rate"], math["theirs_correct_rate"]) == (2 / 5, 3 / 5)
    assert (math["ours_only"], math["theirs_only"]) == (1, 2)
    assert math["where"] == {"extraction": 1, "grading": 1, "truncation": 1}
    assert [(d.question_id, d.kind, d.where) for d in disagreements] == [
        ("c", "theirs_only", "truncation"), ("d", "theirs_only", "extraction"), ("e", "ours_only", "grading"),
        ("g", "ours_only", "grading")]
    assert disagreements[1].ours["extracted"] is None and disagreements[1].theirs["extracted"] == "5"
    assert [u["question_id"] for u in ungraded] == ["f"]


def test_report_section_is_replaced_not_appended(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    report.write_text("# run\n\nbody\n")
    update_report(report, "lm-eval", "candidate", "## lm-eval first\n")
    update_report(report, "evalscope", "candidate", "## evalscope\n")
    update_report(report, "lm-eval", "candidate", "## lm-eval second\n")
    text = report.read_text()
    assert text.startswith("# run\n\nbody\n")
    assert "first" not in text and text.count("## lm-eval second") == 1 and text.count("## evalscope") == 1


def test_missing_harness_environment_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "candidate").mkdir(parents=True)
    journal = run_dir / "candidate" / "journal.jsonl"
    journal.write_text(record("math500", "a", "correct", "5").model_dump_json() + "\n")
    monkeypatch.setenv("EVALPIPE_EVALSCOPE_PYTHON", str(tmp_path / "no-such-venv" / "bin" / "python"))
    result = run_cli("crosscheck", str(run_dir), "--grader", "evalscope")
    assert result.exit_code == 2
    assert "scripts/setup_extra.sh evalscope" in result.output and "evalpipe[evalscope]" in result.output
    assert "Traceback" not in result.output
    # An environment whose python exists but lacks the harness gives the same advice (harness_grader exits 3).
    monkeypatch.setenv("EVALPIPE_EVALSCOPE_PYTHON", sys.executable)
    result = run_cli("crosscheck", str(run_dir), "--grader", "evalscope")
    assert result.exit_code == 2 and "not importable" in result.output and "setup_extra.sh evalscope" in result.output


def test_unknown_grader_and_missing_run_dir_are_usage_errors(tmp_path: Path) -> None:
    assert run_cli("crosscheck", str(tmp_path), "--grader", "helm").exit_code == 2
    assert run_cli("crosscheck", str(tmp_path / "nope"), "--grader", "lm-eval").exit_code == 2


@pytest.fixture(scope="module")
def styled_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return styled_run(tmp_path_factory.mktemp("crosscheck"))


@needs_shared_data
@pytest.mark.slow
@pytest.mark.parametrize("grader", [pytest.param("evalscope", marks=needs_harness("evalscope")),
                                    pytest.param("lm-eval", marks=needs_harness("lm-eval"))])
def test_crosscheck_regrades_every_answered_sample(styled_run_dir: Path, grader: str) -> None:
    result = run_cli("crosscheck", str(styled_run_dir), "--grader", grader)
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip().splitlines()[-1]) == styled_run_dir / "crosscheck.json"
    entry = json.loads((styled_run_dir / "crosscheck.json").read_text())["graders"][grader]["candidate"]
    records = {r.key: r for r in read_journal(styled_run_dir / "candidate" / "journal.jsonl")}
    answered = [r for r in records.values() if r.outcome != "error"]
    tasks = entry["tasks"]
    assert set(tasks) == {"aime24", "math500", "gpqa_diamond", "mmlu"}
    assert sum(t["graded"] + t["ungraded"] for t in tasks.values()) == len(answered)
    assert all(t["ungraded"] == 0 for t in tasks.values())
    for task, t in tasks.items():
        mine = [r for r in answered if r.task == task]
        assert t["ours_correct_rate"] == pytest.approx(sum(r.outcome == "correct" for r in mine) / len(mine))
        assert t["agreement"] == pytest.approx(1 - (t["ours_only"] + t["theirs_only"]) / t["graded"])
        assert sum(t["where"].values()) == t["ours_only"] + t["theirs_only"]
    disagreements = entry["disagreements"]
    assert len(disagreements) == sum(t["ours_only"] + t["theirs_only"] for t in tasks.values())
    # Truncated answers that already hold the right answer are correct for both harnesses, never for us.
    truncated_right = {(r.task, r.question_id, r.sample_index) for r in answered
                       if r.outcome == "truncated" and r.extracted == r.gold}
    assert truncated_right  # the styled run has some (it is deterministic)
    assert truncated_right == {(d["task"], d["question_id"], d["sample_index"]) for d in disagreements
                               if d["where"] == "truncation" and d["kind"] == "theirs_only"}
    for d in disagreements:
        ours = [r for r in answered if (r.task, r.question_id, r.sample_index) ==
                (d["task"], d["question_id"], d["sample_index"])][0]
        assert d["ours"]["extracted"] == ours.extracted and d["ours"]["outcome"] == ours.outcome
        assert (d["kind"] == "ours_only") == (ours.outcome == "correct") != d["theirs"]["correct"]
    report = (styled_run_dir / "report.md").read_text()
    assert f"<!-- crosscheck {grader} candidate -->" in report and "agreement %" in report
    # The core process never imported a harness: grading ran in the harness's own environment.
    assert "evalscope" not in sys.modules and "lm_eval" not in sys.modules
