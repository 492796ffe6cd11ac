"""Teacher-forced divergence between two servers, as pure functions on prompt logprobs (evalpipe.probe does I/O).

Both servers score the same token sequence (a prompt plus the baseline's own generation). At every scored
position each returns the logprob of the token actually there and its top-k alternatives. Per position:

* KL(baseline || candidate), in nats, over a partition of the vocabulary into the tokens both servers list in
  their top-k, the scored token (whose logprob both return), and one tail bucket holding the rest of the mass on
  each side. Both distributions' masses are known exactly on every cell, and merging tokens into a bucket never
  increases KL (data-processing inequality), so this is a lower bound on the full-vocabulary KL; it is close
  when the top-k holds nearly all the mass (as for a confident model at k = 20).
* top-1 agreement: both servers' most likely token is the same.
* the change in the scored token's logprob, candidate minus baseline.

Statistics are over all scored positions; their uncertainty comes from a cluster bootstrap that resamples
whole generations (positions of one generation are correlated), with percentile intervals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

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
    """A statistic with its bootstrap 95% interval and one-sided (1 - alpha) lower and upper bounds."""

    value: float
    ci95: tuple[float, float]
    lower: float
    upper: float

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95": list(self.ci95), "lower": self.lower, "upper": self.upper}


def _estimate(value: float, replicates: np.ndarray, alpha: float) -> Estimate:
    lo, hi, lower, upper = np.quantile(replicates, [0.025, 0.975, alpha, 1 - alpha])
    return Estimate(float(value), (float(lo), float(hi)), float(lower), float(upper))


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
    """Position-weighted statistics over all sequences with cluster-bootstrap intervals (whole sequences are
    resampled with replacement, `resamples` times, from a generator seeded with `seed`)."""
    sequences = [s for s in sequences if len(s)]
    if not sequences:
        raise ValueError("no scored positions")
    lengths = np.array([len(s) for s in sequences], dtype=np.float64)
    sums = {
        "kld": np.array([s.kld.sum() for s in sequences]),
        "top1": np.array([s.top1_agree.sum() for s in sequences], dtype=np.float64),
        "abs_delta": np.array([np.abs(s.logprob_delta).sum() for s in sequences]),
    }
    n = len(sequences)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)  # replicates x sequences
    positions = counts @ lengths
    means = {name: (counts @ values) / positions for name, values in sums.items()}

    kld_all = np.concatenate([s.kld for s in sequences])
    owner = np.repeat(np.arange(n), lengths.astype(int))
    order = np.argsort(kld_all, kind="stable")
    sorted_kld, sorted_owner = kld_all[order], owner[order]
    p99_replicates = np.concatenate([
        weighted_quantile(sorted_kld, counts[start:start + 64][:, sorted_owner], P_QUANTILE)
        for start in range(0, resamples, 64)
    ])
    total = lengths.sum()
    return DivergenceSummary(
        n_sequences=n,
        n_positions=int(total),
        mean_kld=_estimate(sums["kld"].sum() / total, means["kld"], alpha),
        p99_kld=_estimate(float(np.quantile(kld_all, P_QUANTILE, method="inverted_cdf")), p99_replicates, alpha),
        top1_agreement=_estimate(sums["top1"].sum() / total, means["top1"], alpha),
        mean_abs_logprob_change=_estimate(sums["abs_delta"].sum() / total, means["abs_delta"], alpha),
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
