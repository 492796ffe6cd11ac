"""Adaptive sampling (`samples: auto`) as a group-sequential design (pure functions on outcome arrays).

Design. The task is looked at after k = min_samples, 2 min, 4 min, ..., max_samples samples of every question
(both sides when the baseline is live; only the candidate against a stored baseline, which was sampled in full
beforehand). Sample indices are fixed, so seeds are deterministic and a resumed run replays the same looks from
its journal. At look j the statistic is the fixed-design paired t test of evalpipe.stats on the samples with
index < k_j: its level at each look is the fixed test's (tests/test_adaptive.py shows it by simulation); the
Rao-Blackwell estimate of the earlier design, which extended only questions with mixed outcomes, is gone: its
t test was anti-conservative (6.2% at alpha 0.05, issue 14).

Boundaries. Two one-sided Lan-DeMets alpha-spending boundaries on the information fraction t_j = k_j / max:
*pass* (non-inferiority shown: P(pass | delta = -margin) <= alpha) and the futility boundary *fail* (a
regression beyond the margin shown: P(fail | delta = -margin) <= alpha), each computed ignoring the other
(non-binding). Between them the task continues; at the last look it is inconclusive. O'Brien-Fleming shape
alpha(t) = 2 - 2 Phi(z_{1-alpha/2} / sqrt t) (spends almost nothing early, keeps the last look near the fixed
test), or Pocock shape alpha ln(1 + (e - 1) t). The boundaries assume the canonical joint distribution of the
looks' z statistics, Corr(Z_j, Z_l) = sqrt(I_j / I_l), with information I_j proportional to k_j. The estimate at
look j is a mean of per-question means over the first k_j samples, so Cov(est_j, est_l) = Var(est_l) for j < l
(the canonical form holds); information grows like 1 / (B + W / k) with B >= 0 the between-question variance
of the true differences, i.e. no faster than k, so the true looks are at least as correlated as assumed and the
boundaries are conservative (Slepian's inequality). The t statistic (n - 1 degrees of freedom) is compared
through its nominal level: look j decides at one-sided level 1 - Phi(c_j).

Inference adjusted for the looks (recorded in comparison.json): stagewise ordering (Jennison & Turnbull 2000,
ch. 8). The p-value for H0: delta <= -margin is P(cross the pass boundary at an earlier look, or reach the
stopping look with a larger statistic), computed with the pass boundary alone; the one-sided bounds and the 95%
interval invert the same orderings in delta (the upper bound with the fail boundary), and the median-unbiased
estimate is where the p-value is 1/2. Hence pass exactly when the adjusted p-value is <= alpha, equivalently
when the adjusted lower bound exceeds -margin, and fail exactly when the adjusted upper bound is below it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special

from evalpipe.stats import PairedDiff, Verdict, noninferiority_of, paired_difference

SpendingShape = Literal["obrien-fleming", "pocock"]
SPENDING_SHAPES: tuple[SpendingShape, ...] = ("obrien-fleming", "pocock")

_MIN_GRID_POINTS = 101  # per look; more when the next increment is small (see _grid_points)
_POINTS_PER_STEP_SD = 4  # grid points per standard deviation of the next look's increment
_GRID_SPAN = 8.0  # standard deviations of the score statistic covered by the grid
_Z_CAP = 40.0  # |z| beyond this is a probability of zero or one in double precision
_SMALLEST_LEVEL = 1e-15  # a look that spends (next to) nothing still needs a level in (0, 1)


@dataclass(frozen=True)
class AdaptiveDesign:
    """How the samples are allocated. baseline_adaptive is False for a stored baseline (sampled in full)."""

    min_samples: int
    max_samples: int
    spending: SpendingShape = "obrien-fleming"
    baseline_adaptive: bool = True

    def __post_init__(self) -> None:
        if self.min_samples < 2:
            raise ValueError("min_samples must be >= 2 (a look needs a within-question spread)")
        if self.max_samples < self.min_samples:
            raise ValueError(f"max_samples ({self.max_samples}) is below min_samples ({self.min_samples})")
        if self.spending not in SPENDING_SHAPES:
            raise ValueError(f"spending must be one of {SPENDING_SHAPES}, got {self.spending!r}")

    @property
    def looks(self) -> tuple[int, ...]:
        """Samples per question at each look: min, 2 min, 4 min, ..., max."""
        ks = [self.min_samples]
        while ks[-1] < self.max_samples:
            ks.append(min(2 * ks[-1], self.max_samples))
        return tuple(ks)

    def boundaries(self, alpha: float) -> tuple[float, ...]:
        """The pass boundary's z critical value at each look (the fail boundary is its mirror image)."""
        return spending_boundaries(self.looks, alpha, self.spending)

    def nominal_levels(self, alpha: float) -> tuple[float, ...]:
        """The one-sided level each look's t test decides at: 1 - Phi(c_j)."""
        return tuple(max(float(special.ndtr(-c)), _SMALLEST_LEVEL) for c in self.boundaries(alpha))

    def look_alpha(self, alpha: float) -> float:
        """The level of the last look's test, which decides whenever the task runs to max_samples (planning)."""
        return self.nominal_levels(alpha)[-1]


