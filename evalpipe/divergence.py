"""Teacher-forced divergence between two servers, as pure functions on prompt logprobs (evalpipe.divergence_probe does I/O).

Both servers score the same token sequence (a prompt plus the baseline's own generation). At every scored
position each returns the logprob of the token actually there and its top-k alternatives. Per position:

* KL(baseline || candidate), in nats, over a partition of the vocabulary into the tokens both servers list in
  their top-k, the scored token (whose logprob both return), and one tail bucket holding the rest of the mass on
  each side. Both distributions' masses are known exactly on every cell, and merging tokens into a bucket never
  increases KL (data-processing inequality), so this is a lower bound on the full-vocabulary KL; it is close
  when the top-k holds nearly all the mass (as for a confident model at k = 20).
* top-1 agreement: both servers' most likely token is the same.
* the change in the scored token's logprob, candidate minus baseline.

The unit of the statistics is the answer (positions of one generation are correlated): each answer is reduced to
its mean over its scored positions, and mean KL, top-1 agreement and mean |logprob change| are means over
answers, each answer weighing the same. Their intervals are Student t intervals with Hall's (1992) skewness
correction: per-answer KL means are right-skewed (a few answers drift much more than the rest), and the plain t
interval's upper bound under-covers there (the limit is checked at that bound). The statistic T = sqrt(n)
(mean - mu) / s is mapped through g(T) = T + gamma/(6 sqrt n) + gamma T^2/(3 sqrt n) + gamma^2 T^3/(27 n),
gamma the sample skewness, which removes T's first-order skewness and is monotone, and the bounds invert g at
Student t quantiles (n - 1 degrees of freedom). With no skew it is the t interval. Coverage is checked by
simulation at 8, 16 and 64 answers (tests/test_divergence.py; figures in docs/ci-gate.md). The 99th percentile
of position KL keeps a cluster-bootstrap interval (whole answers resampled); it is reported, not gated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import special

KL_APPROXIMATION = (
    "KL(baseline || candidate) in nats over the tokens both servers list in their top-k plus the scored token, "
    "the rest of the vocabulary as one tail bucket per side: a lower bound on the full-vocabulary KL"
)
P_QUANTILE = 0.99
_TAIL_FLOOR = 1e-12  # a tail mass rounded to <= 0 (top-k sums past 1.0 in floating point)


@dataclass(frozen=True)
class ScoredPosition:
    """What one server says about one position: the scored token's logprob and its top-k alternatives."""

    token: str
    logprob: float
    top: Mapping[str, float]


def position_kl(base: ScoredPosition, cand: ScoredPosition) -> float:
    """KL(base || cand) over the shared top-k tokens, the scored token and a tail bucket (see module doc)."""
    cells = {token: (lp, cand.top[token]) for token, lp in base.top.items() if token in cand.top}
    cells[base.token] = (base.logprob, cand.logprob)
    p = np.exp(np.array([v[0] for v in cells.values()], dtype=np.float64))
    q = np.exp(np.array([v[1] for v in cells.values()], dtype=np.float64))
    kl = float(np.sum(p * (np.log(p) - np.log(q))))
    p_tail = 1.0 - float(p.sum())
    if p_tail > _TAIL_FLOOR:
        q_tail = max(1.0 - float(q.sum()), _TAIL_FLOOR)
        kl += p_tail * (math.log(p_tail) - math.log(q_tail))
    return max(kl, 0.0)  # the bucketed sum is a KL of proper distributions; only rounding can make it negative


def _top1(position: ScoredPosition) -> str:
    return max(position.top.items(), key=lambda item: item[1])[0] if position.top else position.token


