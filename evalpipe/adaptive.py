"""Adaptive sampling (`samples: auto`): more samples only where they carry information, without bias (pure).

Design. Every question gets `min_samples` samples on each side (the first stage). A question whose first-stage
outcomes are mixed (some correct, some not) on either side is *extended*; only extended questions get more
samples, in looks at k = min, 2 min, 4 min, ... up to `max_samples` (sample indices are fixed, so seeds are
deterministic and a resumed run replays the same decisions from its journal). After each look the task stops
when its non-inferiority verdict is decided. Against a stored baseline (sampled in full beforehand) only the
candidate is sampled adaptively, and the baseline counts as mixed over all its samples.

Two corrections keep the test honest:

* **Unbiased per-question estimates.** Extending only mixed questions makes the plain per-question mean
  biased (an unextended question keeps a lucky 4/4, an extended one regresses to its mean), which pulls a real
  drop towards zero: in simulation a true 5-point drop read as 3.3-3.9 points. For an extended question we use
  the Rao-Blackwell estimate E[first-stage mean | totals, extended]: the first-stage count given a side's total
  is hypergeometric, restricted to first-stage patterns that would have been extended. This is the
  conditional expectation of an unbiased estimator, hence unbiased, and nearly as precise as the plain mean
  of all samples.
* **Repeated looks.** Stopping at the first decided look inflates the error rate; each look tests at
  alpha / (number of looks) (Bonferroni), which bounds the overall level by alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike

from evalpipe.stats import PairedDiff, Verdict, noninferiority_of, outcome_array, paired_difference_of_means


@dataclass(frozen=True)
class AdaptiveDesign:
    """How the samples were allocated. baseline_adaptive is False for a stored baseline (sampled in full)."""

    min_samples: int
    max_samples: int
    baseline_adaptive: bool = True

    def __post_init__(self) -> None:
        if self.min_samples < 2:
            raise ValueError("min_samples must be >= 2 (one sample cannot be mixed)")
        if self.max_samples < self.min_samples:
            raise ValueError(f"max_samples ({self.max_samples}) is below min_samples ({self.min_samples})")

    @property
    def looks(self) -> tuple[int, ...]:
        """Samples per extended question at each look: min, 2 min, 4 min, ..., max."""
        ks = [self.min_samples]
        while ks[-1] < self.max_samples:
            ks.append(min(2 * ks[-1], self.max_samples))
        return tuple(ks)

    def look_alpha(self, alpha: float) -> float:
        return alpha / len(self.looks)


def _mixed(outcomes: np.ndarray) -> np.ndarray:
    successes = np.nansum(outcomes, axis=1)
    counts = np.sum(~np.isnan(outcomes), axis=1)
    return (successes > 0) & (successes < counts)


def questions_to_extend(candidate: ArrayLike, baseline: ArrayLike, design: AdaptiveDesign) -> np.ndarray:
    """Questions mixed on either side: in the first stage, or over all samples of a stored baseline."""
    cand = np.asarray(candidate, dtype=float)[:, : design.min_samples]
    base = np.asarray(baseline, dtype=float)
    return _mixed(cand) | _mixed(base[:, : design.min_samples] if design.baseline_adaptive else base)


def _first_stage_pmf(total: int, successes: int, first: int) -> np.ndarray:
    """P(a successes among the first `first` of `total` samples | `successes` in all): hypergeometric."""
    denominator = math.comb(total, successes)
    return np.array([math.comb(first, a) * math.comb(total - first, successes - a) / denominator
                     if 0 <= successes - a <= total - first else 0.0 for a in range(first + 1)])


@lru_cache(maxsize=65536)
def _rao_blackwell(c_counts: tuple[int, int, int, int], b_counts: tuple[int, int, int, int], b_random: bool):
    """E[first-stage means | totals, extended] for (candidate, baseline), or None if the data break the rule.

    *_counts are (first-stage samples, first-stage successes, all samples, all successes). A side that was
    not sampled adaptively (b_random False) has its first stage fixed at what was observed.
    """
    c_first, c_first_succ, c_total, c_succ = c_counts
    b_first, b_first_succ, b_total, b_succ = b_counts  # for a fixed side: first = total
    c_pmf = _first_stage_pmf(c_total, c_succ, c_first)
    b_pmf = _first_stage_pmf(b_total, b_succ, b_first) if b_random else None
    c_a = np.arange(c_first + 1)
    b_a = np.arange(b_first + 1) if b_random else np.array([b_first_succ])
    c_mixed = (c_a > 0) & (c_a < c_first)
    b_mixed = (b_a > 0) & (b_a < b_first)
    extended = c_mixed[:, None] | b_mixed[None, :]
    observed_c, observed_b = c_first_succ, (b_first_succ if b_random else 0)
    if not extended[observed_c, observed_b]:
        return None
    weight = c_pmf[:, None] * (b_pmf[None, :] if b_random else np.ones((1, 1))) * extended
    weight /= weight.sum()
    cand = float(weight.sum(axis=1) @ c_a) / c_first
    base = float(weight.sum(axis=0) @ b_a) / b_first if b_random else b_succ / b_total
    return cand, base


def unbiased_question_means(
    candidate: ArrayLike, baseline: ArrayLike, design: AdaptiveDesign
) -> tuple[np.ndarray, np.ndarray]:
    """Per-question estimates for adaptively sampled outcomes: plain means, Rao-Blackwell where extended.

    A question counts as extended when the candidate (and an adaptive baseline) has any sample beyond the
    first stage. Where the data do not follow the allocation rule (extended although unmixed) the plain means
    are used.
    """
    cand_means, base_means, _, _ = _estimates(candidate, baseline, design)
    return cand_means, base_means


def adaptive_paired_difference(candidate: ArrayLike, baseline: ArrayLike, design: AdaptiveDesign) -> PairedDiff:
    """paired_difference for adaptively sampled outcomes (unbiased per-question estimates)."""
    return paired_difference_of_means(*_estimates(candidate, baseline, design))


def _estimates(candidate: ArrayLike, baseline: ArrayLike, design: AdaptiveDesign):
    """(candidate estimates, baseline estimates, candidate samples, baseline samples) per question."""
    cand = outcome_array(candidate, "candidate")
    base = outcome_array(baseline, "baseline")
    first = design.min_samples
    c_counts = _counts(cand, first)
    b_counts = _counts(base, first if design.baseline_adaptive else base.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        cand_means = c_counts[:, 3] / c_counts[:, 2]
        base_means = b_counts[:, 3] / b_counts[:, 2]
    extended = c_counts[:, 2] > c_counts[:, 0]
    if design.baseline_adaptive:
        extended &= b_counts[:, 2] > b_counts[:, 0]
    extended &= (c_counts[:, 0] > 0) & (b_counts[:, 0] > 0)
    for i in np.flatnonzero(extended):
        estimate = _rao_blackwell(tuple(c_counts[i].tolist()), tuple(b_counts[i].tolist()), design.baseline_adaptive)
        if estimate is not None:
            cand_means[i], base_means[i] = estimate
    return cand_means, base_means, c_counts[:, 2], b_counts[:, 2]


def _counts(outcomes: np.ndarray, first: int) -> np.ndarray:
    """(n, 4) ints per question: first-stage samples, first-stage successes, all samples, all successes."""
    present = ~np.isnan(outcomes)
    filled = np.where(present, outcomes, 0.0)
    return np.stack([
        present[:, :first].sum(axis=1),
        filled[:, :first].sum(axis=1),
        present.sum(axis=1),
        filled.sum(axis=1),
    ], axis=1).astype(int)


@dataclass(frozen=True)
class Look:
    """The state of a task after the look at k samples per extended question."""

    k: int
    diff: PairedDiff
    verdict: Verdict  # at the per-look alpha
    extend: np.ndarray  # (n,) bool: questions that get samples up to next_k
    next_k: int | None  # None: stop (decided, nothing left to extend, or max_samples reached)


def allocation(extend: np.ndarray, width: int, design: AdaptiveDesign, k: int) -> np.ndarray:
    """(n, width) bool: the samples the procedure uses at look k (first stage for all, up to k if extended)."""
    columns = np.arange(width)[None, :]
    return (columns < design.min_samples) | (extend[:, None] & (columns < k))


def _allocated(outcomes: np.ndarray, keep: np.ndarray) -> np.ndarray:
    return np.where(keep, outcomes, np.nan)


def evaluate_look(
    candidate: ArrayLike, baseline: ArrayLike, design: AdaptiveDesign, k: int, margin: float, alpha: float
) -> Look:
    """Decide at look k from the allocated samples only (index < min_samples, or < k on extended questions),
    so a replay from a journal that holds more samples decides the same."""
    if k not in design.looks:
        raise ValueError(f"k={k} is not a look of {design.looks}")
    cand = np.asarray(candidate, dtype=float)
    base = np.asarray(baseline, dtype=float)
    extend = questions_to_extend(cand, base, design)
    cand = _allocated(cand[:, :k], allocation(extend, k, design, k))
    if design.baseline_adaptive:
        base = _allocated(base[:, :k], allocation(extend, k, design, k))
    diff = adaptive_paired_difference(cand, base, design)
    verdict = noninferiority_of(diff, margin, design.look_alpha(alpha))
    later = [look for look in design.looks if look > k]
    stop = verdict.verdict != "inconclusive" or not later or not extend.any()
    return Look(k, diff, verdict, extend, None if stop else later[0])


@dataclass(frozen=True)
class Progress:
    """Where an adaptive task stands given the samples issued so far (replayed from the start)."""

    look: Look | None  # the last look whose samples are all in; None while the first stage is incomplete
    wanted: np.ndarray  # (n, max_samples) bool: the samples the procedure needs now (issued or not)

    @property
    def finished(self) -> bool:
        return self.look is not None and self.look.next_k is None


def replay(
    candidate: ArrayLike,
    candidate_issued: np.ndarray,
    baseline: ArrayLike,
    baseline_issued: np.ndarray,
    design: AdaptiveDesign,
    margin: float,
    alpha: float,
) -> Progress:
    """Replay the looks over the samples issued so far (a record exists, errors included).

    Deterministic in the issued samples' outcomes, so an interrupted and resumed run, or a later `evalpipe gate`,
    reaches the same looks as the uninterrupted run. A look is taken only when every sample it needs was
    issued on each adaptively sampled side.
    """
    cand = np.asarray(candidate, dtype=float)
    base = np.asarray(baseline, dtype=float)
    n, width = cand.shape[0], design.max_samples

    def issued(keep: np.ndarray) -> bool:
        sides = [candidate_issued] + ([baseline_issued] if design.baseline_adaptive else [])
        return all(bool(np.all(_pad(flags, width)[keep])) for flags in sides)

    first = allocation(np.zeros(n, dtype=bool), width, design, design.min_samples)
    if not issued(first):
        return Progress(None, first)
    k = design.min_samples
    while True:
        look = evaluate_look(cand, base, design, k, margin, alpha)
        if look.next_k is None:
            return Progress(look, allocation(look.extend, width, design, k))
        wanted = allocation(look.extend, width, design, look.next_k)
        if not issued(wanted):
            return Progress(look, wanted)
        k = look.next_k


def _pad(flags: np.ndarray, width: int) -> np.ndarray:
    """Issued flags widened (False) or cut to `width` columns."""
    flags = np.asarray(flags, dtype=bool)[:, :width]
    return np.pad(flags, ((0, 0), (0, width - flags.shape[1])))
