"""`evalpipe run` with a `baseline:`: both sides on the same plan, then comparison.json, report.md and the gate.

The baseline is a live endpoint (evaluated like the candidate, on identical questions, samples and seeds, into
<run_dir>/baseline/) or a registry entry (only the candidate is evaluated). Sides are evaluated one after the
other, each with the configured concurrency, so neither side's server load depends on the other's.

Adaptive tasks (`samples: auto`) run in stages: the run replays the looks over what the journals hold, sends
the samples the procedure wants next, and repeats until nothing more is wanted. Because the wanted samples are
a function of the journaled outcomes only, a resumed run continues exactly where the interrupted one was.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console

from evalpipe.adaptive import AdaptiveDesign, replay
from evalpipe.client import EndpointPool
from evalpipe.compare_report import comparison_markdown, comparison_table, gate_lines
from evalpipe.comparison import (
    SideOutcomes,
    TaskResult,
    comparability_problems,
    compare_sides,
    comparison_document,
    side_outcomes,
)
from evalpipe.config import RegistrySide, RunConfig, ServedSide
from evalpipe.errors import EndpointError, UserError
from evalpipe.gate import GateConfig, apply_gate
from evalpipe.journal import read_journal
from evalpipe.plan import TaskPlan
from evalpipe.progress import RunProgress
from evalpipe.records import SampleRecord
from evalpipe.report import report_markdown, results_table, summarize_side, truncation_warnings, write_json
from evalpipe.runner import (
    CANDIDATE,
    answered_keys,
    check_endpoint,
    create_run_dir,
    evaluate_side,
    load_resumable,
    preflight_side,
)
from evalpipe.stored import COMPARED_SAMPLING, StoredSide, load_registry, read_resolved_config

log = logging.getLogger(__name__)

BASELINE = "baseline"
Key = tuple[str, str, int]
stdout = Console(width=None if sys.stdout.isatty() else 180)


def plan_result(plan: TaskPlan, outcomes: SideOutcomes, adaptive: tuple[int, int] | None) -> TaskResult:
    sampling = plan.card.sampling.model_dump()
    return TaskResult(plan.card_hash, {name: sampling[name] for name in COMPARED_SAMPLING}, outcomes, adaptive)


def check_registry(stored: StoredSide, plans: Sequence[TaskPlan]) -> None:
    """Refuse a stored baseline that lacks a task, was run under another protocol, or shares no question."""
    missing = [p.name for p in plans if p.name not in stored.tasks]
    if missing:
        raise UserError(f"baseline {stored.source} has no results for {missing} (it has {sorted(stored.tasks)})")
    problems = comparability_problems(
        {p.name: plan_result(p, stored.tasks[p.name].outcomes, None).settings() for p in plans},
        {p.name: stored.tasks[p.name].settings() for p in plans},
    )
    if problems:
        raise UserError(f"baseline {stored.source} is not comparable with this config: " + "; ".join(problems))
    for plan in plans:
        stored_ids = set(stored.tasks[plan.name].outcomes.question_ids)
        absent = [qid for qid in plan.question_ids if qid not in stored_ids]
        if len(absent) == len(plan.question_ids):
            raise UserError(f"baseline {stored.source}: none of the {plan.name} questions of this config is stored")
        if absent:
            log.warning("%s: %d of %d questions are not in %s and will not be compared", plan.name, len(absent),
                        len(plan.question_ids), stored.source)


def _adaptive_designs(config: RunConfig, live_baseline: bool) -> dict[str, AdaptiveDesign]:
    return {e.task: AdaptiveDesign(e.min_samples, e.max_samples, baseline_adaptive=live_baseline)
            for e in config.tasks if e.adaptive}


def _gate_config(config: RunConfig) -> GateConfig:
    return config.gate or GateConfig()


def wanted_plans(
    config: RunConfig, plans: Sequence[TaskPlan], records: dict[str, list[SampleRecord]], stored: StoredSide | None
) -> list[TaskPlan]:
    """The plans cut to the samples wanted now: everything of fixed tasks, the adaptive procedure's choice else."""
    designs = _adaptive_designs(config, live_baseline=stored is None)
    outcomes = {side: side_outcomes(side_records) for side, side_records in records.items()}
    gate = _gate_config(config)
    stage = []
    for plan in plans:
        design = designs.get(plan.name)
        if design is None:
            stage.append(plan)
            continue
        ids, width = plan.question_ids, plan.samples
        empty = SideOutcomes((), np.empty((0, 0)), np.empty((0, 0), bool), np.empty((0, 0), bool))
        cand = outcomes[CANDIDATE].get(plan.name, empty).reindex(ids, width)
        if stored is None:
            base = outcomes[BASELINE].get(plan.name, empty).reindex(ids, width)
        else:
            source = stored.tasks[plan.name].outcomes
            base = source.reindex(ids, source.correct.shape[1])
        rule = gate.for_task(plan.name)
        progress = replay(cand.correct, cand.issued, base.correct, base.issued, design, rule.margin, rule.alpha)
        row = {qid: i for i, qid in enumerate(ids)}
        keep = tuple(r for r in plan.requests if progress.wanted[row[r.question_id], r.sample_index])
        stage.append(dataclasses.replace(plan, requests=keep))
    return stage