@dataclass(frozen=True)
class SequenceScores:
    """Per-position metrics of one generation."""

    kld: np.ndarray  # float, nats
    top1_agree: np.ndarray  # bool
    logprob_delta: np.ndarray  # float: candidate minus baseline logprob of the scored token

    def __len__(self) -> int:
        return len(self.kld)

    def to_dict(self) -> dict[str, list]:
        return {"kld": [round(float(v), 7) for v in self.kld], "top1_agree": [int(v) for v in self.top1_agree],
                "logprob_delta": [round(float(v), 6) for v in self.logprob_delta]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence]) -> SequenceScores:
        return cls(np.asarray(data["kld"], dtype=np.float64), np.asarray(data["top1_agree"], dtype=bool),
                   np.asarray(data["logprob_delta"], dtype=np.float64))


def score_sequence(base: Sequence[ScoredPosition], cand: Sequence[ScoredPosition]) -> SequenceScores:
    """Metrics of aligned positions (the same tokens, scored by each server)."""
    if len(base) != len(cand):
        raise ValueError(f"the servers scored {len(base)} and {len(cand)} positions")
    for i, (b, c) in enumerate(zip(base, cand, strict=True)):
        if b.token != c.token:
            raise ValueError(f"position {i}: the servers tokenized differently ({b.token!r} vs {c.token!r})")
    return SequenceScores(
        np.array([position_kl(b, c) for b, c in zip(base, cand, strict=True)], dtype=np.float64),
        np.array([_top1(b) == _top1(c) for b, c in zip(base, cand, strict=True)], dtype=bool),
        np.array([c.logprob - b.logprob for b, c in zip(base, cand, strict=True)], dtype=np.float64),
    )


@dataclass(frozen=True)
class Estimate:
    """A statistic with its 95% interval and one-sided (1 - alpha) lower and upper bounds."""

    value: float
    ci95: tuple[float, float]
    lower: float
    upper: float

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95": list(self.ci95), "lower": self.lower, "upper": self.upper}


def _bootstrap_estimate(value: float, replicates: np.ndarray, alpha: float) -> Estimate:
    lo, hi, lower, upper = np.quantile(replicates, [0.025, 0.975, alpha, 1 - alpha])
    return Estimate(float(value), (float(lo), float(hi)), float(lower), float(upper))


def skew_corrected_bounds(values: np.ndarray, level: float) -> tuple[float, float]:
    """One-sided `level` lower and upper bounds on the mean of `values` (Hall's skewness-corrected t, see the
    module doc); infinite with fewer than two values, the mean itself when they are all equal."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    mean = float(values.mean()) if n else math.nan
    if n < 2:
        return -math.inf, math.inf
    sd = float(values.std(ddof=1))
    if sd == 0.0:
        return mean, mean
    root_n = math.sqrt(n)
    gamma = float(np.mean((values - mean) ** 3)) / sd**3

    def pivot(quantile: float) -> float:
        """g^-1: the T whose corrected statistic equals `quantile`."""
        if abs(gamma) < 1e-9:
            return quantile
        return 3.0 * root_n / gamma * (float(np.cbrt(1.0 + gamma / root_n * (quantile - gamma / (6.0 * root_n))))
                                       - 1.0)

    t_quantile = float(special.stdtrit(n - 1, level))
    return mean - sd / root_n * pivot(t_quantile), mean - sd / root_n * pivot(-t_quantile)


def mean_estimate(values: np.ndarray, alpha: float, support: tuple[float, float] = (-math.inf, math.inf)
                  ) -> Estimate:
    """The mean of per-answer values with its 95% interval and one-sided (1 - alpha) bounds, each clipped to
    the statistic's `support` (a KL is >= 0, an agreement in [0, 1]; clipping cannot lose coverage)."""
    bounds = [*skew_corrected_bounds(values, 0.975), *skew_corrected_bounds(values, 1.0 - alpha)]
    low, high, lower, upper = np.clip(bounds, *support)
    return Estimate(float(np.mean(values)), (float(low), float(high)), float(lower), float(upper))


