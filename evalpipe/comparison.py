"""Candidate-vs-baseline comparison of one run's tasks: the numbers in comparison.json, as pure functions.

Input per side and task is a `SideOutcomes` (question ids plus (n, k) outcome, truncation and error arrays),
built from journal records by `side_outcomes`. Questions are paired by id; only questions present on both
sides enter the comparison, so a stored baseline with more questions or samples than a CI run still pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from evalpipe.records import SampleRecord
from evalpipe.adaptive import AdaptiveDesign, unbiased_question_means
from evalpipe.stats import (
    Accuracy,
    PairedDiff,
    Verdict,
    VerdictName,
    accuracy_of_means,
    noninferiority_of,
    paired_difference_of_means,
    question_means,
)

# A question counts as solved by a side when more than half of its samples are correct (majority vote).
SOLVED_FRACTION = 0.5


@dataclass(frozen=True)
class SideOutcomes:
    """One side of one task. correct: 1.0 / 0.0 / NaN (error or never issued); flags are False where NaN."""

    question_ids: tuple[str, ...]
    correct: np.ndarray  # (n, k) float
    truncated: np.ndarray  # (n, k) bool
    errored: np.ndarray  # (n, k) bool

    def take(self, question_ids: Iterable[str]) -> SideOutcomes:
        index = {qid: i for i, qid in enumerate(self.question_ids)}
        rows = [index[qid] for qid in question_ids]
        return SideOutcomes(
            tuple(self.question_ids[i] for i in rows), self.correct[rows], self.truncated[rows], self.errored[rows]
        )

    @property
    def issued(self) -> np.ndarray:
        """(n, k) bool: a record exists for the sample (answered or errored)."""
        return ~np.isnan(self.correct) | self.errored

    def rate(self, flags: np.ndarray) -> float:
        issued = int(self.issued.sum())
        return float(flags.sum()) / issued if issued else 0.0


def side_outcomes(records: Iterable[SampleRecord]) -> dict[str, SideOutcomes]:
    """Per task, the outcome arrays of a side's journal records; questions in sorted id order.

    A record whose outcome is "error" is missing for accuracy (NaN) and flagged as errored. A later record
    for the same (question, sample) replaces an earlier one.
    """
    latest: dict[str, dict[tuple[str, int], SampleRecord]] = {}
    for record in records:
        latest.setdefault(record.task, {})[(record.question_id, record.sample_index)] = record
    sides = {}
    for task, by_key in latest.items():
        question_ids = tuple(sorted({qid for qid, _ in by_key}))
        row = {qid: i for i, qid in enumerate(question_ids)}
        k = 1 + max(index for _, index in by_key)
        correct = np.full((len(question_ids), k), np.nan)
        truncated = np.zeros(correct.shape, dtype=bool)
        errored = np.zeros(correct.shape, dtype=bool)
        for (qid, index), record in by_key.items():
            cell = (row[qid], index)
            if record.outcome == "error":
                errored[cell] = True
                continue
            correct[cell] = 1.0 if record.outcome == "correct" else 0.0
            truncated[cell] = record.outcome == "truncated" or record.finish_reason == "length"
        sides[task] = SideOutcomes(question_ids, correct, truncated, errored)
    return sides


@dataclass(frozen=True)
class SideStats:
    accuracy: Accuracy
    truncation_rate: float
    error_rate: float
    samples: float  # mean samples per question with data

    def to_dict(self) -> dict:
        return {
            "accuracy": _number(self.accuracy.mean),
            "stderr": _number(self.accuracy.stderr),
            "truncation_rate": self.truncation_rate,
            "error_rate": self.error_rate,
            "n_questions": self.accuracy.n_questions,
            "samples": self.samples,
        }


def _side_stats(side: SideOutcomes, paired_means: np.ndarray, paired_counts: np.ndarray) -> SideStats:
    samples = float(paired_counts.mean()) if paired_counts.size else 0.0
    return SideStats(accuracy_of_means(paired_means), side.rate(side.truncated), side.rate(side.errored), samples)


@dataclass(frozen=True)
class TaskComparison:
    task: str
    candidate: SideStats
    baseline: SideStats
    test: Verdict
    ci95: tuple[float, float]
    flipped_baseline_only: tuple[str, ...]  # solved by the baseline only, largest loss first
    flipped_candidate_only: tuple[str, ...]  # solved by the candidate only, largest gain first
    both_completed: PairedDiff | None  # the comparison on questions where no sample truncated on either side
    unpaired: dict[str, int]  # questions present on one side only

    @property
    def verdict(self) -> VerdictName:
        return self.test.verdict

    def to_dict(self) -> dict:
        both = self.both_completed
        return {
            "candidate": self.candidate.to_dict(),
            "baseline": self.baseline.to_dict(),
            "delta": _number(self.test.delta),
            "stderr": _number(self.test.stderr),
            "ci95": _interval(self.ci95),
            "lower": _number(self.test.lower),
            "upper": _number(self.test.upper),
            "p_value": self.test.p_value,
            "margin": self.test.margin,
            "alpha": self.test.alpha,
            "n_questions": self.test.n_questions,
            "verdict": self.test.verdict,
            "flipped": {
                "baseline_only": list(self.flipped_baseline_only),
                "candidate_only": list(self.flipped_candidate_only),
            },
            "both_completed": {
                "delta": _number(both.delta) if both else None,
                "stderr": _number(both.stderr) if both else None,
                "ci95": _interval(both.ci95) if both else None,
                "n": both.n_questions if both else 0,
            },
            "unpaired_questions": dict(self.unpaired),
        }


def _number(value: float) -> float | None:
    """JSON has no NaN or infinity: an undefined number is null."""
    return value if math.isfinite(value) else None


def _interval(bounds: tuple[float, float]) -> list[float | None]:
    return [_number(bounds[0]), _number(bounds[1])]


def _flipped(question_ids: tuple[str, ...], cand_means: np.ndarray, base_means: np.ndarray):
    cand_solved = cand_means > SOLVED_FRACTION
    base_solved = base_means > SOLVED_FRACTION
    diff = cand_means - base_means
    lost = sorted(np.flatnonzero(base_solved & ~cand_solved), key=lambda i: (diff[i], question_ids[i]))
    won = sorted(np.flatnonzero(cand_solved & ~base_solved), key=lambda i: (-diff[i], question_ids[i]))
    return tuple(question_ids[i] for i in lost), tuple(question_ids[i] for i in won)


def _no_data_verdict(margin: float, alpha: float) -> Verdict:
    return Verdict(math.nan, math.inf, -math.inf, math.inf, 1.0, "inconclusive", margin, alpha, 0)


def compare_task(
    task: str,
    candidate: SideOutcomes,
    baseline: SideOutcomes,
    margin: float,
    alpha: float = 0.05,
    design: AdaptiveDesign | None = None,
) -> TaskComparison:
    """Pair the two sides by question id and compute every comparison.json number for one task.

    With an adaptive design the per-question estimates are the unbiased ones and the test runs at the
    per-look alpha (see evalpipe.adaptive). Side accuracies are over the paired questions, so their
    difference is delta.
    """
    base_ids = set(baseline.question_ids)
    shared = [qid for qid in candidate.question_ids if qid in base_ids]
    unpaired = {"candidate_only": len(candidate.question_ids) - len(shared), "baseline_only": len(base_ids) - len(shared)}
    cand, base = candidate.take(shared), baseline.take(shared)
    cand_plain, cand_counts = question_means(cand.correct, "candidate")
    base_plain, base_counts = question_means(base.correct, "baseline")
    if design is None:
        cand_means, base_means, test_alpha = cand_plain, base_plain, alpha
    else:
        cand_means, base_means = unbiased_question_means(cand.correct, base.correct, design)
        test_alpha = design.look_alpha(alpha)
    with_data = ~np.isnan(cand_means) & ~np.isnan(base_means)
    if with_data.any():
        diff = paired_difference_of_means(cand_means, base_means, cand_counts, base_counts)
        test, ci95 = noninferiority_of(diff, margin, test_alpha), diff.ci95
    else:
        test, ci95 = _no_data_verdict(margin, test_alpha), (-math.inf, math.inf)
    paired_ids = tuple(qid for qid, ok in zip(shared, with_data, strict=True) if ok)
    baseline_only, candidate_only = _flipped(paired_ids, cand_plain[with_data], base_plain[with_data])
    completed = with_data & ~cand.truncated.any(axis=1) & ~base.truncated.any(axis=1)
    both = None
    if completed.any():
        both = paired_difference_of_means(
            cand_means[completed], base_means[completed], cand_counts[completed], base_counts[completed]
        )
    return TaskComparison(
        task=task,
        candidate=_side_stats(cand, cand_means[with_data], cand_counts[with_data]),
        baseline=_side_stats(base, base_means[with_data], base_counts[with_data]),
        test=test,
        ci95=ci95,
        flipped_baseline_only=baseline_only,
        flipped_candidate_only=candidate_only,
        both_completed=both,
        unpaired=unpaired,
    )


def overall_verdict(verdicts: Iterable[VerdictName]) -> VerdictName:
    """fail if any task fails, else inconclusive if any is, else pass."""
    names = set(verdicts)
    if "fail" in names:
        return "fail"
    if "inconclusive" in names or not names:
        return "inconclusive"
    return "pass"


def comparison_document(comparisons: Mapping[str, TaskComparison]) -> dict:
    """The comparison.json body (without the gate section, which the gate adds)."""
    return {
        "verdict": overall_verdict(c.verdict for c in comparisons.values()),
        "tasks": {task: comparison.to_dict() for task, comparison in comparisons.items()},
    }


def comparability_problems(
    candidate: Mapping[str, Mapping[str, object]], baseline: Mapping[str, Mapping[str, object]]
) -> list[str]:
    """Why two runs must not be compared: per shared task, each differing setting as 'task.field: a vs b'.

    Arguments map task -> settings that must agree (card_hash and the sampling settings). Tasks present on
    one side only are not a problem here (they are simply not compared); no shared task at all is.
    """
    shared = [task for task in candidate if task in baseline]
    if not shared:
        return [f"no task in common (candidate: {sorted(candidate)}, baseline: {sorted(baseline)})"]
    problems = []
    for task in shared:
        for field in sorted(set(candidate[task]) | set(baseline[task])):
            mine, theirs = candidate[task].get(field), baseline[task].get(field)
            if mine != theirs:
                problems.append(f"{task}.{field}: candidate {mine!r}, baseline {theirs!r}")
    return problems