async def run_with_baseline(
    config: RunConfig, plans: list[TaskPlan], config_path: str, resume: Path | None, show_progress: bool
) -> tuple[Path, int]:
    stored = None
    if isinstance(config.baseline, RegistrySide):
        stored = load_registry(config.baseline.registry, config.baseline.registry_dir)
        check_registry(stored, plans)
    live: dict[str, ServedSide] = {CANDIDATE: config.candidate}
    if stored is None:
        live[BASELINE] = config.baseline
    pools = {side: EndpointPool(spec.base_url, spec.api_key, config.client) for side, spec in live.items()}
    try:
        previous = {side: load_resumable(resume, config, plans, side) if resume else [] for side in live}
        issued: dict[str, set[Key]] = {side: answered_keys(previous[side]) for side in live}
        first_stage = wanted_plans(config, plans, {side: [] for side in live}, stored)
        pilots: dict[str, list[SampleRecord]] = {}
        for side, spec in live.items():
            if resume:
                await check_endpoint(pools[side], side, spec, plans)
                pilots[side] = []
            else:
                pilots[side] = await preflight_side(pools[side], side, spec, first_stage, config, issued[side])
        run_dir = resume or create_run_dir(config, plans)
        journals = {side: run_dir / side / "journal.jsonl" for side in live}
        log.info("run dir: %s", run_dir)
        while True:
            records = {side: read_journal(journals[side]) + pilots[side] for side in live}
            stage = wanted_plans(config, plans, records, stored)
            pending = {side: sum(r.key not in issued[side] for p in stage for r in p.requests) for side in live}
            if not any(pending.values()) and not any(pilots.values()):
                break
            for side, spec in live.items():
                with RunProgress(stage, side, enabled=show_progress) as bar:
                    for plan in stage:
                        bar.already_done(plan.name, sum(r.key in issued[side] for r in plan.requests))
                    await evaluate_side(pools[side], spec, stage, config, journals[side], issued[side],
                                        pilots[side], bar.advance)
                issued[side] |= {r.key for p in stage for r in p.requests} | {r.key for r in pilots[side]}
                pilots[side] = []
        replicas = {side: {r.url: r.sent for r in pool.replicas} for side, pool in pools.items()}
    finally:
        for pool in pools.values():
            await pool.aclose()
    return run_dir, write_paired_results(config, plans, config_path, run_dir, stored, replicas)


def write_paired_results(
    config: RunConfig, plans: Sequence[TaskPlan], config_path: str, run_dir: Path, stored: StoredSide | None,
    replicas: dict[str, dict[str, int]],
) -> int:
    """Summaries per side, comparison.json and report.md; returns the exit code (the gate's, if configured)."""
    run_id = read_resolved_config(run_dir)["resolved"]["run_id"]
    live: dict[str, ServedSide] = {CANDIDATE: config.candidate}
    if stored is None:
        live[BASELINE] = config.baseline
    designs = _adaptive_designs(config, live_baseline=stored is None)
    sides, results, all_failed = {}, {}, False
    for side, spec in live.items():
        records = read_journal(run_dir / side / "journal.jsonl")
        endpoint = {"model": spec.model, "endpoint": ", ".join(spec.base_url), "concurrency": config.concurrency,
                    "requests sent per replica (this invocation)": replicas.get(side, {})}
        summary, details = summarize_side(records, plans, run_id=run_id, config_name=config.name, label=spec.label,
                                          extra_details={"endpoint": endpoint})
        write_json(run_dir / side / "summary.json", summary)
        write_json(run_dir / side / "details.json", details)
        sides[side] = (summary, details)
        outcomes = side_outcomes(records)
        results[side] = {
            p.name: plan_result(p, outcomes[p.name], (designs[p.name].min_samples, designs[p.name].max_samples)
                                if p.name in designs else None)
            for p in plans if p.name in outcomes
        }
        all_failed |= bool(records) and all(r.outcome == "error" for r in records)
    if stored is not None:
        summary = {**stored.summary, "tasks": {p.name: stored.summary["tasks"].get(p.name) for p in plans}}
        write_json(run_dir / BASELINE / "summary.json", summary)
        results[BASELINE] = {p.name: stored.tasks[p.name] for p in plans}
    gate = _gate_config(config)
    comparisons = compare_sides(results[CANDIDATE], results[BASELINE],
                                lambda task: (gate.for_task(task).margin, gate.for_task(task).alpha))
    document = comparison_document(comparisons)
    document["candidate"] = {"label": config.candidate.label, "source": f"{run_dir}/{CANDIDATE}", "run_id": run_id}
    document["baseline"] = {"label": stored.label if stored else config.baseline.label,
                            "source": stored.source if stored else f"{run_dir}/{BASELINE}",
                            "run_id": stored.run_id if stored else run_id}
    exit_code = EndpointError.exit_code if all_failed else 0
    if config.gate is not None:
        result = apply_gate(comparisons, config.gate)
        document["gate"] = result.to_dict()
        exit_code = max(exit_code, result.exit_code)
    write_json(run_dir / "comparison.json", document)
    warnings = truncation_warnings(sides[CANDIDATE][0], plans)
    report = report_markdown(config_name=config.name, run_dir=run_dir, sides=sides,
                             endpoint={"candidate": config.candidate.model,
                                       "baseline": stored.source if stored else config.baseline.model},
                             warnings=warnings, config_path=config_path)
    (run_dir / "report.md").write_text(report + "\n" + comparison_markdown(document), encoding="utf-8")
    for side, (summary, _) in sides.items():
        stdout.print(results_table(summary, side))
    stdout.print(comparison_table(document))
    for line in gate_lines(document):
        log.info(line)
    for warning in warnings:
        log.warning(warning)
    return exit_code
