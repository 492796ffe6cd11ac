"""The baseline half of `evalpipe run`: a stored baseline's checks, adaptive stages, comparison.json and the gate.

`runner.execute_run` evaluates the candidate and a live baseline endpoint on the same plan (identical questions,
samples and seeds). This module adds what a baseline brings:

* `prepare_baseline`: a `registry:` baseline is loaded and checked against the plan before anything is sent.
* `adaptive_stages`: for `samples: auto` tasks the run goes in stages; before each, the looks are replayed over
  what the journals hold and the plan is cut to the samples the procedure wants next. The wanted samples are a
  function of the journaled outcomes only, so a resumed run continues exactly where the interrupted one was.
* `compare_run`: comparison.json, the comparison section of report.md and the gate's exit code.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from evalpipe.adaptive import AdaptiveDesign, replay
from evalpipe.comparison import (
    SideOutcomes,
    TaskResult,
    comparability_problems,
    compare_sides,
    comparison_document,
    side_outcomes,
)
from evalpipe.config import RegistrySide, RunConfig
from evalpipe.divergence_probe import ProbeResult, add_probe_section
from evalpipe.errors import UserError
from evalpipe.gate import GateConfig, apply_gate
from evalpipe.journal import read_journal
from evalpipe.registry import COMPARED_SAMPLING, StoredSide, load_registry
from evalpipe.render.comparison import comparison_markdown
from evalpipe.render.run_report import write_json
from evalpipe.runner import BASELINE, CANDIDATE, RunResult, Stages, saved_run_id, sides_of
from evalpipe.task_plan import TaskPlan

log = logging.getLogger(__name__)


def plan_result(plan: TaskPlan, outcomes: SideOutcomes, adaptive: tuple[int, int, str] | None) -> TaskResult:
    sampling = plan.card.sampling.model_dump()
    return TaskResult(plan.card_hash, {name: sampling[name] for name in COMPARED_SAMPLING}, outcomes, adaptive)


def prepare_baseline(config: RunConfig, plans: Sequence[TaskPlan]) -> StoredSide | None:
    """The stored baseline of a `registry:` config, refused when it lacks a task, was run under another protocol
    or sampling settings (each differing field listed), or shares no question with the plan."""
    if not isinstance(config.baseline, RegistrySide):
        return None
    stored = load_registry(config.baseline.registry, config.baseline.registry_dir)
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
    return stored


def _designs(config: RunConfig) -> dict[str, AdaptiveDesign]:
    live_baseline = not isinstance(config.baseline, RegistrySide)
    return {e.task: AdaptiveDesign(e.min_samples, e.max_samples, e.spending, baseline_adaptive=live_baseline)
            for e in config.card_tasks if e.adaptive}


def _gate(config: RunConfig) -> GateConfig:
    return config.gate or GateConfig()


_NO_OUTCOMES = SideOutcomes.from_codes([], [])


def wanted_plans(
    config: RunConfig, plans: Sequence[TaskPlan], outcomes: dict[str, dict[str, SideOutcomes]],
    stored: StoredSide | None,
) -> list[TaskPlan]:
    """The plans cut to the samples wanted now: every request of a fixed task, the adaptive procedure's choice
    for a `samples: auto` task. `outcomes` maps each evaluated side to its outcomes so far."""
    designs, gate = _designs(config), _gate(config)
    stage = []
    for plan in plans:
        design = designs.get(plan.name)
        if design is None:
            stage.append(plan)
            continue
        ids, width = plan.question_ids, plan.samples
        cand = outcomes[CANDIDATE].get(plan.name, _NO_OUTCOMES).reindex(ids, width)
        if stored is None:
            base = outcomes[BASELINE].get(plan.name, _NO_OUTCOMES).reindex(ids, width)
        else:
            source = stored.tasks[plan.name].outcomes
            base = source.reindex(ids, source.correct.shape[1])
        rule = gate.for_task(plan.name)
        progress = replay(cand.correct, cand.issued, base.correct, base.issued, design, rule.margin, rule.alpha)
        row = {qid: i for i, qid in enumerate(ids)}
        keep = tuple(r for r in plan.requests if progress.wanted[row[r.question_id], r.sample_index])
        stage.append(dataclasses.replace(plan, requests=keep))
    return stage


def adaptive_stages(config: RunConfig, plans: Sequence[TaskPlan], stored: StoredSide | None) -> Stages | None:
    """The stages of a config with `samples: auto` tasks (None when it has none): stop when a stage would send
    nothing new."""
    if not _designs(config):
        return None

    def stages(run_dir: Path) -> Iterator[list[TaskPlan]]:
        previous: set[tuple[str, str, int]] | None = None
        while True:
            outcomes = {side: side_outcomes(read_journal(run_dir / side / "journal.jsonl"))
                        for side, _ in sides_of(config)}
            stage = wanted_plans(config, plans, outcomes, stored)
            keys = {r.key for p in stage for r in p.requests}
            if keys == previous:
                return
            previous = keys
            yield stage

    return stages


def compare_run(
    config: RunConfig, plans: Sequence[TaskPlan], result: RunResult, stored: StoredSide | None,
    probe: ProbeResult | None = None, operating: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], int]:
    """Write comparison.json and the comparison section of report.md; return the document and the exit code
    (the gate's when one is configured, else 0). The divergence probe's result, if any, is part of both."""
    run_dir = result.run_dir
    designs = _designs(config)
    results: dict[str, dict[str, TaskResult]] = {}
    for side, _ in sides_of(config):
        outcomes = side_outcomes(read_journal(run_dir / side / "journal.jsonl"))
        results[side] = {
            p.name: plan_result(p, outcomes[p.name], (designs[p.name].min_samples, designs[p.name].max_samples,
                                                      designs[p.name].spending) if p.name in designs else None)
            for p in plans if p.name in outcomes
        }
    if stored is not None:
        write_json(run_dir / BASELINE / "summary.json",
                   {**stored.summary, "tasks": {p.name: stored.summary["tasks"].get(p.name) for p in plans}})
        results[BASELINE] = {p.name: stored.tasks[p.name] for p in plans}
    gate = _gate(config)
    comparisons = compare_sides(results[CANDIDATE], results[BASELINE],
                                lambda task: (gate.for_task(task).margin, gate.for_task(task).alpha))
    run_id = saved_run_id(run_dir)
    document = comparison_document(comparisons)
    probe_outcome = add_probe_section(document, probe, config.gate) if probe is not None else None
    document["candidate"] = {"label": config.candidate.label, "source": f"{run_dir}/{CANDIDATE}", "run_id": run_id}
    document["baseline"] = (
        {"label": stored.label, "source": stored.source, "run_id": stored.run_id} if stored is not None
        else {"label": config.baseline.label, "source": f"{run_dir}/{BASELINE}", "run_id": run_id}
    )
    exit_code = 0
    if config.gate is not None:
        gated = apply_gate(comparisons, config.gate, probe_outcome)
        document["gate"] = gated.to_dict()
        exit_code = gated.exit_code
    if operating is not None:  # the gate's error rates as stated before the run (evalpipe.operating)
        document["operating_characteristics"] = operating
    write_json(run_dir / "comparison.json", document)
    report = run_dir / "report.md"
    report.write_text(report.read_text(encoding="utf-8") + "\n" + comparison_markdown(document), encoding="utf-8")
    return document, exit_code
