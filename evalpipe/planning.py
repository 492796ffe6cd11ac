"""`evalpipe plan`: what a config will cost and what it can detect, before anything is sent.

Per task: questions, samples, requests and token budget per side, the minimum detectable regression at the
gate's alpha and the chosen power, and the samples per question needed to certify the configured margin. The
variance comes from a baseline's per-question outcomes (between/within split, evalpipe.stats) when one is
available, else from the worst case p = 0.5.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from rich.table import Table

from evalpipe.adaptive import AdaptiveDesign
from evalpipe.config import RegistrySide, RunConfig
from evalpipe.errors import UserError
from evalpipe.gate import GateConfig
from evalpipe.plan import TaskPlan
from evalpipe.stats import WORST_CASE, minimum_detectable_effect, samples_needed, variance_components
from evalpipe.stored import StoredSide, load_registry, load_run_side, resolve_side

log = logging.getLogger(__name__)

HEADER = ("task", "questions", "samples", "requests", "max_tokens", "token budget", "tokens expected",
          "variance (per sample)", "detectable Δ pts", "margin pts", "samples for margin")


def planning_baseline(config: RunConfig, reference: str | None, registry_dir: str) -> StoredSide | None:
    """Where per-question variance comes from: --baseline, else the config's registry entry, else the latest
    earlier run of this config (its baseline side if it had one, else its candidate side), else nothing."""
    if reference is not None:
        return resolve_side(reference, registry_dir)
    if isinstance(config.baseline, RegistrySide):
        try:
            return load_registry(config.baseline.registry, config.baseline.registry_dir)
        except UserError as exc:  # planning comes before the baseline exists; `run` insists on it
            log.warning("%s; planning with the worst-case variance", exc)
            return None
    side = "baseline" if config.baseline is not None else "candidate"
    for run_dir in sorted(Path(config.output_dir, config.name).glob("*/"), reverse=True):
        if (run_dir / side / "summary.json").is_file():
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
            design = AdaptiveDesign(entry.min_samples, entry.max_samples)
            alpha = design.look_alpha(rule.alpha)  # the per-look level the adaptive test uses
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
