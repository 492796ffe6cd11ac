"""Candidate-vs-baseline comparison of one run's tasks: the numbers in comparison.json, as pure functions.

Input per side and task is a `SideOutcomes` (question ids plus (n, k) outcome, truncation and error arrays),
built from journal records by `evalpipe.outcomes.side_outcomes`. Questions are paired by id; only questions present on both
sides enter the comparison, so a stored baseline with more questions or samples than a CI run still pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from evalpipe.adaptive import AdaptiveDesign, Look, adjusted_inference, allocation, replay
from evalpipe.metrics import mean_stderr_ci
from evalpipe.outcomes import SideOutcomes
from evalpipe.stats import (
    PairedDiff,
    Verdict,
    VerdictName,
    noninferiority_of,
    paired_difference_of_means,
    per_question,
)

# A question counts as solved by a side when more than half of its samples are correct (majority vote).
SOLVED_FRACTION = 0.5


@dataclass(frozen=True)
class SideStats:
    """One side on the paired questions: accuracy and its standard error clustered by question."""

    accuracy: float | None
    stderr: float | None
    n_questions: int
    truncation_rate: float
    error_rate: float
    samples: float  # mean samples per question with data

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "stderr": self.stderr,
            "truncation_rate": self.truncation_rate,
            "error_rate": self.error_rate,
            "n_questions": self.n_questions,
            "samples": self.samples,
        }


def _side_stats(side: SideOutcomes, paired_means: np.ndarray, paired_counts: np.ndarray) -> SideStats:
    samples = float(paired_counts.mean()) if paired_counts.size else 0.0
    accuracy, stderr, _ = mean_stderr_ci(paired_means)
    return SideStats(accuracy, stderr, int(paired_means.size), side.rate(side.truncated), side.rate(side.errored),
                     samples)


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
    sequential: dict | None = None  # an adaptive task's group-sequential design, looks and adjusted inference
    # candidate - baseline of the per-question share of samples NOT truncated (negative: the candidate truncates
    # more); the gate's truncation test runs on it. None when nothing pairs.
    truncation: PairedDiff | None = None

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
            **({"sequential": self.sequential} if self.sequential is not None else {}),
            "truncation_increase": _truncation_increase(self.truncation),
        }


def _truncation_increase(diff: PairedDiff | None) -> dict | None:
    """The paired truncation-rate difference, candidate - baseline (positive: the candidate truncates more)."""
    if diff is None:
        return None
    return {"delta": _number(-diff.delta), "stderr": _number(diff.stderr),
            "ci95": _interval((-diff.ci95[1], -diff.ci95[0])), "n": diff.n_questions}


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
    looks: Sequence[Look] = (),
) -> TaskComparison:
    """Pair the two sides by question id and compute every comparison.json number for one task.

    An adaptive task (design given) is decided by its group-sequential design on `looks`, the looks the
    procedure took on these outcomes (the sides already cut to the last look's samples); its p-value, bounds and
    95% interval are the ones adjusted for the looks (see evalpipe.adaptive), the unadjusted ones are kept in
    the `sequential` section. Side accuracies are over the paired questions, so their difference is delta.
    """
    base_ids = set(baseline.question_ids)
    shared = [qid for qid in candidate.question_ids if qid in base_ids]
    unpaired = {"candidate_only": len(candidate.question_ids) - len(shared), "baseline_only": len(base_ids) - len(shared)}
    cand, base = candidate.take(shared), baseline.take(shared)
    cand_means, cand_counts = per_question(cand.correct, "candidate")
    base_means, base_counts = per_question(base.correct, "baseline")
    # Before an adaptive task's first look is complete nothing may be decided beyond what that look could.
    test_alpha = alpha if design is None else design.nominal_levels(alpha)[len(looks) - 1 if looks else 0]
    with_data = ~np.isnan(cand_means) & ~np.isnan(base_means)
    if with_data.any():
        diff = paired_difference_of_means(cand_means, base_means, cand_counts, base_counts)
        test, ci95 = noninferiority_of(diff, margin, test_alpha), diff.ci95
    else:
        test, ci95 = _no_data_verdict(margin, test_alpha), (-math.inf, math.inf)
    sequential = None
    if design is not None:
        sequential = sequential_section(design, looks, margin, alpha)
        if looks and math.isfinite(looks[-1].diff.stderr):
            adjusted = sequential["adjusted"]
            test = Verdict(test.delta, test.stderr, _bound(adjusted["lower"], -math.inf),
                           _bound(adjusted["upper"], math.inf), adjusted["p_value"], looks[-1].verdict.verdict,
                           margin, alpha, test.n_questions)
            ci95 = (_bound(adjusted["ci95"][0], -math.inf), _bound(adjusted["ci95"][1], math.inf))
    paired_ids = tuple(qid for qid, ok in zip(shared, with_data, strict=True) if ok)
    baseline_only, candidate_only = _flipped(paired_ids, cand_means[with_data], base_means[with_data])
    completed = with_data & ~cand.truncated.any(axis=1) & ~base.truncated.any(axis=1)
    both = None
    if completed.any():
        both = paired_difference_of_means(
            cand_means[completed], base_means[completed], cand_counts[completed], base_counts[completed]
        )
    truncation = None
    if with_data.any():
        cand_done, _ = per_question(completed_samples(cand), "candidate")
        base_done, _ = per_question(completed_samples(base), "baseline")
        truncation = paired_difference_of_means(cand_done[with_data], base_done[with_data], cand_counts[with_data],
                                                base_counts[with_data])
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
        sequential=sequential,
        truncation=truncation,
    )


def _bound(value: float | None, infinite: float) -> float:
    return infinite if value is None else value


def sequential_section(design: AdaptiveDesign, looks: Sequence[Look], margin: float, alpha: float) -> dict:
    """comparison.json's `sequential` section of an adaptive task: the design, each look taken and, at the look
    it stopped at, the inference adjusted for the looks next to the unadjusted one."""
    last = looks[-1] if looks else None
    adjusted = adjusted_inference(looks, design, margin, alpha) if last is not None else None
    return {
        "design": {"min_samples": design.min_samples, "max_samples": design.max_samples,
                   "baseline_adaptive": design.baseline_adaptive, "spending": design.spending,
                   "looks": list(design.looks), "pass_boundary_z": [round(c, 6) for c in design.boundaries(alpha)],
                   "fail_boundary_z": [round(-c, 6) for c in design.boundaries(alpha)],
                   "nominal_levels": list(design.nominal_levels(alpha))},
        "looks_taken": [{"k": look.k, "delta": _number(look.diff.delta), "stderr": _number(look.diff.stderr),
                         "nominal_p_value": look.verdict.p_value, "nominal_level": look.verdict.alpha,
                         "verdict": look.verdict.verdict} for look in looks],
        "stopped_at": last.k if last is not None else None,
        "ordering": "stagewise",
        "adjusted": adjusted.to_dict() if adjusted is not None else None,
        "unadjusted": ({"p_value": last.verdict.p_value, "ci95": _interval(last.diff.ci95)}
                       if last is not None else None),
    }


def completed_samples(side: SideOutcomes) -> np.ndarray:
    """(n, k): 1.0 where a sample finished within max_tokens, 0.0 where it was truncated, NaN where it has no
    outcome (errored or never issued), the same missing pattern as `correct`."""
    return np.where(np.isnan(side.correct), np.nan, (~side.truncated).astype(float))


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


class IncomparableError(ValueError):
    """Two sides' results must not be compared; the message lists every differing setting."""


@dataclass(frozen=True)
class TaskResult:
    """One task of one side (a finished run or a stored baseline), as the comparison needs it."""

    card_hash: str
    sampling: Mapping[str, object]  # the settings that must agree: temperature, top_p, max_tokens
    outcomes: SideOutcomes
    adaptive: tuple[int, int, str] | None = None  # (min_samples, max_samples, spending) with samples: auto

    def settings(self) -> dict[str, object]:
        return {"card_hash": self.card_hash, **self.sampling}


def _replayed(
    cand: SideOutcomes, base: SideOutcomes, design: AdaptiveDesign, margin: float, alpha: float
) -> tuple[SideOutcomes, SideOutcomes, tuple[Look, ...]]:
    """Both sides restricted to the samples the adaptive procedure used at its last complete look, and the
    looks it took."""
    shared = [qid for qid in cand.question_ids if qid in set(base.question_ids)]
    width = max(design.max_samples, cand.correct.shape[1])
    cand = cand.reindex(shared, width)
    base = base.reindex(shared, width) if design.baseline_adaptive else base.take(shared)
    progress = replay(cand.correct, cand.issued, base.correct, base.issued, design, margin, alpha)
    if progress.look is None:
        return cand, base, ()
    keep = allocation(len(shared), cand.correct.shape[1], progress.look.k)
    return cand.restrict(keep), base.restrict(keep) if design.baseline_adaptive else base, progress.looks


def setting_differences(candidate: Mapping[str, TaskResult], baseline: Mapping[str, TaskResult]) -> list[str]:
    """comparability_problems of two sides' task results."""
    return comparability_problems(
        {task: result.settings() for task, result in candidate.items()},
        {task: result.settings() for task, result in baseline.items()},
    )


def compare_sides(
    candidate: Mapping[str, TaskResult],
    baseline: Mapping[str, TaskResult],
    margin_alpha: Callable[[str], tuple[float, float]],
    force: bool = False,
) -> dict[str, TaskComparison]:
    """Compare every task both sides have; refuse (IncomparableError) when protocols or sampling differ, unless
    `force` (the caller records setting_differences with the result).

    An adaptively sampled candidate task is replayed to its last complete look, so a finished, resumed or
    stored run gives the same comparison; the baseline counts as adaptive when it was sampled that way too.
    """
    problems = setting_differences(candidate, baseline)
    if problems and not force:
        raise IncomparableError("results are not comparable: " + "; ".join(problems))
    comparisons = {}
    for task, result in candidate.items():
        if task not in baseline:
            continue
        margin, alpha = margin_alpha(task)
        cand, base = result.outcomes, baseline[task].outcomes
        design, looks = None, ()
        if result.adaptive is not None:
            design = AdaptiveDesign(*result.adaptive, baseline_adaptive=baseline[task].adaptive is not None)
            cand, base, looks = _replayed(cand, base, design, margin, alpha)
        comparisons[task] = compare_task(task, cand, base, margin, alpha, design, looks)
    return comparisons
