"""The gate's operating characteristics for a config, with more simulations than `evalpipe plan` runs.

    python bench/gate_oc.py configs/r1_tp8.yaml
    python bench/gate_oc.py configs/quickstart.yaml --sims 4000 --markdown

Prints the same table as `evalpipe plan` (evalpipe.operating: the shipped decision code, simulated), then:

* P(exit 0 | identical) for truncation rates of 0, 2 and 4% on both sides (the stated or measured rate
  otherwise), so the design's sensitivity to truncation is visible;
* with questions regarded as a sample (resampled): per task the smallest drop, on a grid of multiples of the
  margin, at which every pattern passes at most alpha: what the gate can promise about the population the
  questions were drawn from rather than about these questions;
* --check N: N simulated runs per task also decided one by one through the real path,
  `decide_task(compare_task(...))`, and compared with the vectorised decisions (they must agree).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evalpipe.comparison import compare_task  # noqa: E402
from evalpipe.outcomes import SideOutcomes  # noqa: E402
from evalpipe.gate import decide_task  # noqa: E402
from evalpipe.operating import (  # noqa: E402
    PATTERNS,
    Settings,
    decide_draws,
    draw,
    operating_characteristics,
    resampled_pass,
    spread_truncation,
)
from evalpipe.planning import oc_lines, oc_markdown, oc_rows, planning_baseline, task_designs  # noqa: E402
from evalpipe.registry import DEFAULT_REGISTRY_DIR  # noqa: E402
from evalpipe.runner import plan_from_config  # noqa: E402

GRID = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


def _side(draws, row: int) -> SideOutcomes:
    n, k = draws.successes.shape[1], draws.k
    correct, truncated = np.zeros((n, k)), np.zeros((n, k), bool)
    for i in range(n):
        s, t = int(draws.successes[row, i]), int(draws.truncated[row, i])
        correct[i, :s], truncated[i, s:s + t] = 1.0, True
    return SideOutcomes(tuple(f"q{i}" for i in range(n)), correct, truncated, np.zeros((n, k), bool))


def check_shipped(designs, runs: int, seed: int) -> list[str]:
    lines = []
    for design in designs:
        rng = np.random.default_rng(seed)
        cand = draw(rng, design.k_candidate, design.rates, design.truncation, runs)
        base = draw(rng, design.k_baseline, design.rates, design.truncation, runs)
        result, status = decide_draws(cand, base, design.rule)
        rule = design.rule
        agree = sum(
            (lambda d: (d.shown, d.status) == (result[row], status[row]))(
                decide_task(compare_task(design.task, _side(cand, row), _side(base, row), rule.margin, rule.alpha), rule))
            for row in range(runs))
        lines.append(f"{design.task}: {agree}/{runs} simulated runs decided alike by decide_task(compare_task(...))")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--sims", type=int, default=2000, help="fewest simulated runs per task")
    parser.add_argument("--max-sims", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", default=None, help="run directory or registry name (as evalpipe plan)")
    parser.add_argument("--check", type=int, default=0, help="runs per task decided through the real path too")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown (docs)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the figures here")
    args = parser.parse_args()

    config, plans = plan_from_config(args.config)
    reference = planning_baseline(config, args.baseline, DEFAULT_REGISTRY_DIR)
    designs = task_designs(config, plans, reference)
    target = config.gate.identical_pass_rate if config.gate else 0.95
    settings = Settings(sims=args.sims, max_sims=args.max_sims, elements=20_000_000, seed=args.seed,
                        identical_pass_rate=target)
    started = time.perf_counter()
    document = operating_characteristics(designs, settings)
    print(f"# {config.name}: operating characteristics ({time.perf_counter() - started:.0f} s)\n")
    if args.markdown:
        print("\n".join(oc_markdown(document, heading="")))
    else:
        for row in oc_rows(document):
            print(" | ".join(row))
        print("\n".join(oc_lines(document)))

    print("\n## P(exit 0 | identical) against the truncation rate on both sides")
    sweep = {}
    for rate in (0.0, 0.02, 0.04):
        varied = [replace(d, truncation=spread_truncation(d.rates, rate)) for d in designs]
        p = operating_characteristics(varied, replace(settings, resampled=False))["p_exit0_identical"]
        sweep[rate] = p
        print(f"- {100 * rate:.0f}% truncation: {p:.3f}")

    print("\n## Questions regarded as a sample: the smallest drop every pattern passes at most alpha")
    promises = {}
    for design in designs:
        rule, found = design.rule, None
        for factor in GRID:
            drop = factor * rule.margin
            if drop > design.rates.mean() or drop <= 0:
                break
            shares = resampled_pass(replace(design, rule=replace(rule, margin=rule.margin)), drop, args.sims,
                                    args.seed)
            if max(shares.values()) <= rule.alpha:
                found = (drop, shares)
                break
        promises[design.task] = None if found is None else {"drop": found[0], "p_pass": found[1]}
        if found is None:
            print(f"- {design.task}: none up to {GRID[-1]:g} x the margin")
        else:
            shares = " / ".join(f"{found[1][p]:.3f}" for p in PATTERNS)
            print(f"- {design.task}: a population drop of {100 * found[0]:.1f} pts ({found[0] / rule.margin:g} x "
                  f"the margin) passes at most {rule.alpha:g} (prop / logit / broken: {shares})")

    if args.check:
        print("\n## The vectorised decisions against the shipped path")
        print("\n".join(f"- {line}" for line in check_shipped(designs, args.check, args.seed)))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"operating_characteristics": document, "truncation_sweep": sweep,
                                                   "population_promise": promises}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
