"""`evalpipe.load_run` and `evalpipe export`: a finished run as pandas tables and files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import evalpipe
from evalpipe.errors import UserError
from evalpipe.journal import read_journal
from evalpipe.run_files import journal_path
from orch_helpers import needs_shared_data, run_cli
from test_pipeline import _run_from_python


@pytest.fixture(scope="module")
def regressed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run_from_python(tmp_path_factory.mktemp("run"), candidate_accuracy=0.3).run_dir


@needs_shared_data
def test_samples_hold_every_journaled_sample_of_both_sides(regressed_run: Path) -> None:
    tables = evalpipe.load_run(regressed_run)
    for side in ("candidate", "baseline"):
        rows = tables.samples[tables.samples["side"] == side]
        records = {r.key[1:]: r for r in read_journal(journal_path(regressed_run, side))}
        assert len(rows) == len(records) == 20 * 2
        for row in rows.itertuples():
            record = records[(row.question_id, row.sample_index)]
            assert (row.outcome, row.extracted, row.gold) == (record.outcome, record.extracted, record.gold)
            assert row.completion_tokens == record.usage.completion_tokens
            assert bool(row.truncated) == (record.outcome == "truncated")


@needs_shared_data
def test_questions_put_both_sides_side_by_side_and_flips_match_the_comparison(regressed_run: Path) -> None:
    tables = evalpipe.load_run(regressed_run)
    questions = tables.questions
    assert len(questions) == 20 and {"candidate_accuracy", "baseline_accuracy", "delta", "flipped"} <= set(questions)
    samples = tables.samples
    for row in questions.itertuples():
        mine = samples[(samples["side"] == "candidate") & (samples["question_id"] == row.question_id)]
        assert row.candidate_accuracy == pytest.approx(mine["correct"].astype(float).mean())
    assert questions["delta"].equals(questions["candidate_accuracy"] - questions["baseline_accuracy"])
    flipped = tables.comparison.tasks["aime24"].flipped
    assert set(tables.flipped("candidate")["question_id"]) == set(flipped.baseline_only)
    assert set(tables.flipped("baseline")["question_id"]) == set(flipped.candidate_only)
    summary = tables.summary.set_index("side").loc["candidate"]
    assert summary["accuracy"] == pytest.approx(tables.questions["candidate_accuracy"].mean())


@needs_shared_data
@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_export_writes_the_three_tables(regressed_run: Path, tmp_path: Path, file_format: str) -> None:
    result = run_cli("export", str(regressed_run), "--format", file_format, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    read = pd.read_csv if file_format == "csv" else pd.read_parquet
    tables = evalpipe.load_run(regressed_run)
    for name in ("samples", "questions", "summary"):
        path = tmp_path / f"{name}.{file_format}"
        assert str(path) in result.stdout
        exported = read(path)
        assert list(exported.columns) == list(getattr(tables, name).columns)
        assert len(exported) == len(getattr(tables, name))


def test_export_refuses_an_unknown_format_and_a_missing_run(tmp_path: Path) -> None:
    refused = run_cli("export", str(tmp_path), "--format", "xlsx")
    assert refused.exit_code == 2 and "--format must be one of csv, parquet" in refused.output
    with pytest.raises(UserError, match="no such run directory"):
        evalpipe.load_run(tmp_path / "absent")