def spent_alpha(shape: SpendingShape, alpha: float, fraction: float) -> float:
    """The Lan-DeMets spending function: type I error spent by information fraction `fraction` in [0, 1]."""
    if fraction <= 0.0:
        return 0.0
    fraction = min(fraction, 1.0)
    if shape == "obrien-fleming":
        return float(2.0 * special.ndtr(-special.ndtri(1.0 - alpha / 2.0) / math.sqrt(fraction)))
    return alpha * math.log(1.0 + (math.e - 1.0) * fraction)


def crossing_probability(bounds: Sequence[float], information: Sequence[float]) -> float:
    """P(Z_j >= bounds[j] for some look j) for standard normal Z_j in the canonical joint distribution:
    Z_j = S_j / sqrt(I_j) with S a sum of independent N(0, I_j - I_{j-1}) increments (no drift). Recursive
    numerical integration of S's density over the continuation region (Armitage, McPherson & Rowe 1969)."""
    info = np.asarray(information, dtype=float)
    caps = np.clip(np.asarray(bounds, dtype=float), -_Z_CAP, _Z_CAP)
    if len(caps) != len(info) or len(caps) == 0:
        raise ValueError("one bound per look is needed")
    if np.any(np.diff(info) <= 0) or info[0] <= 0:
        raise ValueError("information must be positive and increasing")
    grid, density = None, None
    for j, (cap, level) in enumerate(zip(caps, info, strict=True)):
        last = j == len(caps) - 1
        if j == 0:
            if last:
                return float(special.ndtr(-cap))
            sd = math.sqrt(level)
            top = min(cap, _GRID_SPAN) * sd
            if top <= -_GRID_SPAN * sd:
                return 1.0
            grid = np.linspace(-_GRID_SPAN * sd, top, _grid_points(info, j))
            density = np.exp(-0.5 * (grid / sd) ** 2) / (sd * math.sqrt(2.0 * math.pi))
            continue
        step = math.sqrt(level - info[j - 1])
        weighted = density * _simpson_weights(grid)
        if last:
            return float(1.0 - weighted @ special.ndtr((cap * math.sqrt(level) - grid) / step))
        sd = math.sqrt(level)
        top = min(cap, _GRID_SPAN) * sd
        if top <= -_GRID_SPAN * sd:
            return 1.0
        new_grid = np.linspace(-_GRID_SPAN * sd, top, _grid_points(info, j))
        kernel = np.exp(-0.5 * ((new_grid[:, None] - grid[None, :]) / step) ** 2) / (step * math.sqrt(2.0 * math.pi))
        grid, density = new_grid, kernel @ weighted
    raise AssertionError("unreachable: the last look returns")


def _grid_points(info: np.ndarray, j: int) -> int:
    """Points of look j's grid (odd, for Simpson's rule): fine enough for the Gaussian kernel of the next
    increment, whose width shrinks relative to the grid when looks are close together."""
    ratio = math.sqrt(info[j] / (info[j + 1] - info[j]))
    points = max(_MIN_GRID_POINTS, math.ceil(2 * _GRID_SPAN * _POINTS_PER_STEP_SD * ratio))
    return points + 1 - points % 2


