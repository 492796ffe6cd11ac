"""`evalpipe import evalscope|lm-eval` on real outputs of both harnesses (tests/fixtures/interop, made by
regenerate.py: EvalScope 1.14.1 and lm-eval 0.4.13 run offline against the styled fake server), and the imported
runs on the leaderboard and in `compare`. Needs neither harness installed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from evalpipe.cards import load_card
from evalpipe.interop.importers import imported_outcome, read_evalscope, read_lmeval
from evalpipe.journal import read_journal
from orch_helpers import run_cli

FIXTURES = Path(__file__).parent / "fixtures" / "interop"
EVALSCOPE, LMEVAL = FIXTURES / "evalscope", FIXTURES / "lm-eval"
OUR_TASKS = {"aime24", "math500", "gpqa_diamond", "mmlu"}


def imported(tmp_path: Path, harness: str, source: Path, *extra: str) -> Path:
    result = run_cli("import", harness, str(source), "--output-dir", str(tmp_path / "runs"), *extra)
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])


def test_outcome_keeps_the_harness_verdict() -> None:
    assert imported_outcome(True, "length", True) == "correct"  # their protocol counts it; finish_reason stays
    assert imported_outcome(False, "length", True) == "truncated"
    assert imported_outcome(False, "stop", False) == "no_answer"
    assert imported_outcome(False, None, True) == "wrong"
    assert imported_outcome(None, "stop", True) == "error"


def test_evalscope_import_reproduces_its_scores_under_its_own_card_hashes(tmp_path: Path) -> None:
    run_dir = imported(tmp_path, "evalscope", EVALSCOPE)
    summary = json.loads((run_dir / "candidate" / "summary.json").read_text())
    assert set(summary["tasks"]) == OUR_TASKS
    for report in (EVALSCOPE / "reports").glob("*/*.json"):
        theirs = json.loads(report.read_text())
        ours = {"math_500": "math500"}.get(theirs["dataset_name"], theirs["dataset_name"])
        assert summary["tasks"][ours]["accuracy"] == pytest.approx(theirs["metrics"][0]["score"], abs=1e-4)
        assert summary["tasks"][ours]["samples"] == 2  # --repeats 2
    for task, entry in summary["tasks"].items():
        assert entry["card_hash"] != load_card(task).card_hash
    records = read_journal(run_dir / "candidate" / "journal.jsonl")
    # MATH-500 keeps its unique ids (the ones our math500 card uses); others are keyed by their prompt.
    assert all(re.fullmatch(r"test/[a-z_]+/\d+\.json", r.question_id) for r in records if r.task == "math500")
    assert all(r.question_id.startswith("q-") for r in records if r.task != "math500")
    assert any(r.finish_reason == "length" for r in records)  # EvalScope's stop_reason max_tokens, mapped
    assert any(r.reasoning for r in records)  # reasoning_content kept apart from the content
    assert all(r.rule.startswith("evalscope:") and r.content is not None for r in records)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["imported"]["harness"] == "evalscope" and saved["imported"]["harness_version"] == "1.14.1"
    assert saved["resolved"]["tasks"]["aime24"]["sampling"] == {"temperature": 0.6, "top_p": 0.95, "max_tokens": 2048}
    report = (run_dir / "report.md").read_text()
    assert "imported from" in report and "--resume" not in report


def test_lmeval_import_reproduces_the_verdict_metric(tmp_path: Path) -> None:
    run_dir = imported(tmp_path, "lm-eval", LMEVAL, "--label", "fake via lm-eval")
    summary = json.loads((run_dir / "candidate" / "summary.json").read_text())
    assert summary["label"] == "fake via lm-eval" and set(summary["tasks"]) == OUR_TASKS
    (results_file,) = LMEVAL.glob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    expected = {"aime24": results["aime24"]["exact_match,none"],
                "math500": results["minerva_math500"]["math_verify,none"],
                "gpqa_diamond": results["gpqa_diamond_cot_zeroshot"]["exact_match,flexible-extract"],
                "mmlu": results["mmlu_flan_cot_zeroshot_anatomy"]["exact_match,flexible-extract"]}
    for task, value in expected.items():
        assert summary["tasks"][task]["accuracy"] == pytest.approx(value)
    records = read_journal(run_dir / "candidate" / "journal.jsonl")
    aime_ids = {r.question_id for r in records if r.task == "aime24"}
    assert aime_ids and all(q.startswith("2024-") for q in aime_ids)  # the same ids as our aime24 card
    assert {r.labels.get("subject") for r in records if r.task == "mmlu"} == {"anatomy"}
    assert {r.question_id for r in records if r.task == "gpqa_diamond"} == {"recFIXTURE1", "recFIXTURE2",
                                                                           "recFIXTURE3"}


def test_card_hash_is_stable_and_moves_with_the_protocol(tmp_path: Path) -> None:
    first = read_lmeval(LMEVAL)
    # Another run of the same protocol: other paths, port and function addresses in the logged configs.
    copy = tmp_path / "again"
    copy.mkdir()
    for path in LMEVAL.iterdir():
        text = re.sub(r" at 0x[0-9a-f]+>", " at 0x1234>", path.read_text()).replace("/tmp/fixture", "/elsewhere")
        (copy / path.name).write_text(re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:9", text))
    second = read_lmeval(copy)
    assert {t: x.card_hash for t, x in first.tasks.items()} == {t: x.card_hash for t, x in second.tasks.items()}
    changed = read_lmeval(LMEVAL)
    changed.tasks["aime24"].protocol["gen_kwargs"] = {"max_gen_toks": 32768}
    assert changed.tasks["aime24"].card_hash != first.tasks["aime24"].card_hash
    evalscope = read_evalscope(EVALSCOPE)
    assert not set(x.card_hash for x in evalscope.tasks.values()) & set(x.card_hash for x in first.tasks.values())
    moved = tmp_path / "evalscope-elsewhere"
    shutil.copytree(EVALSCOPE, moved)
    config = moved / "configs" / "task_config.yaml"
    config.write_text(config.read_text().replace("/tmp/fixture", "/data/other"))
    assert {t: x.card_hash for t, x in read_evalscope(moved).tasks.items()} == \
        {t: x.card_hash for t, x in evalscope.tasks.items()}


def test_imported_runs_join_the_leaderboard_and_compare_only_within_a_protocol(tmp_path: Path) -> None:
    evalscope_a = imported(tmp_path, "evalscope", EVALSCOPE, "--label", "A")
    evalscope_b = imported(tmp_path, "evalscope", EVALSCOPE, "--label", "B")
    lmeval = imported(tmp_path, "lm-eval", LMEVAL)
    result = run_cli("leaderboard", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    board = (tmp_path / "runs" / "leaderboard.md").read_text()
    assert all(label in board for label in ("| A |", "| B |", "fake-model (lm-eval)"))
    same = run_cli("compare", str(evalscope_a), str(evalscope_b))
    assert same.exit_code == 0, same.output
    refused = run_cli("compare", str(evalscope_a), str(lmeval))
    assert refused.exit_code == 2 and "card_hash" in refused.output and "Traceback" not in refused.output


@pytest.mark.parametrize(("harness", "make", "message"), [
    ("evalscope", lambda d: None, "not an EvalScope output directory"),
    ("lm-eval", lambda d: None, "no lm-eval results_*.json"),
    ("lm-eval", lambda d: (d / "results_2026.json").write_text(json.dumps({"configs": {"t": {}}})), "--log_samples"),
    ("evalscope", lambda d: ((d / "configs").mkdir(), (d / "configs" / "task_config.yaml").write_text("datasets: [x]")),
     "no reviews"),
])
def test_bad_import_directories_say_what_is_wrong(tmp_path: Path, harness: str, make, message: str) -> None:
    source = tmp_path / "out"
    source.mkdir()
    make(source)
    result = run_cli("import", harness, str(source), "--output-dir", str(tmp_path / "runs"))
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_fixtures_hold_no_gpqa_plaintext() -> None:
    # The GPQA-shaped questions in the fixtures are invented (their ids and texts say "fixture").
    for path in [*LMEVAL.glob("samples_gpqa*.jsonl"), *EVALSCOPE.glob("reviews/*/gpqa*.jsonl")]:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            text = json.dumps(row.get("doc") or row.get("messages"))
            assert "fixture" in text.lower(), path
