"""`evalpipe plan`: what a config will cost and what its gate promises, before anything is sent.

Per task: questions, samples, requests and token budget per side, the minimum detectable regression at the
gate's alpha and the chosen power, and the samples per question needed to certify the configured margin. The
variance comes from a baseline's per-question outcomes (between/within split, evalpipe.stats) when one is
available, else from the config's stated prior (`planning.accuracy`), else from the worst case p = 0.5.

Then the gate's operating characteristics (evalpipe.operating): P(exit 0 | candidate identical to the baseline)
for the whole gate, and per task P(pass | drop = margin) under three drop patterns, P(FAIL | drop = margin +
3 points), the margin the samples can certify with the task's share of the identical-pass target, and the
samples the configured margin needs. `task_designs` turns a config (or two stored sides) into what the
simulator needs; the same figures go into `--dry-run`, `plan --json`, and every run's report.md and
comparison.json.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from rich.table import Table

from evalpipe.adaptive import AdaptiveDesign
from evalpipe.config import GateConfig, RegistrySide, RunConfig
from evalpipe.errors import UserError
from evalpipe.operating import (
    DEFAULT_TRUNCATION,
    PATTERNS,
    Settings,
    TaskDesign,
    homogeneous,
    operating_characteristics,
    shrunk_rates,
    spread_truncation,
)
from evalpipe.outcomes import SideOutcomes
from evalpipe.registry import StoredSide, load_registry, load_run_side, resolve_side
from evalpipe.run_files import summary_path
from evalpipe.stats import WORST_CASE, minimum_detectable_effect, samples_needed, variance_components
from evalpipe.task_plan import TaskPlan

log = logging.getLogger(__name__)

HEADER = ("task", "questions", "samples", "requests", "max_tokens", "token budget", "tokens expected",
          "variance (per sample)", "detectable Δ pts", "margin pts", "samples for margin at --power")


def planning_baseline(config: RunConfig, reference: str | None, registry_dir: str,
                      exclude: Path | None = None) -> StoredSide | None:
    """Where per-question variance comes from: --baseline, else the config's registry entry, else the latest
    earlier run of this config (its baseline side if it had one, else its candidate side; never `exclude`, the
    run being made), else nothing."""
    if reference is not None:
        return resolve_side(reference, registry_dir)
    if isinstance(config.baseline, RegistrySide):
        try:
            return load_registry(config.baseline.registry, config.baseline.registry_dir)
        except UserError as exc:  # planning comes before the baseline exists; `run` insists on it
            log.warning("%s; planning with the stated prior (planning.accuracy) or the worst case", exc)
            return None
    side = "baseline" if config.baseline is not None else "candidate"
    for run_dir in sorted(Path(config.output_dir, config.name).glob("*/"), reverse=True):
        if exclude is not None and run_dir.resolve() == Path(exclude).resolve():
            continue
        if summary_path(run_dir, side).is_file():
            return load_run_side(run_dir, side)
    return None


def _format_tokens(tokens: float | None) -> str:
    if tokens is None:
        return "-"
    return f"{tokens / 1e6:,.1f}M" if tokens >= 1e6 else f"{tokens:,.0f}"


def plan_rows(
    config: RunConfig, plans: list[TaskPlan], reference: StoredSide | None, *, power: float
) -> tuple[tuple[str, ...], list[list[str]]]:
    gate = config.gate or GateConfig()
    entries = {entry.task: entry for entry in config.card_tasks}
    stored_baseline = isinstance(config.baseline, RegistrySide)
    rows = []
    for plan in plans:
        entry, rule = entries[plan.name], gate.for_task(plan.name)
        n, k = len(plan.questions), plan.samples
        alpha = rule.alpha
        samples = str(k)
        if entry.adaptive:
            design = AdaptiveDesign(entry.min_samples, entry.max_samples, entry.spending)
            alpha = design.look_alpha(rule.alpha)  # the last look's nominal level under the spending function
            samples = f"auto {entry.min_samples}-{entry.max_samples}"
        components, source, k_baseline, tokens_mean = WORST_CASE, "worst case p=0.5", None, None
        stored = reference.tasks.get(plan.name) if reference else None
        if stored is not None:
            outcomes = stored.outcomes.reindex(plan.question_ids, stored.outcomes.correct.shape[1])
            components = variance_components(outcomes.correct)
            if components is not WORST_CASE:
                source = f"within {components.within:.3f}, between {components.between:.3f}"
            if stored_baseline:
                counts = (~np.isnan(outcomes.correct)).sum(axis=1)
                k_baseline = max(1, round(float(counts[counts > 0].mean()))) if (counts > 0).any() else None
            tokens_mean = ((reference.summary.get("tasks", {}).get(plan.name) or {}).get("completion_tokens")
                           or {}).get("mean")
        requests = len(plan.requests)
        detectable = minimum_detectable_effect(n, k, k_baseline, alpha=alpha, power=power, components=components)
        needed = samples_needed(n, rule.margin, alpha=alpha, power=power, components=components,
                                k_baseline=k_baseline) if rule.margin > 0 else None
        rows.append([
            plan.name, str(n), samples, f"{requests:,}", f"{plan.card.sampling.max_tokens:,}",
            _format_tokens(requests * plan.card.sampling.max_tokens),
            _format_tokens(requests * tokens_mean if tokens_mean else None), source,
            "-" if math.isinf(detectable) else f"{100 * detectable:.1f}", f"{100 * rule.margin:.1f}",
            str(needed) if needed is not None else (
                f"unreachable (baseline has {k_baseline})" if k_baseline else "over 1024"),
        ])
    return HEADER, rows


def detectable_table(config: RunConfig, plans: list[TaskPlan], reference: StoredSide | None, *, power: float) -> Table:
    header, rows = plan_rows(config, plans, reference, power=power)
    table = Table(title=f"plan for {config.name} (alpha from the gate, power {power:g}; nothing sent)")
    for name in header:
        table.add_column(name, justify="left" if name in ("task", "variance (per sample)") else "right")
    for row in rows:
        table.add_row(*row)
    return table


# ---------------------------------------------------------------------------------------------------------
# Operating characteristics and budget


def design_for(task: str, rule, n_ids: list[str], k_candidate: int, k_baseline: int | None,
               outcomes: SideOutcomes | None, prior: float | None, prior_source: str | None,
               assumed_truncation: float, notes: tuple[str, ...] = ()) -> TaskDesign:
    """One task's simulator input: rates from the baseline's outcomes, else the stated prior, else p = 0.5."""
    n = len(n_ids)
    if outcomes is not None:
        side = outcomes.reindex(n_ids, outcomes.correct.shape[1])
        counts = (~np.isnan(side.correct)).sum(axis=1)
        if (counts > 0).any():
            rates, how = shrunk_rates(np.nansum(side.correct, axis=1), counts)
            observed = side.rate(side.truncated)
            truncation = spread_truncation(rates, observed)
            k_base = k_baseline or max(1, round(float(counts[counts > 0].mean())))
            return TaskDesign(task, rates, truncation, k_candidate, k_base, rule, f"baseline data: {how}",
                              f"the baseline's observed {100 * observed:.1f}%, spread evenly over questions "
                              "(capped at each question's error rate)", notes)
    if prior is not None:
        rates = homogeneous(n, prior)
        source = f"stated prior {100 * prior:.1f}%" + (f" ({prior_source})" if prior_source else "")
        how = f"{source}, every question at it (the most within-question variance for that mean)"
    else:
        rates = homogeneous(n, 0.5)
        how = "no baseline data and no prior: worst case, every question at p = 0.5"
    truncation = spread_truncation(rates, assumed_truncation)
    return TaskDesign(task, rates, truncation, k_candidate, k_baseline or k_candidate, rule, how,
                      f"assumed {100 * assumed_truncation:.1f}% on both sides (nothing measured), spread evenly "
                      "(capped at each question's error rate)", notes)


def task_designs(config: RunConfig, plans: list[TaskPlan], reference: StoredSide | None) -> list[TaskDesign]:
    """The gated accuracy tasks of a config as simulator inputs (see design_for)."""
    gate = config.gate or GateConfig()
    entries = {entry.task: entry for entry in config.card_tasks}
    stored_baseline = isinstance(config.baseline, RegistrySide)
    designs = []
    for plan in plans:
        entry = entries[plan.name]
        k, notes = plan.samples, ()
        if entry.adaptive:
            k = entry.min_samples
            notes = (f"samples: auto ({entry.min_samples}-{entry.max_samples}) is simulated as a fixed design at its "
                     f"first stage ({entry.min_samples} samples) at the gate's alpha: the adaptive procedure's own "
                     "figures are not simulated here",)
        stored = reference.tasks.get(plan.name) if reference is not None else None
        k_baseline = None if stored_baseline else k  # a live baseline is sampled like the candidate
        designs.append(design_for(plan.name, gate.for_task(plan.name), plan.question_ids, k, k_baseline,
                                  stored.outcomes if stored is not None else None,
                                  config.planning.accuracy.get(plan.name), config.planning.source,
                                  config.planning.truncation_rate, notes))
    return designs


def config_operating_characteristics(config: RunConfig, plans: list[TaskPlan], reference: StoredSide | None,
                                     settings: Settings | None = None) -> dict | None:
    """The operating characteristics of the config's gate (None without a gate)."""
    if config.gate is None or config.baseline is None:
        return None
    settings = settings or Settings(identical_pass_rate=config.gate.identical_pass_rate)
    document = operating_characteristics(task_designs(config, plans, reference), settings)
    document["baseline_data"] = reference.source if reference is not None else None
    return document


