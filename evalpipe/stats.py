"""Paired comparison, non-inferiority test and power planning for repeated-sample evaluations.

Pure functions on plain arrays (numpy/scipy only). An outcome matrix has shape (n_questions, k): 1.0 correct,
0.0 not correct, NaN missing (an errored or never-issued sample). Rows of the candidate and baseline matrices
are the same questions in the same order; k may differ between the sides and, through NaN, between questions.

Design choices (why, briefly):

* **Unit of analysis is the question.** Each side is reduced to its per-question mean over available
  samples; the paired difference d_i = c_i - b_i removes between-question difficulty (Miller 2024).
  A question missing on either side (all NaN) is dropped from the pairing.
* **Student t with n-1 degrees of freedom**, n = paired questions. The standard error is estimated from the
  same n differences, and n is small for AIME24 (30); t keeps the nominal level there and equals the
  normal quantile for large n.
* **Standard-error floor.** With few or no discordant outcomes (both sides all correct, or identical
  greedy answers) the sample sd is zero or tiny and a normal bound would "pass" any margin. The sum of
  squared differences is floored at what it would be had two samples on each side gone the other way
  (``2/k_c**2 + 2/k_b**2``). With zero discordances this makes a pass require margin > ~3.4/(n k), in line
  with the rule of three for zero events; with real spread in the data the floor is inactive and
  stderr = sd(d)/sqrt(n) exactly. The floor is in the test, so it is in the power planning too.
* **Margin** is an absolute difference in accuracy, as a fraction (0.05 = 5 points), >= 0. The candidate is
  non-inferior when its true accuracy is above baseline - margin: "pass" needs the one-sided lower bound of
  delta above -margin, "fail" needs the one-sided upper bound below -margin, anything else is
  "inconclusive". margin = 0 turns the test into a one-sided superiority test.
* **Variance split for planning** (Miller 2024): a sample's variance around the overall mean is
  between-question Var(p_i) plus within-question E[p_i (1 - p_i)]. In the paired design with no true
  difference the between part cancels and Var(d_i) = within / k_c + within / k_b. The within part is
  estimated without bias from baseline per-question counts (x (k - x) / (k (k - 1)) per question); with one
  sample per question the split is unidentifiable and all variance is attributed to within (conservative);
  with no data the worst case 0.25 is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

VerdictName = Literal["pass", "fail", "inconclusive"]

# Pseudo-discordant samples per side that floor the sum of squared per-question differences (see module doc).
FLOOR_DISCORDANT_SAMPLES = 2


def outcome_array(values: ArrayLike, name: str = "outcomes") -> np.ndarray:
    """Validate and shape outcomes as an (n_questions, k) float array; a 1-D input is one sample per question."""
    array = np.asarray(values, dtype=float)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{name}: expected an (n_questions, k) array, got shape {array.shape}")
    finite = array[~np.isnan(array)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        raise ValueError(f"{name}: outcomes must lie in [0, 1] or be NaN")
    return array


def _row_means_and_counts(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = np.sum(~np.isnan(array), axis=1)
    sums = np.nansum(array, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    return means, counts


def _floor_sum_of_squares(k_candidate: float, k_baseline: float) -> float:
    return FLOOR_DISCORDANT_SAMPLES * (1.0 / k_candidate**2 + 1.0 / k_baseline**2)


@dataclass(frozen=True)
class PairedDiff:
    """Mean paired difference candidate - baseline over questions with data on both sides."""

    delta: float
    stderr: float
    ci95: tuple[float, float]
    n_questions: int
    df: int
    candidate_accuracy: float
    baseline_accuracy: float
    floored: bool  # True when the standard-error floor was active


@dataclass(frozen=True)
class Verdict:
    """Non-inferiority decision; lower/upper are one-sided (1 - alpha) bounds on delta."""

    delta: float
    stderr: float
    lower: float
    upper: float
    p_value: float  # one-sided, for H0: delta <= -margin
    verdict: VerdictName
    margin: float
    alpha: float
    n_questions: int


def _t_quantile(probability: float, df: int) -> float:
    # scipy.special directly: the same values as scipy.stats.t at a fraction of the call overhead
    return float(special.stdtrit(df, probability))


def per_question(outcomes: ArrayLike, name: str = "outcomes") -> tuple[np.ndarray, np.ndarray]:
    """Per-question mean over available samples (NaN where none) and the number of available samples."""
    return _row_means_and_counts(outcome_array(outcomes, name))


def paired_difference(candidate: ArrayLike, baseline: ArrayLike) -> PairedDiff:
    """delta = mean_i(c_i - b_i), stderr = sd(d_i)/sqrt(n) (floored, see module doc), two-sided 95% t CI.

    With a single paired question the standard error is infinite (nothing can be estimated); with none,
    ValueError.
    """
    cand_means, cand_counts = per_question(candidate, "candidate")
    base_means, base_counts = per_question(baseline, "baseline")
    return paired_difference_of_means(cand_means, base_means, cand_counts, base_counts)


def paired_difference_of_means(
    cand_means: np.ndarray, base_means: np.ndarray, cand_counts: np.ndarray, base_counts: np.ndarray
) -> PairedDiff:
    """paired_difference on per-question estimates (NaN: no data); counts are samples per question (floor)."""
    if cand_means.shape != base_means.shape:
        raise ValueError(f"candidate has {cand_means.size} questions, baseline {base_means.size}: rows must pair")
    paired = ~np.isnan(cand_means) & ~np.isnan(base_means)
    n = int(paired.sum())
    if n == 0:
        raise ValueError("no question has outcomes on both sides")
    diffs = cand_means[paired] - base_means[paired]
    delta = float(diffs.mean())
    cand_acc = float(cand_means[paired].mean())
    base_acc = float(base_means[paired].mean())
    if n < 2:
        return PairedDiff(delta, math.inf, (-math.inf, math.inf), n, 0, cand_acc, base_acc, floored=False)
    floor = _floor_sum_of_squares(float(cand_counts[paired].mean()), float(base_counts[paired].mean()))
    row_delta, row_stderr, row_floored = _row_stderr(diffs[None, :], floor)
    delta, stderr, floored = float(row_delta[0]), float(row_stderr[0]), bool(row_floored[0])
    half = _t_quantile(0.975, n - 1) * stderr
    return PairedDiff(delta, stderr, (delta - half, delta + half), n, n - 1, cand_acc, base_acc, floored)


def _row_stderr(diffs: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of (rows, n) paired differences (n >= 2, no NaN): mean, floored standard error, floor active.

    The one computation behind paired_difference_of_means (one row) and noninferiority_rows (one row per
    simulated run), so the operating-characteristics simulator runs the shipped arithmetic.
    """
    n = diffs.shape[1]
    delta = diffs.mean(axis=1)
    sum_sq = np.sum((diffs - delta[:, None]) ** 2, axis=1)
    floored = sum_sq < floor
    stderr = np.sqrt(np.maximum(sum_sq, floor) / (n - 1) / n)
    return delta, stderr, floored


