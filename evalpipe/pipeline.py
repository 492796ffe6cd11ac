"""One run of a config, from Python or `evalpipe run`: `run(config)` -> `RunOutcome`.

The steps, in order: `runner.plan_from_config` (validate, load cards and data, build the plan; sends nothing) ->
`prepare_baseline` (a `registry:` baseline is loaded and checked against the plan) -> the divergence probe's
set-up -> the gate's operating characteristics, stated before anything is sent -> servers of `launch:` sides are
started -> `runner.execute_run` (preflight, evaluate every side into its journal in stages, summaries, report.md)
-> the divergence probe -> `compare_run` (comparison.json and the gate's decision, evalpipe.decision) -> the
leaderboard. The command line only parses flags, calls `run` and prints what it returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from evalpipe.adaptive_stages import adaptive_designs, adaptive_stages, gate_settings
from evalpipe.comparison import TaskResult, comparability_problems, compare_sides
from evalpipe.config import RegistrySide, RunConfig, load_config, parse_config
from evalpipe.decision import Decision, decide
from evalpipe.divergence_probe import ProbeResult, prepare_probe, run_probe, with_null_limit
from evalpipe.errors import UserError
from evalpipe.journal import read_journal
from evalpipe.launch import launched_sides, terminate_on_sigterm
from evalpipe.outcomes import SideOutcomes, side_outcomes
from evalpipe.planning import config_operating_characteristics, planning_baseline
from evalpipe.registry import COMPARED_SAMPLING, DEFAULT_REGISTRY_DIR, StoredSide, load_registry
from evalpipe.render.comparison import comparison_markdown
from evalpipe.run_files import (
    BASELINE,
    CANDIDATE,
    COMPARISON,
    REPORT,
    SERVER_LOGS,
    ComparisonFile,
    SideDetails,
    SideReference,
    SideSummary,
    file_payload,
    journal_path,
    saved_run_id,
    summary_path,
    write_file,
)
from evalpipe.runner import RunResult, execute_run, new_run_dir, plan_from_config, sides_of
from evalpipe.task_plan import TaskPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    """What a finished run produced; every figure is also in the run directory's files."""

    run_dir: Path
    summaries: dict[str, SideSummary]  # per evaluated side (candidate, a live baseline): summary.json
    details: dict[str, SideDetails]  # per evaluated side: details.json
    comparison: ComparisonFile | None  # comparison.json; None without a baseline
    exit_code: int  # as `evalpipe run` exits: 0; 1 the gate failed; 3 every request failed, or too many errors
    warnings: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> Literal["pass", "fail", "inconclusive"] | None:
        """The comparison's overall verdict (None without a baseline)."""
        return self.comparison.verdict if self.comparison is not None else None

    @property
    def gate(self) -> str | None:
        """The gate's status (pass, fail or error); None when the config has no gate."""
        return self.comparison.gate.status if self.comparison is not None and self.comparison.gate else None


def _validated(config: RunConfig | dict[str, Any] | str | Path) -> tuple[RunConfig, str | None]:
    """The validated config and, when it came from a file, that file (report.md's resume line names it)."""
    if isinstance(config, RunConfig):
        return config, None
    if isinstance(config, dict):
        return parse_config(config, "config"), None
    return load_config(config), str(config)