def budget(config: RunConfig, plans: list[TaskPlan], reference: StoredSide | None) -> dict:
    """Requests and completion tokens: per task per side, and in all (tokens expected from the reference's
    measured mean completion length when there is one)."""
    stored = isinstance(config.baseline, RegistrySide)
    sides = 1 if stored or config.baseline is None else 2
    tasks, total_requests, total_max, total_expected, known = {}, 0, 0, 0.0, True
    for plan in plans:
        requests, max_tokens = len(plan.requests), plan.card.sampling.max_tokens
        mean = None
        if reference is not None:
            mean = ((reference.summary.get("tasks", {}).get(plan.name) or {}).get("completion_tokens") or {}).get("mean")
        tasks[plan.name] = {"questions": len(plan.questions), "samples": plan.samples, "requests": requests,
                            "max_tokens": max_tokens, "max_completion_tokens": requests * max_tokens,
                            "expected_completion_tokens": None if mean is None else round(requests * mean)}
        total_requests += requests
        total_max += requests * max_tokens
        if mean is None:
            known = False
        else:
            total_expected += requests * mean
    return {"sides_evaluated": sides,
            "sides": "candidate only (stored baseline)" if stored else (
                "candidate and baseline" if config.baseline is not None else "candidate only (no baseline)"),
            "per_side": {"requests": total_requests, "max_completion_tokens": total_max,
                         "expected_completion_tokens": round(total_expected) if known else None},
            "total": {"requests": sides * total_requests, "max_completion_tokens": sides * total_max,
                      "expected_completion_tokens": round(sides * total_expected) if known else None},
            "tasks": tasks}


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


