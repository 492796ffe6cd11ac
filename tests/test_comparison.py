import json
import math

import numpy as np
import pytest

from evalpipe.comparison import comparability_problems, compare_task, comparison_document, overall_verdict
from evalpipe.outcomes import SideOutcomes, outcome_codes, question_order, side_outcomes
from evalpipe.records import SampleRecord


def _record(qid: str, index: int, outcome: str, task: str = "aime24", finish: str = "stop") -> SampleRecord:
    return SampleRecord(
        task=task, card_hash="h", question_id=qid, sample_index=index, gold="1", outcome=outcome,
        finish_reason="length" if outcome == "truncated" else finish,
    )


def _side(ids, correct, truncated=None, errored=None) -> SideOutcomes:
    correct = np.asarray(correct, dtype=float)
    truncated = np.zeros(correct.shape, bool) if truncated is None else np.asarray(truncated, bool)
    errored = np.zeros(correct.shape, bool) if errored is None else np.asarray(errored, bool)
    return SideOutcomes(tuple(ids), correct, truncated, errored)


def test_side_outcomes_builds_arrays_from_journal_records():
    records = [
        _record("q2", 0, "correct"),
        _record("q1", 1, "truncated"),
        _record("q1", 0, "wrong"),
        _record("q2", 1, "error"),
        _record("q2", 1, "correct"),  # a retry on resume replaces the earlier record
        _record("q3", 0, "error"),
        _record("m1", 0, "no_answer", task="mmlu"),
    ]
    sides = side_outcomes(records)
    aime = sides["aime24"]
    assert list(aime.question_ids) == question_order("aime24", ["q1", "q2", "q3"])  # the plan's fixed order
    aime = aime.take(["q1", "q2", "q3"])
    np.testing.assert_array_equal(aime.correct, [[0, 0], [1, 1], [np.nan, np.nan]])
    np.testing.assert_array_equal(aime.truncated, [[False, True], [False, False], [False, False]])
    np.testing.assert_array_equal(aime.errored[2], [True, False])
    assert aime.rate(aime.errored) == pytest.approx(1 / 5)
    assert aime.rate(aime.truncated) == pytest.approx(1 / 5)
    assert sides["mmlu"].correct.tolist() == [[0.0]]
    codes = outcome_codes(records)
    assert dict(zip(*codes["aime24"], strict=True)) == {"q1": "wt", "q2": "cc", "q3": "e"}
    assert codes["mmlu"] == (["m1"], ["n"])


def test_outcomes_from_codes_reindex_and_restrict():
    side = SideOutcomes.from_codes(["a", "b"], ["ctw", "e.n"])
    np.testing.assert_array_equal(side.correct, [[1, 0, 0], [np.nan, np.nan, 0]])
    np.testing.assert_array_equal(side.issued, [[True, True, True], [True, False, True]])
    wide = side.reindex(["b", "a", "z"], 5)
    assert wide.correct.shape == (3, 5) and np.isnan(wide.correct[:, 3:]).all() and np.isnan(wide.correct[2]).all()
    np.testing.assert_array_equal(wide.errored[0, :3], [True, False, False])
    keep = np.zeros((3, 5), bool)
    keep[:, 0] = True
    narrow = wide.restrict(keep)
    assert narrow.rate(narrow.errored) == 0.5 and narrow.rate(narrow.truncated) == 0.0
    with pytest.raises(ValueError, match="unknown outcome codes"):
        SideOutcomes.from_codes(["a"], ["cx"])