def weighted_quantile(sorted_values: np.ndarray, weights: np.ndarray, q: float) -> np.ndarray:
    """Rows of `weights` (replicates x positions, in the order of `sorted_values`) -> the q-quantile of each
    weighted sample (inverted CDF: the smallest value whose cumulative weight reaches q of the total)."""
    cumulative = np.cumsum(weights, axis=1)
    index = (cumulative < q * cumulative[:, -1:]).sum(axis=1)
    return sorted_values[np.minimum(index, len(sorted_values) - 1)]


@dataclass(frozen=True)
class DivergenceSummary:
    n_sequences: int
    n_positions: int
    mean_kld: Estimate
    p99_kld: Estimate
    top1_agreement: Estimate
    mean_abs_logprob_change: Estimate
    alpha: float

    def to_dict(self) -> dict:
        return {"n_sequences": self.n_sequences, "n_positions": self.n_positions, "alpha": self.alpha,
                "mean_kld": self.mean_kld.to_dict(), "p99_kld": self.p99_kld.to_dict(),
                "top1_agreement": self.top1_agreement.to_dict(),
                "mean_abs_logprob_change": self.mean_abs_logprob_change.to_dict()}


def summarize(sequences: Sequence[SequenceScores], *, alpha: float = 0.05, resamples: int = 1000,
              seed: int = 0) -> DivergenceSummary:
    """Per-answer-mean statistics with skewness-corrected t intervals; the 99th percentile of position KL with a
    cluster-bootstrap interval (whole sequences resampled with replacement, `resamples` times, from a generator
    seeded with `seed`)."""
    sequences = [s for s in sequences if len(s)]
    if not sequences:
        raise ValueError("no scored positions")
    lengths = np.array([len(s) for s in sequences], dtype=np.float64)
    per_answer = {
        "kld": np.array([s.kld.mean() for s in sequences]),
        "top1": np.array([s.top1_agree.mean() for s in sequences]),
        "abs_delta": np.array([np.abs(s.logprob_delta).mean() for s in sequences]),
    }
    n = len(sequences)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)  # replicates x sequences
    kld_all = np.concatenate([s.kld for s in sequences])
    owner = np.repeat(np.arange(n), lengths.astype(int))
    order = np.argsort(kld_all, kind="stable")
    sorted_kld, sorted_owner = kld_all[order], owner[order]
    p99_replicates = np.concatenate([
        weighted_quantile(sorted_kld, counts[start:start + 64][:, sorted_owner], P_QUANTILE)
        for start in range(0, resamples, 64)
    ])
    return DivergenceSummary(
        n_sequences=n,
        n_positions=int(lengths.sum()),
        mean_kld=mean_estimate(per_answer["kld"], alpha, (0.0, math.inf)),
        p99_kld=_bootstrap_estimate(float(np.quantile(kld_all, P_QUANTILE, method="inverted_cdf")), p99_replicates,
                                    alpha),
        top1_agreement=mean_estimate(per_answer["top1"], alpha, (0.0, 1.0)),
        mean_abs_logprob_change=mean_estimate(per_answer["abs_delta"], alpha, (0.0, math.inf)),
        alpha=alpha,
    )


DivergenceVerdict = Literal["pass", "fail", "inconclusive"]


def divergence_verdict(summary: DivergenceSummary, max_kld: float | None, min_top1_agreement: float | None
                       ) -> tuple[DivergenceVerdict, list[tuple[str, str]]]:
    """pass when every configured limit holds at the one-sided bound (mean KLD's upper bound <= max_kld, top-1
    agreement's lower bound >= min_top1_agreement); fail when one is broken even at the other bound; else
    inconclusive (also with fewer than two generations, which give no interval). Returns the verdict and, per
    limit, its state ("holds", "broken" or "unsure") and a line with the numbers."""
    checks: list[tuple[str, str]] = []
    if max_kld is not None:
        kld = summary.mean_kld
        state = "holds" if kld.upper <= max_kld else "broken" if kld.lower > max_kld else "unsure"
        checks.append((state, f"mean KLD {kld.value:.4g} (one-sided bounds {kld.lower:.4g} to {kld.upper:.4g}) "
                              f"vs max_kld {max_kld:g}"))
    if min_top1_agreement is not None:
        top1 = summary.top1_agreement
        state = "holds" if top1.lower >= min_top1_agreement else "broken" if top1.upper < min_top1_agreement \
            else "unsure"
        checks.append((state, f"top-1 agreement {100 * top1.value:.2f}% (one-sided bounds {100 * top1.lower:.2f}% "
                              f"to {100 * top1.upper:.2f}%) vs min_top1_agreement {100 * min_top1_agreement:.2f}%"))
    states = {state for state, _ in checks}
    if "broken" in states:
        return "fail", checks
    if summary.n_sequences < 2 or "unsure" in states:
        return "inconclusive", checks
    return "pass", checks