def decide(lower: float, upper: float, margin: float) -> VerdictName:
    """The three-way non-inferiority rule on one-sided bounds."""
    return str(decide_rows(np.asarray(lower), np.asarray(upper), margin))  # type: ignore[return-value]


def decide_rows(lower: np.ndarray, upper: np.ndarray, margin: float) -> np.ndarray:
    """decide() elementwise: an array of verdict names."""
    return np.where(lower > -margin, "pass", np.where(upper < -margin, "fail", "inconclusive"))


def _check_level(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")


def noninferiority(candidate: ArrayLike, baseline: ArrayLike, margin: float, alpha: float = 0.05) -> Verdict:
    """One-sided non-inferiority test of candidate vs baseline at level alpha with an absolute margin."""
    return noninferiority_of(paired_difference(candidate, baseline), margin, alpha)


def noninferiority_of(diff: PairedDiff, margin: float, alpha: float = 0.05) -> Verdict:
    """The non-inferiority test on an already computed paired difference."""
    if not margin >= 0.0:
        raise ValueError(f"margin must be a non-negative fraction, got {margin}")
    _check_level("alpha", alpha)
    if diff.df == 0:
        return Verdict(diff.delta, diff.stderr, -math.inf, math.inf, 1.0, "inconclusive", margin, alpha, 1)
    lower, upper = _one_sided_bounds(diff.delta, diff.stderr, diff.df, alpha)
    p_value = float(special.stdtr(diff.df, -(diff.delta + margin) / diff.stderr))
    return Verdict(
        diff.delta, diff.stderr, lower, upper, p_value, decide(lower, upper, margin), margin, alpha, diff.n_questions
    )


def _one_sided_bounds(delta, stderr, df: int, alpha: float):
    half = _t_quantile(1.0 - alpha, df) * stderr
    return delta - half, delta + half


@dataclass(frozen=True)
class RowsVerdict:
    """noninferiority_rows' result: one entry per row (simulated run)."""

    delta: np.ndarray
    stderr: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    verdict: np.ndarray  # verdict names


def noninferiority_rows(
    cand_means: np.ndarray, base_means: np.ndarray, k_candidate: float, k_baseline: float, margin: float,
    alpha: float = 0.05,
) -> RowsVerdict:
    """noninferiority_of(paired_difference_of_means(...)) for many runs of one design at once: (rows, n)
    per-question means with every question paired (no NaN), n >= 2, samples per question k on each side.

    Used by the operating-characteristics simulator (evalpipe.operating); tests check it against the scalar path.
    """
    if not margin >= 0.0:
        raise ValueError(f"margin must be a non-negative fraction, got {margin}")
    _check_level("alpha", alpha)
    diffs = np.asarray(cand_means, dtype=float) - np.asarray(base_means, dtype=float)
    if diffs.ndim != 2 or diffs.shape[1] < 2:
        raise ValueError(f"expected (rows, n >= 2) per-question means, got shape {diffs.shape}")
    delta, stderr, _ = _row_stderr(diffs, _floor_sum_of_squares(float(k_candidate), float(k_baseline)))
    lower, upper = _one_sided_bounds(delta, stderr, diffs.shape[1] - 1, alpha)
    return RowsVerdict(delta, stderr, lower, upper, decide_rows(lower, upper, margin))


@dataclass(frozen=True)
class VarianceComponents:
    """Per-sample outcome variance split into between-question and within-question parts (Miller 2024)."""

    mean: float  # average success probability
    between: float  # Var_i(p_i): spread of true per-question success probabilities
    within: float  # E_i[p_i (1 - p_i)]: Bernoulli noise of one sample, averaged over questions
    source: str  # where the numbers come from, for reports

    @property
    def total(self) -> float:
        return self.between + self.within


WORST_CASE = VarianceComponents(mean=0.5, between=0.0, within=0.25, source="worst case (p = 0.5)")


def variance_components(outcomes: ArrayLike) -> VarianceComponents:
    """Estimate the between/within split from one side's per-question outcomes (usually the baseline's).

    Within uses the unbiased per-question estimate x (k - x) / (k (k - 1)) on questions with k >= 2; between is
    Var(p_hat_i) minus the mean sampling variance within_i / k_i, clipped at 0. With only one sample per
    question the split is not identifiable: everything is attributed to within (the conservative choice).
    """
    array = outcome_array(outcomes, "outcomes")
    means, counts = _row_means_and_counts(array)
    present = counts > 0
    if not present.any():
        return WORST_CASE
    means, counts = means[present], counts[present]
    overall = float(means.mean())
    multi = counts >= 2
    if not multi.any():
        return VarianceComponents(overall, 0.0, overall * (1.0 - overall), "baseline (1 sample: no split)")
    successes = means * counts
    within_i = successes[multi] * (counts[multi] - successes[multi]) / (counts[multi] * (counts[multi] - 1))
    within = float(within_i.mean())
    spread = float(means.var(ddof=1)) if means.size > 1 else 0.0
    between = max(0.0, spread - float(np.mean(within_i / counts[multi])))
    return VarianceComponents(overall, between, within, "baseline per-question outcomes")


def paired_stderr(
    n_questions: int, k_candidate: int, k_baseline: int, components: VarianceComponents = WORST_CASE
) -> float:
    """Expected standard error of delta for a design, with the test's floor applied, when the candidate is as
    good as the baseline on every question (the alternative non-inferiority power is computed at)."""
    if n_questions < 2:
        return math.inf
    omega2 = components.within / k_candidate + components.within / k_baseline
    floor = _floor_sum_of_squares(k_candidate, k_baseline) / (n_questions - 1)
    return math.sqrt(max(omega2, floor) / n_questions)


def minimum_detectable_effect(
    n_questions: int,
    k_candidate: int,
    k_baseline: int | None = None,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    components: VarianceComponents = WORST_CASE,
) -> float:
    """Smallest margin the design certifies ("pass") with probability `power` when there is no true difference.

    Equivalently the smallest true drop a one-sided level-alpha test detects with that power. Computed as
    (t_{1-alpha} + t_{power}) * expected stderr with n-1 degrees of freedom. k_baseline defaults to k_candidate.
    """
    _check_level("alpha", alpha)
    _check_level("power", power)
    if n_questions < 2:
        return math.inf
    k_base = k_candidate if k_baseline is None else k_baseline
    df = n_questions - 1
    se = paired_stderr(n_questions, k_candidate, k_base, components)
    return (_t_quantile(1.0 - alpha, df) + _t_quantile(power, df)) * se


def questions_needed(
    margin: float,
    variance: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    max_questions: int = 1_000_000,
) -> int | None:
    """Smallest number of questions (one sample per question on each side) whose one-sided level-alpha test
    passes at `margin` with probability `power` when candidate and baseline are equally good.

    variance: of one question's paired difference c_i - b_i. For deterministic answers (log-likelihood or
    greedy) that is the share of questions the two sides answer differently (at no true difference); two
    independently sampled sides give 2 p (1 - p). None when even max_questions is not enough.
    """
    if not margin > 0.0:
        raise ValueError(f"margin must be positive for planning, got {margin}")
    if not 0.0 <= variance <= 1.0:
        raise ValueError(f"variance of a paired 0/1 difference is in [0, 1], got {variance}")
    _check_level("alpha", alpha)
    _check_level("power", power)
    floor = _floor_sum_of_squares(1, 1)

    def detectable(n: int) -> float:  # the test's floored standard error, as paired_stderr applies it
        se = math.sqrt(max(variance, floor / (n - 1)) / n)
        return (_t_quantile(1.0 - alpha, n - 1) + _t_quantile(power, n - 1)) * se

    return _smallest_reaching(detectable, margin, 2, max_questions)


def samples_needed(
    n_questions: int,
    margin: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    components: VarianceComponents = WORST_CASE,
    k_baseline: int | None = None,
    max_samples: int = 1024,
) -> int | None:
    """Smallest samples per question on the candidate side whose minimum detectable effect is <= margin.

    With k_baseline None both sides take the same k (a live baseline); with a fixed k_baseline (a stored
    baseline) only the candidate's k varies. None when even max_samples is not enough.
    """
    if not margin > 0.0:
        raise ValueError(f"margin must be positive for planning, got {margin}")

    def detectable(k: int) -> float:
        return minimum_detectable_effect(
            n_questions, k, k if k_baseline is None else k_baseline, alpha=alpha, power=power, components=components
        )

    return _smallest_reaching(detectable, margin, 1, max_samples)


def _smallest_reaching(detectable: Callable[[int], float], margin: float, low: int, high: int) -> int | None:
    """The smallest count in [low, high] whose detectable effect is <= margin (detectable falls as the count
    grows, so bisect); None when even `high` does not reach it."""
    if detectable(high) > margin:
        return None
    while low < high:
        mid = (low + high) // 2
        if detectable(mid) <= margin:
            high = mid
        else:
            low = mid + 1
    return low