def run(
    config: RunConfig | dict[str, Any] | str | Path, *, resume: str | Path | None = None,
    show_progress: bool = False,
) -> RunOutcome:
    """Run `config` (a YAML file, a dict in the same shape, or a validated RunConfig) like `evalpipe run`: evaluate
    every side into a new run directory (or complete `resume`), compare with the baseline and apply the gate.

    Raises UserError (exit code 2) or EndpointError (3) for bad input or an unusable endpoint, before anything
    is written; KeyboardInterrupt leaves every finished sample in the journal, to complete with `resume`."""
    run_config, config_path = _validated(config)
    run_config, plans = plan_from_config(run_config)
    resume = Path(resume) if resume is not None else None
    if resume is not None and not resume.is_dir():
        raise UserError(f"--resume: no such run directory: {resume}")
    stored_baseline = prepare_baseline(run_config, plans)
    probe_setup = prepare_probe(run_config)
    run_config = with_null_limit(run_config, probe_setup)
    # The gate's error rates, stated before anything is sent; comparison.json and report.md carry them.
    operating = config_operating_characteristics(
        run_config, plans, planning_baseline(run_config, None, DEFAULT_REGISTRY_DIR, exclude=resume))
    run_dir = resume or new_run_dir(run_config)
    probe = None
    # Servers of `launch:` sides live exactly as long as this block, whatever ends it (SIGTERM included).
    with terminate_on_sigterm(), launched_sides(run_config, run_dir / SERVER_LOGS, show_progress) as live_config:
        result = asyncio.run(execute_run(live_config, plans, config_path, resume, show_progress,
                                         stages=adaptive_stages(live_config, plans, stored_baseline),
                                         new_dir=run_dir))
        if probe_setup is not None:
            probe = run_probe(live_config, probe_setup, plans, result.run_dir, show_progress)
    for warning in result.warnings:
        log.warning(warning)
    if result.exit_code:
        log.error("every request failed; see the error fields in the journal")
    decision = None
    if run_config.baseline is not None:
        decision = compare_run(live_config, plans, result, stored_baseline, probe, operating=operating)
    if run_config.leaderboard is not None:
        from evalpipe.render.leaderboard import write_leaderboard  # pandas, loaded only when a leaderboard is asked

        Path(run_config.leaderboard).mkdir(parents=True, exist_ok=True)
        rows = write_leaderboard(Path(run_config.leaderboard), [result.run_dir])
        log.info("leaderboard: %d rows in %s/leaderboard.{md,html}", rows, run_config.leaderboard)
    return RunOutcome(
        run_dir=result.run_dir,
        summaries={side: SideSummary.model_validate(summary) for side, (summary, _) in result.sides.items()},
        details={side: SideDetails.model_validate(details) for side, (_, details) in result.sides.items()},
        comparison=decision.document if decision is not None else None,
        exit_code=max(result.exit_code, decision.exit_code if decision is not None else 0),
        warnings=list(result.warnings),
    )


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

def compare_run(
    config: RunConfig, plans: Sequence[TaskPlan], result: RunResult, stored: StoredSide | None,
    probe: ProbeResult | None = None, operating: dict[str, Any] | None = None,
) -> Decision:
    """Write comparison.json and the comparison section of report.md; return the comparison with the gate's
    decision when one is configured. The divergence probe's result, if any, is part of both."""
    run_dir = result.run_dir
    designs = adaptive_designs(config)
    results: dict[str, dict[str, TaskResult]] = {}
    for side, _ in sides_of(config):
        outcomes = side_outcomes(read_journal(journal_path(run_dir, side)))
        results[side] = {
            p.name: plan_result(p, outcomes[p.name], (designs[p.name].min_samples, designs[p.name].max_samples,
                                                      designs[p.name].spending) if p.name in designs else None)
            for p in plans if p.name in outcomes
        }
    if stored is not None:
        write_file(summary_path(run_dir, BASELINE), SideSummary.model_validate(
            {**stored.summary, "tasks": {p.name: stored.summary["tasks"].get(p.name) for p in plans}}))
        results[BASELINE] = {p.name: stored.tasks[p.name] for p in plans}
    gate = gate_settings(config)
    comparisons = compare_sides(results[CANDIDATE], results[BASELINE],
                                lambda task: (gate.for_task(task).margin, gate.for_task(task).alpha))
    run_id = saved_run_id(run_dir)
    candidate = SideReference(label=config.candidate.label, source=f"{run_dir}/{CANDIDATE}", run_id=run_id)
    baseline = (SideReference(label=stored.label, source=stored.source, run_id=stored.run_id) if stored is not None
                else SideReference(label=config.baseline.label, source=f"{run_dir}/{BASELINE}", run_id=run_id))
    # `operating`: the gate's error rates as stated before the run (evalpipe.operating)
    decision = decide(comparisons, candidate, baseline, gate=config.gate, probe=probe, operating=operating)
    write_file(run_dir / COMPARISON, decision.document)
    report = run_dir / REPORT
    report.write_text(report.read_text(encoding="utf-8") + "\n" + comparison_markdown(file_payload(decision.document)),
                      encoding="utf-8")
    return decision
