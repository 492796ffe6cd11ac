"""Operating characteristics of the group-sequential design of `samples: auto` (evalpipe.adaptive), by
simulation on a fixed question set, printed as a table (the figures of docs/ci-gate.md).

Per spending shape: P(pass) when the true drop equals the margin under the three drop patterns
(evalpipe.drop_patterns); P(pass) and mean samples per question for a candidate identical to the baseline; and
the power to detect a drop of margin + 3 points, P(fail), against the fixed design with the same expected
number of samples (on the same draws, interpolated between the two integer sample counts around it).

    python bench/adaptive_oc.py [--questions 30] [--min-samples 4] [--max-samples 32] [--margin 0.10]
                                [--sims 4000] [--stored-baseline 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from evalpipe.adaptive import SPENDING_SHAPES, AdaptiveDesign, simulate_decision
from evalpipe.drop_patterns import DROP_PATTERNS, dropped_probabilities
from evalpipe.stats import noninferiority

ALPHA = 0.05
EXTRA_POINTS = 0.03
BETA_A, BETA_B = 0.7, 0.5  # U-shaped per-question accuracies around 0.58, like a reasoning benchmark's


def draw(rng, p_cand, p_base, width, base_width):
    return ((rng.random((p_cand.size, width)) < p_cand[:, None]).astype(float),
            (rng.random((p_base.size, base_width)) < p_base[:, None]).astype(float))


def scenario(rng, design, p_base, drop, pattern, sims, margin, base_width, fixed_ks=()):
    """(P(pass), P(fail), mean candidate samples per question, {k: P(fail) of the fixed design at k})."""
    verdicts, used, fixed = [], 0, {k: 0 for k in fixed_ks}
    for _ in range(sims):
        cand, base = draw(rng, dropped_probabilities(rng, p_base, drop, pattern), p_base, design.max_samples,
                          base_width)
        decision = simulate_decision(cand, base, design, margin, ALPHA)
        verdicts.append(decision.verdict)
        used += decision.candidate_samples
        for k in fixed_ks:
            fixed_base = base[:, :k] if design.baseline_adaptive else base
            fixed[k] += noninferiority(cand[:, :k], fixed_base, margin, ALPHA).verdict == "fail"
    return (verdicts.count("pass") / sims, verdicts.count("fail") / sims, used / (sims * p_base.size),
            {k: v / sims for k, v in fixed.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--min-samples", type=int, default=4)
    parser.add_argument("--max-samples", type=int, default=32)
    parser.add_argument("--margin", type=float, default=0.10)
    parser.add_argument("--sims", type=int, default=4000)
    parser.add_argument("--stored-baseline", type=int, default=0, metavar="K",
                        help="compare against a stored baseline of K samples per question (0: a live baseline)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    p_base = rng.beta(BETA_A, BETA_B, args.questions)
    live = args.stored_baseline == 0
    base_width = args.max_samples if live else args.stored_baseline
    se = math.sqrt(ALPHA * (1 - ALPHA) / args.sims)
    print(f"{args.questions} questions (baseline accuracies Beta({BETA_A}, {BETA_B}), mean {p_base.mean():.3f}), "
          f"samples auto {args.min_samples}-{args.max_samples}, margin {args.margin:g}, alpha {ALPHA}, "
          f"{'live baseline' if live else f'stored baseline of {base_width} samples'}, {args.sims} simulations "
          f"each (simulation s.e. at 5%: {se:.4f})")
    header = ("spending", "looks", *(f"P(pass) {p}" for p in DROP_PATTERNS), "P(pass) identical", "k identical",
              f"P(fail) +{100 * EXTRA_POINTS:.0f}pt", "k +3pt", "fixed P(fail) at k", "seconds")
    print(" | ".join(header))
    for shape in SPENDING_SHAPES:
        started = time.perf_counter()
        design = AdaptiveDesign(args.min_samples, args.max_samples, shape, baseline_adaptive=live)
        at_margin = [scenario(rng, design, p_base, args.margin, pattern, args.sims, args.margin, base_width)[0]
                     for pattern in DROP_PATTERNS]
        identical, _, identical_k, _ = scenario(rng, design, p_base, 0.0, "proportional", args.sims, args.margin,
                                                base_width)
        # power on common draws: the fixed designs at every k near the sequential design's expected cost
        state = rng.bit_generator.state
        _, _, cost, _ = scenario(rng, design, p_base, args.margin + EXTRA_POINTS, "proportional", args.sims,
                                 args.margin, base_width)
        rng.bit_generator.state = state
        low, high = math.floor(cost), min(math.ceil(cost), args.max_samples)
        _, fails, _, fixed = scenario(rng, design, p_base, args.margin + EXTRA_POINTS, "proportional", args.sims,
                                      args.margin, base_width, fixed_ks=sorted({low, high}))
        fixed_at_cost = fixed[low] + (cost - low) * (fixed[high] - fixed[low])
        row = (shape, str(design.looks), *(f"{p:.4f}" for p in at_margin), f"{identical:.4f}", f"{identical_k:.1f}",
               f"{fails:.4f}", f"{cost:.1f}", f"{fixed_at_cost:.4f}", f"{time.perf_counter() - started:.0f}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
