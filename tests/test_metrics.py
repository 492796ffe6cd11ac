"""Metrics are pure functions of records and arrays: checked against hand computations and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from evalpipe.metrics import consensus_at_k, mean_stderr_ci, pass_at_k, question_means, summarize_task
from evalpipe.outcomes import outcome_matrix, question_order
from evalpipe.records import SampleRecord, Usage

SUMMARY_KEYS = {"card_hash", "n_questions", "samples", "accuracy", "stderr", "ci95", "cons_at_k", "pass_at_k",
                "truncation_rate", "no_answer_rate", "error_rate", "completion_tokens"}


def rec(q: str, s: int, outcome: str, extracted: str | None = None, tokens: int | None = 10, task: str = "t",
        card: str = "h", **labels: str) -> SampleRecord:
    return SampleRecord(task=task, card_hash=card, question_id=q, sample_index=s, gold="x", outcome=outcome,
                        extracted=extracted, usage=Usage(completion_tokens=tokens), labels=labels)


def test_outcome_matrix_values_order_and_alignment() -> None:
    records = [rec("q1", 0, "correct"), rec("q1", 1, "truncated"), rec("q2", 0, "error"), rec("q2", 1, "wrong"),
               rec("q3", 1, "no_answer"), rec("q2", 0, "correct")]  # the later q2/0 record supersedes the error
    ids, m = outcome_matrix(records, "t")
    assert ids == question_order("t", ["q1", "q2", "q3"])
    row = {q: m[i] for i, q in enumerate(ids)}
    np.testing.assert_array_equal(row["q1"], [1.0, 0.0])
    np.testing.assert_array_equal(row["q2"], [1.0, 0.0])
    assert math.isnan(row["q3"][0]) and row["q3"][1] == 0.0
    ids2, m2 = outcome_matrix(records, "t", question_ids=["q3", "zz", "q1"], k=3)
    assert ids2 == ["q3", "zz", "q1"] and m2.shape == (3, 3)
    assert np.isnan(m2[1]).all() and np.isnan(m2[:, 2]).all()
    with pytest.raises(ValueError, match="several card hashes"):
        outcome_matrix([rec("q1", 0, "correct"), rec("q1", 0, "correct", card="other")], "t")


def test_accuracy_is_the_mean_of_per_question_means() -> None:
    m = np.array([[1.0, 0.0], [1.0, np.nan], [np.nan, np.nan], [0.0, 0.0]])
    per_q = question_means(m)
    np.testing.assert_allclose(per_q, [0.5, 1.0, 0.0])
    mean, se, ci = mean_stderr_ci(per_q)
    assert mean == pytest.approx(0.5)  # not 2/5 (pooled samples)
    assert se == pytest.approx(np.std([0.5, 1.0, 0.0], ddof=1) / math.sqrt(3))
    assert ci == pytest.approx([max(0.0, 0.5 - 1.959964 * se), min(1.0, 0.5 + 1.959964 * se)], abs=1e-6)  # clipped
    assert mean_stderr_ci(np.array([0.4])) == (0.4, None, None)
    assert mean_stderr_ci(np.array([])) == (None, None, None)


def test_stderr_equals_the_sample_level_clustered_estimator_when_balanced() -> None:
    rng = np.random.default_rng(0)
    m = (rng.random((30, 8)) < rng.random((30, 1))).astype(float)
    _, se, _ = mean_stderr_ci(question_means(m))
    x, n_clusters = m.ravel(), m.shape[0]
    grand = x.mean()
    cluster_sums = ((m - grand).sum(axis=1)) ** 2
    clustered = math.sqrt(n_clusters / (n_clusters - 1) * cluster_sums.sum()) / x.size
    assert se == pytest.approx(clustered)


def test_unbiased_pass_at_k_matches_brute_force() -> None:
    m = np.array([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=float)
    for k in range(1, 6):
        brute = np.mean([np.mean([max(row[list(c)]) for c in itertools.combinations(range(5), k)]) for row in m])
        assert pass_at_k(m, k) == pytest.approx(brute)
    assert pass_at_k(m, 1) == pytest.approx(question_means(m).mean())
    with_missing = np.array([[1.0, np.nan, np.nan], [np.nan, np.nan, np.nan]])
    assert pass_at_k(with_missing, 3) == 1.0  # a question with fewer samples uses its own n; empty rows skipped


def test_consensus_votes_ignore_unanswered_and_break_ties_by_first_seen() -> None:
    answers = [["5", "5", "7", None], ["3", "4", None, None], [None, None, None, None], ["1", "2", "2", "1"]]
    m = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=float)
    # q1: 5 wins (correct); q2: tie 3/4 -> 3 seen first (wrong); q3: nobody answered (wrong); q4: tie -> 1 (wrong)
    assert consensus_at_k(answers, m) == pytest.approx(1 / 4)
    assert consensus_at_k([[None, None]], np.array([[np.nan, np.nan]])) is None


def test_summarize_task_follows_the_summary_contract() -> None:
    records = [rec("a", 0, "correct", "5", 100, level="1"), rec("a", 1, "wrong", "6", 200, level="1"),
               rec("b", 0, "truncated", None, 1000, level="2"), rec("b", 1, "error", None, None, level="2"),
               rec("c", 0, "no_answer", None, 50, level="2"), rec("c", 1, "correct", "9", 150, level="2"),
               rec("zzz", 0, "correct", "1", 1, card="stale")]  # another protocol: ignored
    summary, details = summarize_task(records, task="t", card_hash="h", question_ids=["a", "b", "c"], samples=2)
    assert set(summary) == SUMMARY_KEYS
    assert summary["n_questions"] == 3 and summary["samples"] == 2
    assert summary["accuracy"] == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert summary["truncation_rate"] == pytest.approx(1 / 6)
    assert summary["no_answer_rate"] == pytest.approx(1 / 6)
    assert summary["error_rate"] == pytest.approx(1 / 6)
    assert summary["completion_tokens"]["mean"] == pytest.approx((100 + 200 + 1000 + 50 + 150) / 5)
    assert summary["completion_tokens"]["p50"] == 150
    assert summary["pass_at_k"] == pytest.approx(2 / 3)
    assert details["outcomes"] == {"correct": 2, "wrong": 1, "no_answer": 1, "truncated": 1, "error": 1}
    assert details["breakdown"]["level"]["1"] == {"n_questions": 1, "accuracy": 0.5, "stderr": None}
    assert details["breakdown"]["level"]["2"]["n_questions"] == 2
    assert 0.0 <= summary["ci95"][0] <= summary["accuracy"] <= summary["ci95"][1] <= 1.0