OC_HEADER = ("task", "questions x k (cand/base)", "margin pts", "trunc. margin pts", "P(pass | identical)",
             "P(pass | Δ=margin) prop / logit / broken", "resampled: prop / logit / broken", "P(FAIL | margin+)",
             "certifiable margin pts", "samples for margin")


def oc_rows(document: dict) -> list[list[str]]:
    rows = []
    for task, t in document["tasks"].items():
        samples = t["samples"]
        resampled = t.get("p_pass_at_margin_resampled") or {}
        plus = t["p_fail_at_margin_plus"]
        rows.append([
            task, f"{t['questions']} x {samples['candidate']}/{samples['baseline']}", f"{100 * t['margin']:.1f}",
            "off" if t["truncation_margin"] is None else f"{100 * t['truncation_margin']:.1f}",
            _p(t["p_pass_identical"]),
            " / ".join(_p(t["p_pass_at_margin"][p]) for p in PATTERNS),
            " / ".join(_p(resampled.get(p)) for p in PATTERNS) if resampled else "-",
            f"{_p(plus['p'])} (+{100 * plus['points']:.0f} pts)",
            "-" if t["certifiable_margin"] is None else f"{100 * t['certifiable_margin']:.1f}",
            "-" if t["samples_for_margin"] is None else str(t["samples_for_margin"]),
        ])
    return rows