def _simpson_weights(grid: np.ndarray) -> np.ndarray:
    """Simpson's rule on an evenly spaced grid with an odd number of points."""
    weights = np.where(np.arange(grid.size) % 2 == 1, 4.0, 2.0)
    weights[[0, -1]] = 1.0
    return weights * (grid[1] - grid[0]) / 3.0


@lru_cache(maxsize=256)
def spending_boundaries(looks: tuple[int, ...], alpha: float, shape: SpendingShape) -> tuple[float, ...]:
    """z critical values c_j with P(Z_i >= c_i for some i <= j) = alpha(t_j) under no drift, t_j = k_j / k_max."""
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    info = [float(k) for k in looks]
    bounds: list[float] = []
    for j, k in enumerate(looks):
        target = spent_alpha(shape, alpha, k / looks[-1])
        if j == 0:
            bounds.append(float(min(-special.ndtri(target), _Z_CAP)) if target > 0 else _Z_CAP)
            continue

        def excess(c: float, j: int = j, target: float = target) -> float:
            return crossing_probability([*bounds, c], info[: j + 1]) - target

        bounds.append(_Z_CAP if excess(_Z_CAP) >= 0.0 else float(optimize.brentq(excess, -_GRID_SPAN, _Z_CAP,
                                                                                 xtol=1e-7)))
    return tuple(bounds)


# ---------------------------------------------------------------------------------------------------------
# Looks


@dataclass(frozen=True)
class Look:
    """The state of a task after the look at k samples per question."""

    k: int
    diff: PairedDiff
    verdict: Verdict  # the t test at the look's nominal level (the boundaries)
    next_k: int | None  # None: stop (decided, or max_samples reached)


def allocation(n_questions: int, width: int, k: int) -> np.ndarray:
    """(n, width) bool: the samples a look at k uses (index < k on every question)."""
    return np.broadcast_to(np.arange(width)[None, :] < k, (n_questions, width)).copy()


def evaluate_look(
    candidate: ArrayLike, baseline: ArrayLike, design: AdaptiveDesign, k: int, margin: float, alpha: float
) -> Look:
    """Decide at look k from the samples with index < k only (all of a stored baseline's), so a replay from
    a journal that holds more samples decides the same."""
    if k not in design.looks:
        raise ValueError(f"k={k} is not a look of {design.looks}")
    index = design.looks.index(k)
    cand = np.asarray(candidate, dtype=float)[:, :k]
    base = np.asarray(baseline, dtype=float)
    if design.baseline_adaptive:
        base = base[:, :k]
    diff = paired_difference(cand, base)
    verdict = noninferiority_of(diff, margin, design.nominal_levels(alpha)[index])
    later = design.looks[index + 1:]
    stop = verdict.verdict != "inconclusive" or not later
    return Look(k, diff, verdict, None if stop else later[0])


@dataclass(frozen=True)
class Progress:
    """Where an adaptive task stands given the samples issued so far (replayed from the start)."""

    looks: tuple[Look, ...]  # every look taken, in order; empty while the first stage is incomplete
    wanted: np.ndarray  # (n, max_samples) bool: the samples the procedure needs now (issued or not)

    @property
    def look(self) -> Look | None:
        """The last look whose samples are all in."""
        return self.looks[-1] if self.looks else None

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

    looks: list[Look] = []
    k = design.min_samples
    while True:
        wanted = allocation(n, width, k)
        if not issued(wanted):
            return Progress(tuple(looks), wanted)
        looks.append(evaluate_look(cand, base, design, k, margin, alpha))
        if looks[-1].next_k is None:
            return Progress(tuple(looks), wanted)
        k = looks[-1].next_k


def _pad(flags: np.ndarray, width: int) -> np.ndarray:
    """Issued flags widened (False) or cut to `width` columns."""
    flags = np.asarray(flags, dtype=bool)[:, :width]
    return np.pad(flags, ((0, 0), (0, width - flags.shape[1])))


@dataclass(frozen=True)
class SequentialDecision:
    """What the design decides on given outcomes, and what it cost."""

    verdict: str  # pass, fail or inconclusive
    looks: tuple[Look, ...]
    candidate_samples: int  # samples the procedure used (issued), per side
    baseline_samples: int


