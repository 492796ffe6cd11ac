"""Operating characteristics of a configured gate, by simulation of the shipped decision code (pure; numpy).

What a gate promises is a set of error rates of the whole procedure, stated before any GPU hour is spent:

* **P(exit 0 | candidate identical to the baseline)**: both sides draw from the same per-question success and
  truncation probabilities; every gated task must pass. This is the rate at which the gate lets clean merges
  through (1 minus its false-block rate).
* **P(pass | true drop = margin)**, per task, under three patterns of damage: *proportional* (every question
  loses the same share of its success rate), *logit* (the same shift on every question's logit: easy and
  impossible questions move little, middling ones most) and *broken_subset* (a random subset of questions is
  broken outright, success 0, the last one partly, until the mean drop equals the margin). On a **fixed question
  set** (the questions and, for broken_subset, the broken subset are fixed; only the samples vary: the
  question set is the population, which is what the gate's test is about) and, reported separately, with the
  **questions resampled** (each simulated run draws its n questions with replacement from the profile and, for
  broken_subset, breaks each with the probability that makes the expected drop equal the margin: questions
  regarded as a sample of a larger population).
* **P(fail | true drop = margin + points)**, per task (proportional pattern, fixed set): the power to block a
  real regression a little larger than the margin.

Every simulated run goes through the same functions as a real one: per-question means from binomial counts,
`stats.noninferiority_rows` (the arithmetic of `paired_difference_of_means` + `noninferiority_of`, one row per
run) for the accuracy and the truncation test, and `gate.gate_outcome` (the rule behind `gate.decide_task`).
tests/test_operating.py checks that these vectorised decisions equal `decide_task(compare_task(...))` run by
run. Not simulated: request errors (taken as none), the divergence probe (its limit has its own calibration),
and adaptive sampling, whose tasks are simulated as a fixed design at their first stage (min_samples), said
so in the output.

Per-question rates (`TaskDesign.rates`) come from the baseline's per-question outcomes when there are any
(beta-binomial posterior means: a question seen 16/16 is not taken as certain), else from a stated prior
accuracy, else from the worst case p = 0.5, with every question at the same rate: for a given mean accuracy
that spread maximises the within-question variance E[p (1 - p)], so the identical-pass rate is the lowest and
the t test the least conservative: the worst case for both targets. Truncation probabilities are spread as
evenly as possible over questions (the most variable spread for a given rate) but never above a question's
error rate (a truncated answer is wrong).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from evalpipe.config import TaskGate
from evalpipe.gate import gate_outcome
from evalpipe.stats import VarianceComponents, minimum_detectable_effect, noninferiority_rows, samples_needed

PATTERNS = ("proportional", "logit", "broken_subset")
DEFAULT_SIMS = 300  # plan, --dry-run and run: a few hundred (a second or two); bench/gate_oc.py uses more
DEFAULT_PLUS_POINTS = 0.03
DEFAULT_TRUNCATION = 0.04  # the upper end of R1-like truncation at 32k tokens (2-4%), when nothing is measured
_EPS = 1e-9


@dataclass(frozen=True)
class TaskDesign:
    """One gated task as the simulator sees it."""

    task: str
    rates: np.ndarray  # (n,) per-question success probabilities of the baseline: the fixed question set
    truncation: np.ndarray  # (n,) per-question truncation probabilities, each <= 1 - rate
    k_candidate: int
    k_baseline: int
    rule: TaskGate
    rates_source: str  # where the rates come from, for the output
    truncation_source: str
    notes: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        return int(self.rates.size)

    def components(self) -> VarianceComponents:
        """The between/within split of the rates, for the analytic planner (evalpipe.stats)."""
        return VarianceComponents(float(self.rates.mean()), float(self.rates.var()),
                                  float(np.mean(self.rates * (1 - self.rates))), self.rates_source)


@dataclass(frozen=True)
class Settings:
    """sims is the fewest simulated runs per task; a small task gets more (up to max_sims) while its runs hold at
    most `elements` simulated questions, so figures are precise where that is cheap."""

    sims: int = DEFAULT_SIMS
    max_sims: int = 4000
    elements: int = 1_500_000
    seed: int = 0
    plus_points: float = DEFAULT_PLUS_POINTS
    identical_pass_rate: float = 0.95  # the target for P(exit 0 | identical)
    resampled: bool = True
    extra_notes: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------------------------
# Rate profiles


def homogeneous(n: int, accuracy: float) -> np.ndarray:
    """Every question at the same success rate: the most within-question variance for that mean."""
    return np.full(n, float(np.clip(accuracy, 0.0, 1.0)))


def shrunk_rates(successes: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, str]:
    """Per-question success probabilities from observed counts: posterior means under a beta prior fitted to the
    counts by moments (beta-binomial). Questions without samples get the mean. With one sample per question (or
    no spread beyond binomial noise) the split is not identifiable and every question gets the mean (the
    conservative choice, as in stats.variance_components)."""
    successes, counts = np.asarray(successes, float), np.asarray(counts, float)
    seen = counts > 0
    if not seen.any():
        raise ValueError("no question has samples")
    rate = successes[seen] / counts[seen]
    mean = float(rate.mean())
    multi = counts[seen] >= 2
    if not multi.any() or mean in (0.0, 1.0):
        return np.full(counts.size, mean), "every question at the observed mean (no repeated samples to split)"
    x, k = successes[seen][multi], counts[seen][multi]
    within = float(np.mean(x * (k - x) / (k * (k - 1))))
    between = max(0.0, float(rate.var(ddof=1)) - float(np.mean(x * (k - x) / (k * (k - 1)) / k)))
    if between <= _EPS:
        return np.full(counts.size, mean), "every question at the observed mean (no spread beyond sampling noise)"
    strength = max(mean * (1 - mean) / between - 1.0, _EPS)  # a + b of the fitted beta
    a, b = mean * strength, (1 - mean) * strength
    rates = np.where(seen, (successes + a) / (np.maximum(counts, 0) + a + b), mean)
    return rates, f"per-question posterior means (beta-binomial, a={a:.2f}, b={b:.2f}; within {within:.3f})"


def spread_truncation(rates: np.ndarray, rate: float) -> np.ndarray:
    """Per-question truncation probabilities averaging `rate` (or as close as the error rates allow), spread as
    evenly as possible and never above a question's error rate 1 - p (water-filling)."""
    room = 1.0 - np.asarray(rates, float)
    if rate <= 0.0:
        return np.zeros_like(room)
    if rate >= room.mean():
        return room.copy()
    low, high = 0.0, 1.0
    for _ in range(60):
        level = (low + high) / 2
        if np.minimum(room, level).mean() < rate:
            low = level
        else:
            high = level
    return np.minimum(room, high)