def oc_lines(document: dict) -> list[str]:
    """The operating characteristics in words: the gate-wide figure against its target, where the rates come
    from, what each task's samples can certify, and what is not simulated."""
    target = document["target"]
    p_exit0, met = document["p_exit0_identical"], document["meets_targets"]
    lines = [f"P(exit 0 | candidate identical to the baseline) = {_p(p_exit0)} ± {document['p_exit0_identical_se']} "
             f"(target {target['p_exit0_identical']:g}: {'met' if met['p_exit0_identical'] else 'NOT met'}); "
             f"each task's share: {target['per_task_p_pass_identical']:.4f}",
             f"P(pass | true drop = margin) on the fixed question set: target <= {target['p_pass_at_margin']:g} per task "
             f"({'met' if met['p_pass_at_margin'] else 'NOT met'} within 2 simulation standard errors); a gate "
             "that needs every task to pass is at most as likely to pass as its weakest task"]
    for task, t in document["tasks"].items():
        lines.append(f"{task}: rates from {t['rates']['source']}; mean {100 * t['rates']['mean']:.1f}%; truncation "
                     f"{t['truncation']['source']}; {t['sims']} simulated runs")
        if not t["margin_certified"] and t["certifiable_margin"] is not None:
            need = (f"the margin needs {t['samples_for_margin']} samples per question" if t["samples_for_margin"]
                    else "no number of candidate samples reaches it against this baseline")
            lines.append(f"{task}: {t['samples']['candidate']} samples cannot certify margin {100 * t['margin']:.1f} "
                         f"pts at the task's identical-pass share {t['per_task_power_target']:.4f}; they certify "
                         f"{100 * t['certifiable_margin']:.1f} pts ({need})")
        lines += [f"{task}: {note}" for note in t["notes"]]
    lines.append("not simulated: " + "; ".join(document["not_simulated"]))
    return lines


def oc_table(document: dict, title: str) -> Table:
    table = Table(title=title)
    for name in OC_HEADER:
        table.add_column(name, justify="left" if name == "task" else "right")
    for row in oc_rows(document):
        table.add_row(*row)
    return table


def oc_markdown(document: dict, heading: str = "### Operating characteristics (stated before the run)") -> list[str]:
    lines = [heading, "", "| " + " | ".join(OC_HEADER) + " |", "|" + "---|" * len(OC_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in oc_rows(document)]
    return lines + [""] + [f"- {line}" for line in oc_lines(document)]


def budget_line(document: dict) -> str:
    side, total = document["per_side"], document["total"]
    expected = side["expected_completion_tokens"]
    return (f"budget: {side['requests']:,} requests per side ({document['sides']}), at most "
            f"{_format_tokens(side['max_completion_tokens'])} completion tokens per side"
            + (f", about {_format_tokens(expected)} expected" if expected else ", expected tokens unknown (no "
               "measured lengths)")
            + f"; {total['requests']:,} requests in all")