def test_compare_task_pairs_by_question_id_and_reports_flips_and_both_completed():
    cand = _side(
        ["a", "b", "c", "d", "e"],
        [[1, 1], [0, 0], [1, 1], [0, 1], [1, 0]],
        truncated=[[0, 0], [1, 0], [0, 0], [0, 0], [0, 0]],
    )
    # baseline lists questions in another order and has one extra question and more samples
    base = _side(
        ["e", "d", "c", "b", "a", "z"],
        [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]],
    )
    result = compare_task("aime24", cand, base, margin=0.1)
    per_q = {"a": 1 - 0.25, "b": 0 - 0.75, "c": 0.0, "d": 0.5, "e": 0.5}
    assert result.test.delta == pytest.approx(np.mean(list(per_q.values())))
    assert result.flipped_baseline_only == ("b",)
    assert result.flipped_candidate_only == ("a",)  # d and e are 1/2: not solved (needs a majority)
    assert result.unpaired == {"candidate_only": 0, "baseline_only": 1}
    assert result.both_completed.n_questions == 4  # b truncated on the candidate side
    assert result.both_completed.delta == pytest.approx(np.mean([0.75, 0.0, 0.5, 0.5]))
    assert result.candidate.truncation_rate == pytest.approx(0.1)
    assert result.baseline.accuracy == pytest.approx(np.mean([0.25, 0.75, 1.0, 0.0, 0.0]))

    doc = result.to_dict()
    assert doc["ci95"][0] < doc["delta"] < doc["ci95"][1]
    assert doc["both_completed"]["n"] == 4 and doc["margin"] == 0.1
    assert set(doc["candidate"]) >= {"accuracy", "stderr", "truncation_rate"}


def test_flips_are_ordered_by_size_of_the_swing():
    cand = _side(["a", "b", "c"], [[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    base = _side(["a", "b", "c"], [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    assert compare_task("t", cand, base, 0.05).flipped_baseline_only == ("c", "a", "b")


def test_a_task_without_paired_outcomes_is_inconclusive_and_serialises_as_json():
    cand = _side(["a", "b"], [[np.nan], [np.nan]], errored=[[True], [True]])
    base = _side(["a", "b"], [[1.0], [0.0]])
    result = compare_task("gpqa_diamond", cand, base, margin=0.05)
    assert result.verdict == "inconclusive"
    assert result.candidate.error_rate == 1.0
    doc = comparison_document({"gpqa_diamond": result})
    text = json.dumps(doc, allow_nan=False)  # no NaN or Infinity reaches the file
    assert json.loads(text)["tasks"]["gpqa_diamond"]["delta"] is None
    assert doc["verdict"] == "inconclusive"


def test_overall_verdict_is_the_worst_task():
    assert overall_verdict(["pass", "inconclusive", "fail"]) == "fail"
    assert overall_verdict(["pass", "inconclusive"]) == "inconclusive"
    assert overall_verdict(["pass", "pass"]) == "pass"
    assert overall_verdict([]) == "inconclusive"


def test_comparison_document_matches_the_contract():
    rng = np.random.default_rng(0)
    p = rng.beta(0.7, 0.5, 60)
    base = _side([f"q{i}" for i in range(60)], (rng.random((60, 8)) < p[:, None]).astype(float))
    cand = _side(base.question_ids, (rng.random((60, 8)) < p[:, None]).astype(float))
    doc = comparison_document({"aime24": compare_task("aime24", cand, base, margin=0.2)})
    task = doc["tasks"]["aime24"]
    assert doc["verdict"] == task["verdict"] == "pass"
    for key in ("candidate", "baseline", "delta", "stderr", "ci95", "margin", "verdict", "flipped", "both_completed"):
        assert key in task
    assert set(task["flipped"]) == {"baseline_only", "candidate_only"}
    assert set(task["both_completed"]) >= {"delta", "ci95", "n"}
    assert math.isclose(task["candidate"]["accuracy"] - task["baseline"]["accuracy"], task["delta"], abs_tol=1e-12)


def test_comparability_problems_list_each_differing_field():
    cand = {"aime24": {"card_hash": "abc", "temperature": 0.6, "max_tokens": 1024}, "mmlu": {"card_hash": "m"}}
    base = {"aime24": {"card_hash": "abd", "temperature": 0.6, "max_tokens": 2048}, "gpqa": {"card_hash": "g"}}
    problems = comparability_problems(cand, base)
    assert problems == [
        "aime24.card_hash: candidate 'abc', baseline 'abd'",
        "aime24.max_tokens: candidate 1024, baseline 2048",
    ]
    assert comparability_problems({"mmlu": {}}, {"gpqa": {}})[0].startswith("no task in common")
    assert comparability_problems(cand, cand) == []
