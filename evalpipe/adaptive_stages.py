"""The stages of a run with `samples: auto` tasks (adaptive sampling).

`runner.execute_run` evaluates the candidate and a live baseline endpoint on the same plan (identical questions,
samples and seeds). For `samples: auto` tasks the run goes in stages; before each, the looks are replayed over
what the journals hold and the plan is cut to the samples the procedure wants next. The wanted samples are a
function of the journaled outcomes only, so a resumed run continues exactly where the interrupted one was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

from evalpipe.adaptive import AdaptiveDesign, replay
from evalpipe.config import GateConfig, RegistrySide, RunConfig
from evalpipe.journal import read_journal
from evalpipe.outcomes import SideOutcomes, side_outcomes
from evalpipe.registry import StoredSide
from evalpipe.run_files import BASELINE, CANDIDATE, journal_path
from evalpipe.runner import Stages, sides_of
from evalpipe.task_plan import TaskPlan

def adaptive_designs(config: RunConfig) -> dict[str, AdaptiveDesign]:
    """The group-sequential design of each `samples: auto` task."""
    live_baseline = not isinstance(config.baseline, RegistrySide)
    return {e.task: AdaptiveDesign(e.min_samples, e.max_samples, e.spending, baseline_adaptive=live_baseline)
            for e in config.card_tasks if e.adaptive}


def gate_settings(config: RunConfig) -> GateConfig:
    return config.gate or GateConfig()


_NO_OUTCOMES = SideOutcomes.from_codes([], [])


def wanted_plans(
    config: RunConfig, plans: Sequence[TaskPlan], outcomes: dict[str, dict[str, SideOutcomes]],
    stored: StoredSide | None,
) -> list[TaskPlan]:
    """The plans cut to the samples wanted now: every request of a fixed task, the adaptive procedure's choice
    for a `samples: auto` task. `outcomes` maps each evaluated side to its outcomes so far."""
    designs, gate = adaptive_designs(config), gate_settings(config)
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
    if not adaptive_designs(config):
        return None

    def stages(run_dir: Path) -> Iterator[list[TaskPlan]]:
        previous: set[tuple[str, str, int]] | None = None
        while True:
            outcomes = {side: side_outcomes(read_journal(journal_path(run_dir, side)))
                        for side, _ in sides_of(config)}
            stage = wanted_plans(config, plans, outcomes, stored)
            keys = {r.key for p in stage for r in p.requests}
            if keys == previous:
                return
            previous = keys
            yield stage

    return stages