# ---------------------------------------------------------------------------------------------------------
# Drop patterns: the candidate's rates given the baseline's and a mean drop


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def drop_rates(rates: np.ndarray, drop: float, pattern: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """The candidate's per-question rates when the mean drop over these questions is exactly `drop`."""
    rates = np.asarray(rates, float)
    mean = float(rates.mean())
    if drop <= 0.0:
        return rates.copy()
    if drop > mean + _EPS:
        raise ValueError(f"a drop of {100 * drop:.1f} points exceeds the accuracy {100 * mean:.1f}%")
    if pattern == "proportional":
        return rates * (1.0 - drop / mean)
    if pattern == "logit":
        logits = _logit(rates)
        live = (rates > 0.0) & (rates < 1.0)  # questions at exactly 0 or 1 cannot shift on the logit scale

        def shifted(s: float) -> np.ndarray:
            return np.where(live, 1.0 / (1.0 + np.exp(-(logits - s))), rates)

        if float((rates - shifted(60.0)).mean()) < drop - 1e-6:  # saturated: fall back to proportional
            return rates * (1.0 - drop / mean)
        low, high = 0.0, 60.0
        for _ in range(80):
            mid = (low + high) / 2
            if float((rates - shifted(mid)).mean()) < drop:
                low = mid
            else:
                high = mid
        return shifted(high)
    if pattern == "broken_subset":
        rng = rng or np.random.default_rng(0)
        order = rng.permutation(rates.size)
        need, out = drop * rates.size, rates.copy()
        for i in order:
            if need <= _EPS:
                break
            take = min(rates[i], need)
            out[i] = rates[i] - take
            need -= take
        return out
    raise ValueError(f"unknown pattern {pattern!r} (one of {PATTERNS})")


# ---------------------------------------------------------------------------------------------------------
# Simulated runs through the shipped decision code


@dataclass(frozen=True)
class Draws:
    """One side's simulated runs: (sims, n) successes and truncated samples out of k per question."""

    k: int
    successes: np.ndarray
    truncated: np.ndarray


def draw(rng: np.random.Generator, k: int, rates: np.ndarray, truncation: np.ndarray, sims: int,
         with_truncation: bool = True) -> Draws:
    """k samples per question: correct ~ Bin(k, p); truncated among the wrong ones ~ Bin(k - correct,
    tau / (1 - p)) (a truncated answer is wrong; the same joint law as drawing each sample's outcome).
    One sample per question uses one uniform per question."""
    shape = (sims, rates.shape[-1])
    rates, truncation = np.broadcast_to(rates, shape), np.broadcast_to(truncation, shape)
    with_truncation = with_truncation and bool(truncation.any())
    if k == 1:  # one uniform per question: below p correct, in [p, p + tau) truncated
        u = rng.random(shape, dtype=np.float32)
        successes = u < rates
        truncated = (u < rates + truncation) & ~successes if with_truncation else None
    else:
        successes = rng.binomial(k, rates)
        truncated = None
        if with_truncation:
            among_wrong = np.divide(truncation, 1.0 - rates, out=np.zeros(shape), where=rates < 1.0)
            truncated = rng.binomial(k - successes, np.clip(among_wrong, 0.0, 1.0))
    return Draws(k, successes, np.zeros(shape, bool) if truncated is None else truncated)


def _draw(rng: np.random.Generator, k: int, rates: np.ndarray, truncation: np.ndarray, sims: int,
          rule: TaskGate) -> Draws:
    """draw(), skipping the truncation counts when no rule looks at them."""
    needed = rule.truncation_margin is not None or rule.max_truncation_rate is not None
    return draw(rng, k, rates, truncation, sims, with_truncation=needed)


def decide_draws(candidate: Draws, baseline: Draws, rule: TaskGate) -> tuple[np.ndarray, np.ndarray]:
    """(result, status) per simulated run: the decision `decide_task(compare_task(...))` makes on these
    outcomes (no errors: every sample has an outcome)."""
    kc, kb = candidate.k, baseline.k
    accuracy = noninferiority_rows(candidate.successes / kc, baseline.successes / kb, kc, kb, rule.margin,
                                   rule.alpha).verdict
    if rule.truncation_margin is None:
        truncation = np.full(accuracy.shape, "off")
    else:
        truncation = noninferiority_rows(1.0 - candidate.truncated / kc, 1.0 - baseline.truncated / kb, kc, kb,
                                         rule.truncation_margin, rule.alpha).verdict
    floor = (candidate.successes == 0).all(axis=1) & (baseline.successes == 0).all(axis=1)
    ceiling = (candidate.successes == kc).all(axis=1) & (baseline.successes == kb).all(axis=1)
    capped = np.zeros(accuracy.shape, bool)
    if rule.max_truncation_rate is not None:
        for side in (candidate, baseline):
            capped |= side.truncated.sum(axis=1) / (side.k * side.truncated.shape[1]) > rule.max_truncation_rate
    return gate_outcome(accuracy, truncation, floor | ceiling, np.zeros(accuracy.shape, bool), capped,
                        rule.on_inconclusive, rule.uninformative_counts_as)


def _share(flags: np.ndarray) -> float:
    return float(np.mean(flags))


CHUNK_ELEMENTS = 1_500_000  # simulated questions held at once (sims x n): bounds memory for MMLU-sized tasks


def _chunks(sims: int, n: int) -> list[int]:
    size = max(1, CHUNK_ELEMENTS // max(n, 1))
    return [min(size, sims - start) for start in range(0, sims, size)]


def _resampled_status(rng: np.random.Generator, design: TaskDesign, drop: float,
                      population: dict[str, np.ndarray], m: int) -> dict[str, np.ndarray]:
    """Statuses of m runs per pattern with each run's questions drawn with replacement from the profile (one
    draw of questions and baseline samples shared by the patterns); the expected drop is `drop`."""
    rates, tau, rule = design.rates, design.truncation, design.rule
    index = rng.integers(0, design.n, size=(m, design.n))
    base_rates, base_tau = rates[index], tau[index]
    base = _draw(rng, design.k_baseline, base_rates, base_tau, m, rule)
    statuses = {}
    for pattern in PATTERNS:
        if pattern == "broken_subset":  # each question broken with the probability giving E[drop] = drop
            cand_rates = np.where(rng.random(index.shape) < drop / float(rates.mean()), 0.0, base_rates)
        else:  # the population's shift, applied to each drawn question
            cand_rates = population[pattern][index]
        cand = _draw(rng, design.k_candidate, cand_rates, np.minimum(base_tau, 1 - cand_rates), m, rule)
        statuses[pattern] = decide_draws(cand, base, rule)[1]
    return statuses


def resampled_pass(design: TaskDesign, drop: float, sims: int, seed: int = 0) -> dict[str, float]:
    """P(pass) per pattern when the expected drop over a population of questions is `drop` and each run's
    questions are a fresh sample (bench/gate_oc.py scans drops with it: what can be promised for the population)."""
    rng = np.random.default_rng([seed, _task_seed(design.task), 11])
    population = {pattern: drop_rates(design.rates, drop, pattern) for pattern in PATTERNS[:2]}
    parts: dict[str, list[np.ndarray]] = {}
    for m in _chunks(sims, design.n):
        for pattern, status in _resampled_status(rng, design, drop, population, m).items():
            parts.setdefault(pattern, []).append(status)
    return {pattern: _share(np.concatenate(chunks) == "pass") for pattern, chunks in parts.items()}


def task_sims(settings: Settings, n: int) -> int:
    return int(min(max(settings.sims, settings.elements // max(n, 1)), max(settings.max_sims, settings.sims)))


def simulate_task(design: TaskDesign, settings: Settings, per_task_power: float) -> tuple[dict, np.ndarray]:
    """The task's figures and its (sims,) bool array of "passed" for the identical candidate (for the joint rate)."""
    rng = np.random.default_rng([settings.seed, _task_seed(design.task)])
    sims = task_sims(settings, design.n)
    rule = design.rule
    rates, tau = design.rates, design.truncation
    mean = float(rates.mean())
    possible = 0.0 < rule.margin <= mean + _EPS
    plus = rule.margin + settings.plus_points
    fixed = {}  # the candidate's rates per fixed-set scenario
    if possible:
        subset_rng = np.random.default_rng([settings.seed, _task_seed(design.task), 7])  # one fixed broken subset
        fixed = {pattern: drop_rates(rates, rule.margin, pattern, subset_rng) for pattern in PATTERNS}
    if plus <= mean + _EPS:
        fixed["plus"] = drop_rates(rates, plus, "proportional")
    population = {pattern: drop_rates(rates, rule.margin, pattern) for pattern in PATTERNS[:2]} if possible else {}
    collected: dict[str, list[np.ndarray]] = {}

    def keep(name: str, values: np.ndarray) -> None:
        collected.setdefault(name, []).append(values)

    for m in _chunks(sims, design.n):
        base = _draw(rng, design.k_baseline, rates, tau, m, rule)
        same = _draw(rng, design.k_candidate, rates, tau, m, rule)
        result, status = decide_draws(same, base, rule)
        keep("identical_result", result)
        keep("identical", status)
        if rule.truncation_margin is not None:  # the same runs judged on accuracy alone: what truncation costs
            keep("accuracy_only", decide_draws(same, base, replace(rule, truncation_margin=None))[1])
        for name, cand_rates in fixed.items():
            cand = _draw(rng, design.k_candidate, cand_rates, np.minimum(tau, 1 - cand_rates), m, rule)
            result, status = decide_draws(cand, base, rule)
            keep(name, status)
            keep(f"{name}_result", result)
        if possible and settings.resampled:
            for pattern, status in _resampled_status(rng, design, rule.margin, population, m).items():
                keep(f"resampled_{pattern}", status)
    runs = {name: np.concatenate(parts) for name, parts in collected.items()}
    identical_pass = runs["identical"] == "pass"
    figures: dict = {
        "sims": sims,
        "questions": design.n,
        "samples": {"candidate": design.k_candidate, "baseline": design.k_baseline},
        "margin": rule.margin, "alpha": rule.alpha, "truncation_margin": rule.truncation_margin,
        "max_truncation_rate": rule.max_truncation_rate,
        "on_inconclusive": rule.on_inconclusive, "on_uninformative": rule.uninformative_counts_as,
        "rates": {"mean": mean, "within": float(np.mean(rates * (1 - rates))), "source": design.rates_source},
        "truncation": {"rate": float(tau.mean()), "source": design.truncation_source},
        "p_pass_identical": _share(identical_pass),
        "p_inconclusive_identical": _share(np.isin(runs["identical_result"], ("inconclusive", "uninformative"))),
        "p_truncation_blocks_identical": (_share((runs["accuracy_only"] == "pass") & ~identical_pass)
                                          if "accuracy_only" in runs else None),
        "p_pass_at_margin": {p: _share(runs[p] == "pass") if p in runs else None for p in PATTERNS},
    }
    if settings.resampled:
        figures["p_pass_at_margin_resampled"] = {
            p: _share(runs[f"resampled_{p}"] == "pass") if f"resampled_{p}" in runs else None for p in PATTERNS}
    # p: the line says FAIL (the regression is demonstrated); p_blocked: the task does not pass (FAIL, or an
    # inconclusive counted as fail)
    figures["p_fail_at_margin_plus"] = {"points": settings.plus_points, "pattern": "proportional",
                                        "p": _share(runs["plus_result"] == "fail") if "plus" in runs else None,
                                        "p_blocked": _share(runs["plus"] != "pass") if "plus" in runs else None}
    figures.update(_analytic(design, per_task_power))
    notes = list(design.notes)
    if not possible:
        notes.append(f"margin {100 * rule.margin:.1f} pts is not below the accuracy {100 * mean:.1f}%: no drop of "
                     "that size exists" if rule.margin > 0 else "margin 0: a superiority test; nothing at the margin")
    figures["notes"] = notes
    return figures, identical_pass


def _analytic(design: TaskDesign, per_task_power: float) -> dict:
    """The planner's figures: the margin these samples certify with the task's share of the identical-pass
    target, and the samples the configured margin needs (normal-theory, evalpipe.stats)."""
    rule, n = design.rule, design.n
    components = design.components()
    certifiable = minimum_detectable_effect(n, design.k_candidate, design.k_baseline, alpha=rule.alpha,
                                            power=per_task_power, components=components)
    needed = None
    if rule.margin > 0:
        needed = samples_needed(n, rule.margin, alpha=rule.alpha, power=per_task_power, components=components,
                                k_baseline=None if design.k_baseline == design.k_candidate else design.k_baseline)
    return {"per_task_power_target": per_task_power,
            "certifiable_margin": None if math.isinf(certifiable) else certifiable,
            "samples_for_margin": needed,
            "margin_certified": bool(math.isfinite(certifiable) and certifiable <= rule.margin + 1e-12)}


def _task_seed(task: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(task)) % (2**31)


def per_task_power(target: float, tasks: int) -> float:
    """Each task's pass probability under "identical" so that all `tasks` independent tasks pass with
    probability `target` (Sidak split of the false-block budget)."""
    return target ** (1.0 / max(tasks, 1))


def _mc_se(p: float, sims: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.25 / sims) / sims)  # never zero: an observed 0 or 1 is not exact


def operating_characteristics(designs: Sequence[TaskDesign], settings: Settings = Settings()) -> dict:
    """The gate's operating characteristics as one JSON-ready dict (see the module doc).

    P(exit 0 | identical) is the product of the tasks' pass rates: under an identical candidate the tasks'
    outcomes are independent (different questions, independent samples)."""
    power = per_task_power(settings.identical_pass_rate, len(designs))
    tasks = {}
    for design in designs:
        tasks[design.task], _ = simulate_task(design, settings, power)
    p_exit0 = float(np.prod([t["p_pass_identical"] for t in tasks.values()])) if designs else None
    exit0_se = (math.sqrt(sum((_mc_se(t["p_pass_identical"], t["sims"]) / max(t["p_pass_identical"], 1e-9)) ** 2
                              for t in tasks.values())) * p_exit0) if p_exit0 else None
    alpha = max((d.rule.alpha for d in designs), default=0.05)
    margin_ok, worst = True, None
    for figures in tasks.values():
        for p in figures["p_pass_at_margin"].values():
            if p is None:
                continue
            worst = p if worst is None else max(worst, p)
            margin_ok &= p <= figures["alpha"] + 2 * _mc_se(figures["alpha"], figures["sims"])
        figures["p_pass_identical_se"] = round(_mc_se(figures["p_pass_identical"], figures["sims"]), 4)
        figures["p_at_margin_se"] = round(_mc_se(figures["alpha"], figures["sims"]), 4)
    return {
        "method": "simulation of the shipped decision code (stats.noninferiority_rows, gate.gate_outcome); "
                  "p_pass_at_margin on a fixed question set, p_pass_at_margin_resampled with questions drawn anew",
        "sims": {task: figures["sims"] for task, figures in tasks.items()},
        "seed": settings.seed,
        "target": {"p_exit0_identical": settings.identical_pass_rate, "p_pass_at_margin": alpha,
                   "per_task_p_pass_identical": power},
        "p_exit0_identical": p_exit0,
        "p_exit0_identical_se": None if exit0_se is None else round(exit0_se, 4),
        "meets_targets": {
            "p_exit0_identical": None if p_exit0 is None else bool(
                p_exit0 >= settings.identical_pass_rate - 2 * (exit0_se or 0.0)),
            "p_pass_at_margin": None if worst is None else bool(margin_ok),
        },
        "not_simulated": ["request errors (none assumed)", "the divergence probe (not part of these figures)",
                          *settings.extra_notes],
        "tasks": tasks,
    }