# ---------------------------------------------------------------------------------------------------------
# The null: the baseline against itself


NULL_QUANTILE = 0.99
NULL_RESAMPLES = 20000


@dataclass(frozen=True)
class DivergenceNull:
    """What the probe reads between the baseline and itself (other batch compositions, request orders, seeds):
    per-answer mean KL of A/A probes, and the limit they imply for a probe of `answers` answers."""

    per_answer_kld: tuple[float, ...]  # pooled over the A/A runs
    runs: tuple[dict, ...]  # per A/A run: source, what differed, answers, mean KL
    answers: int  # probe size the quantile is for
    quantile: float
    null_kld: float  # that quantile of the probe's mean KL under the null
    tolerance: float  # nats of divergence accepted beyond the null

    @property
    def max_kld(self) -> float:
        return self.null_kld + self.tolerance

    def to_dict(self) -> dict:
        return {"per_answer_kld": [round(v, 9) for v in self.per_answer_kld], "runs": list(self.runs),
                "answers": self.answers, "quantile": self.quantile, "null_kld": self.null_kld,
                "tolerance": self.tolerance, "max_kld": self.max_kld, "resamples": NULL_RESAMPLES}

    @classmethod
    def from_dict(cls, data: Mapping) -> DivergenceNull:
        return cls(tuple(float(v) for v in data["per_answer_kld"]), tuple(data["runs"]), int(data["answers"]),
                   float(data["quantile"]), float(data["null_kld"]), float(data["tolerance"]))


def null_means(per_answer_kld: Sequence[float], answers: int, resamples: int = NULL_RESAMPLES, seed: int = 0
               ) -> np.ndarray:
    """The null distribution of a probe's mean KL over `answers` answers: means of `answers` per-answer values
    drawn with replacement from the A/A values (seeded, so a stored null reproduces)."""
    values = np.asarray(per_answer_kld, dtype=np.float64)
    if values.size == 0:
        raise ValueError("the null has no answers")
    draws = np.random.default_rng(seed).integers(0, values.size, size=(resamples, answers))
    return values[draws].mean(axis=1)


def calibrate_null(per_answer_kld: Sequence[float], runs: Sequence[dict], answers: int, tolerance: float,
                   quantile: float = NULL_QUANTILE) -> DivergenceNull:
    """The null and its limit: the `quantile` of the null mean KL at `answers` answers, plus `tolerance`."""
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
    if tolerance < 0.0:
        raise ValueError(f"tolerance must be >= 0 nats, got {tolerance}")
    means = null_means(per_answer_kld, answers)
    return DivergenceNull(tuple(float(v) for v in per_answer_kld), tuple(runs), answers, quantile,
                          float(np.quantile(means, quantile)), tolerance)


def against_null(null: DivergenceNull, mean_kld: float, answers: int) -> dict:
    """Where a candidate's mean KL sits in the null (at the candidate probe's size): the null's quantile and
    the share of null probes at or above the candidate's value."""
    means = null_means(null.per_answer_kld, answers)
    return {"null_quantile_kld": float(np.quantile(means, null.quantile)), "null_median_kld": float(np.median(means)),
            "share_of_null_at_or_above": float(np.mean(means >= mean_kld)), "answers": answers}