def simulate_decision(
    candidate: ArrayLike, baseline: ArrayLike, design: AdaptiveDesign, margin: float, alpha: float
) -> SequentialDecision:
    """The adaptive task's decision on outcome matrices that hold every sample it could ask for.

    candidate: (n, >= max_samples) outcomes (1 correct, 0 not, NaN error); baseline: the same for a live
    baseline, or a stored baseline's (n, k_b) outcomes when design.baseline_adaptive is False. Samples beyond
    the stopping look are ignored, as the run would never have asked for them. Pure and deterministic (for
    the operating-characteristics simulator).
    """
    cand = np.asarray(candidate, dtype=float)
    base = np.asarray(baseline, dtype=float)
    issued_c = np.ones((cand.shape[0], design.max_samples), dtype=bool)
    issued_b = np.ones((base.shape[0], max(design.max_samples, base.shape[1])), dtype=bool)
    progress = replay(cand, issued_c, base, issued_b, design, margin, alpha)
    k = progress.look.k
    candidate_samples = int(np.sum(~np.isnan(cand[:, :k])))
    baseline_samples = int(np.sum(~np.isnan(base[:, :k] if design.baseline_adaptive else base)))
    return SequentialDecision(progress.look.verdict.verdict, progress.looks, candidate_samples, baseline_samples)


# ---------------------------------------------------------------------------------------------------------
# Inference adjusted for the looks


@dataclass(frozen=True)
class AdjustedInference:
    """Stagewise-ordering inference at the look the task stopped at (see the module doc)."""

    p_value: float  # one-sided, H0: delta <= -margin
    lower: float  # one-sided (1 - alpha) bounds on delta
    upper: float
    ci95: tuple[float, float]
    median_unbiased: float

    def to_dict(self) -> dict:
        return {"p_value": self.p_value, "lower": _finite(self.lower), "upper": _finite(self.upper),
                "ci95": [_finite(self.ci95[0]), _finite(self.ci95[1])],
                "median_unbiased": _finite(self.median_unbiased)}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _z_of_t(t: float, df: int) -> float:
    """The standard normal quantile with the same lower-tail probability as t under Student's t(df)."""
    return float(np.clip(special.ndtri(special.stdtr(df, t)), -_Z_CAP, _Z_CAP))


def adjusted_inference(looks: Sequence[Look], design: AdaptiveDesign, margin: float, alpha: float
                       ) -> AdjustedInference:
    """p-value, bounds, 95% interval and median-unbiased estimate adjusted for the looks taken (stagewise
    ordering); `looks` are the looks in order, the last the one the task stopped at."""
    if not looks:
        raise ValueError("no look was taken")
    last = looks[-1]
    if last.diff.df == 0 or not math.isfinite(last.diff.stderr):
        return AdjustedInference(1.0, -math.inf, math.inf, (-math.inf, math.inf), math.nan)
    info = [float(look.k) for look in looks]
    critical_t = [float(special.stdtrit(look.diff.df, 1.0 - look.verdict.alpha)) for look in looks[:-1]]

    def beyond(delta: float, sign: float) -> float:
        """P_delta(an ordering at least as extreme as observed), towards pass (sign 1) or fail (sign -1)."""
        bounds = [sign * _z_of_t(sign * t_c - (delta + margin) / look.diff.stderr, look.diff.df)
                  for t_c, look in zip(critical_t, looks, strict=False)]
        observed = (last.diff.delta - delta) / last.diff.stderr
        bounds.append(sign * _z_of_t(observed, last.diff.df))
        return crossing_probability(bounds, info)

    def solve(sign: float, level: float) -> float:
        """The delta where beyond(delta, sign) = level (monotone in delta)."""
        width = 12.0 * max(look.diff.stderr for look in looks)
        low, high = last.diff.delta - width, last.diff.delta + width
        f = (lambda d: beyond(d, 1.0) - level) if sign > 0 else (lambda d: level - beyond(d, -1.0))
        if f(low) > 0 or f(high) < 0:
            return -math.inf if f(low) > 0 else math.inf
        return float(optimize.brentq(f, low, high, xtol=1e-6 * max(last.diff.stderr, 1e-9)))

    p_value = min(max(beyond(-margin, 1.0), 0.0), 1.0)
    return AdjustedInference(p_value, solve(1.0, alpha), solve(-1.0, alpha),
                             (solve(1.0, 0.025), solve(-1.0, 0.025)), solve(1.0, 0.5))
