"""How a true accuracy drop is spread over a fixed question set, for simulating the gate's error rates (pure).

Each pattern maps the baseline's per-question success probabilities p_i to the candidate's so that the mean
drop over the questions is exactly `drop` (a fraction; the question set is fixed, only outcomes are random):

* proportional: every question loses the same share, p_i (1 - drop / mean p);
* logit: one shift s on the logit scale, expit(logit p_i - s), s solved for the mean drop (hard and easy
  questions barely move, middling ones most);
* broken_subset: a random subset of questions breaks completely (p_i -> 0) in random order until the drop is
  reached, the last one partly; the subset is drawn anew each call.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import optimize, special

DropPattern = Literal["proportional", "logit", "broken_subset"]
DROP_PATTERNS: tuple[DropPattern, ...] = ("proportional", "logit", "broken_subset")
_LOGIT_CLIP = 1e-9  # p of exactly 0 or 1 has an infinite logit; they stay put under any finite shift anyway


def dropped_probabilities(rng: np.random.Generator, p_base: np.ndarray, drop: float, pattern: DropPattern
                          ) -> np.ndarray:
    """The candidate's per-question success probabilities for a mean drop of `drop` under `pattern`."""
    p = np.asarray(p_base, dtype=float)
    if not 0.0 <= drop <= p.mean():
        raise ValueError(f"drop must be between 0 and the mean accuracy {p.mean():.3f}, got {drop}")
    if drop == 0.0:
        return p.copy()
    if pattern == "proportional":
        return p * (1.0 - drop / p.mean())
    if pattern == "logit":
        logits = special.logit(np.clip(p, _LOGIT_CLIP, 1.0 - _LOGIT_CLIP))

        def shortfall(shift: float) -> float:
            return p.mean() - special.expit(logits - shift).mean() - drop

        return special.expit(logits - optimize.brentq(shortfall, 0.0, 60.0, xtol=1e-12))
    if pattern == "broken_subset":
        dropped, remaining = p.copy(), drop * p.size
        for i in rng.permutation(p.size):
            cut = min(dropped[i], remaining)
            dropped[i] -= cut
            remaining -= cut
            if remaining <= 0.0:
                break
        return dropped
    raise ValueError(f"pattern must be one of {DROP_PATTERNS}, got {pattern!r}")
