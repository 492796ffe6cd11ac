"""Commands on stored results: `compare`, `gate`, `plan`, `baseline save`, `leaderboard`, `export`.

User mistakes print one line on stderr and exit 2 (see evalpipe.console.user_errors); `gate` exits like `run`
with a gate: 0 pass, 1 regression or inconclusive-as-fail, 2 config error, 3 infrastructure error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import typer

from evalpipe.cli.run import print_comparison
from evalpipe.comparison import IncomparableError, TaskComparison, compare_sides, setting_differences
from evalpipe.config import COMMAND_LINE_FIELDS, GateConfig
from evalpipe.console import setup_logging, stdout, user_errors
from evalpipe.decision import Decision, decide
from evalpipe.divergence_probe import load_probe
from evalpipe.errors import UserError
from evalpipe.operating import DEFAULT_SIMS, DEFAULT_TRUNCATION, Settings, operating_characteristics
from evalpipe.planning import (
    budget,
    budget_line,
    config_operating_characteristics,
    design_for,
    detectable_table,
    oc_lines,
    oc_table,
    plan_rows,
    planning_baseline,
)
from evalpipe.registry import (
    DEFAULT_REGISTRY_DIR,
    StoredSide,
    load_registry,
    load_run_side,
    resolve_side,
    save_baseline,
)
from evalpipe.render.comparison import comparison_markdown
from evalpipe.render.junit import junit_xml
from evalpipe.run_files import EXPORT_DIR, SideReference, file_payload, read_comparison, read_resolved_config
from evalpipe.runner import plan_from_config
from evalpipe.validation import validated

log = logging.getLogger(__name__)

RegistryDir = Annotated[str, typer.Option("--registry-dir", help="where stored baselines live")]
MarginOption = Annotated[float | None, typer.Option("--margin", help="non-inferiority margin, a fraction (0.05 = 5 "
                                                                     "points); replaces the run's gate setting")]
AlphaOption = Annotated[float | None, typer.Option("--alpha", help="one-sided test level")]
ForceOption = Annotated[bool, typer.Option(
    "--force", help="compare even when protocols (card_hash) or sampling settings differ; the differences are "
                    "printed and recorded in the comparison as forced_differences")]


def _recorded_gate(run_dir: Path) -> tuple[dict[str, Any], str]:
    raw = read_resolved_config(run_dir).get("gate")
    return dict(raw or {}), "the run's gate config" if raw else "defaults (the run has no gate section)"


def _gate_settings(run_dir: Path, margin: float | None, alpha: float | None,
                   on_inconclusive: str | None = None) -> GateConfig:
    """The run's `gate:` section (defaults if none) with command-line values on top."""
    raw, _ = _recorded_gate(run_dir)
    given = {"margin": margin, "alpha": alpha, "on_inconclusive": on_inconclusive}
    raw.update({key: value for key, value in given.items() if value is not None})
    for key, value in given.items():
        if value is not None:  # a command-line value wins over per-task values of the config too
            for override in raw.get("tasks", {}).values():
                override.pop(key, None)
    return validated(GateConfig, raw, "gate settings")


def command_line_overrides(run_dir: Path, settings: GateConfig, tasks: list[str]) -> list[dict[str, Any]]:
    """Each command-line gate setting that differs from what the run recorded, with the tasks it changed: the
    decision was made under other rules than the ones fixed before the results were seen."""
    raw, where = _recorded_gate(run_dir)
    recorded = validated(GateConfig, raw, "recorded gate settings")
    overrides = []
    for setting in COMMAND_LINE_FIELDS:
        changed: dict[Any, list[str]] = {}
        for task in tasks:
            before, after = getattr(recorded.for_task(task), setting), getattr(settings.for_task(task), setting)
            if before != after:
                changed.setdefault(before, []).append(task)
        for before, names in changed.items():
            overrides.append({"setting": setting, "command_line": getattr(settings.for_task(names[0]), setting),
                              "recorded": before, "recorded_from": where, "tasks": names})
    return overrides


def _missing_tasks(candidate: StoredSide, baseline: StoredSide) -> dict[str, str]:
    return {task: f"the baseline {baseline.source} has no results for it" for task in candidate.tasks
            if task not in baseline.tasks}


def _compare(candidate: StoredSide, baseline: StoredSide, gate: GateConfig, force: bool
             ) -> dict[str, TaskComparison]:
    """Every task both sides have (the caller deals with tasks the baseline lacks: _missing_tasks)."""
    try:
        comparisons = compare_sides(candidate.tasks, baseline.tasks,
                                    lambda task: (gate.for_task(task).margin, gate.for_task(task).alpha), force)
    except IncomparableError as exc:
        raise UserError(f"{candidate.source} vs {baseline.source}: {exc} (--force compares anyway)") from None
    if not comparisons:
        raise UserError(f"{candidate.source} and {baseline.source} have no task in common")
    return comparisons


def _reference(side: StoredSide) -> SideReference:
    return SideReference(label=side.label, source=side.source, run_id=side.run_id)


def _forced_differences(candidate: StoredSide, baseline: StoredSide) -> list[str]:
    forced = setting_differences(candidate.tasks, baseline.tasks)
    if forced:
        log.warning("compared across different protocols or sampling (--force): %s", "; ".join(forced))
    return forced


def _write_document(path: Path, decision: Decision) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(file_payload(decision.document), indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# evalpipe compare


def compare(
    run_a: Annotated[Path, typer.Argument(help="run directory of the candidate")],
    run_b: Annotated[str, typer.Argument(help="run directory (its candidate side) or registry name of the baseline")],
    margin: MarginOption = None,
    alpha: AlphaOption = None,
    registry_dir: RegistryDir = DEFAULT_REGISTRY_DIR,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the comparison document here")] = None,
    force: ForceOption = False,
) -> None:
    """Compare the candidate sides of two runs question by question and print the comparison table."""
    setup_logging(False)
    candidate, baseline = load_run_side(run_a), resolve_side(run_b, registry_dir)
    settings = _gate_settings(run_a, margin, alpha)
    comparisons = _compare(candidate, baseline, settings, force)
    decision = decide(comparisons, _reference(candidate), _reference(baseline),
                      forced_differences=_forced_differences(candidate, baseline),
                      missing_tasks=_missing_tasks(candidate, baseline),
                      overrides=command_line_overrides(run_a, settings, list(comparisons)))
    if json_out is not None:
        _write_document(json_out, decision)
    print_comparison(file_payload(decision.document))


# ---------------------------------------------------------------------------------------------------------
# evalpipe gate


def _gate_operating(run_dir: Path, own_baseline: bool, overrides: list[dict[str, Any]], candidate: StoredSide,
                    reference: StoredSide, settings: GateConfig, comparisons: dict[str, TaskComparison]
                    ) -> dict[str, Any] | None:
    """The operating characteristics of the gate as applied: the ones the run stated before it started when
    nothing changed, else simulated anew from this baseline's per-question outcomes and these settings."""
    stated = read_comparison(run_dir) if own_baseline and not overrides else None
    if stated is not None and stated.operating_characteristics is not None:
        return stated.operating_characteristics.model_dump()
    designs = []
    for task, comparison in comparisons.items():
        outcomes = reference.tasks[task].outcomes
        cand = candidate.tasks[task].outcomes
        counts = (~np.isnan(cand.correct)).sum(axis=1)
        k_candidate = max(1, round(float(counts[counts > 0].mean()))) if (counts > 0).any() else 1
        ids = [qid for qid in cand.question_ids if qid in set(outcomes.question_ids)]
        designs.append(design_for(task, settings.for_task(task), ids, k_candidate, None, outcomes, None, None,
                                  DEFAULT_TRUNCATION))
    if not designs:
        return None
    document = operating_characteristics(designs, Settings(identical_pass_rate=settings.identical_pass_rate))
    document["baseline_data"] = reference.source
    document["stated"] = "simulated when gated (settings or baseline differ from the run's)"
    return document


def gate(
    run_dir: Annotated[Path, typer.Argument(help="run directory whose candidate side is gated")],
    baseline: Annotated[str | None, typer.Option(
        "--baseline", help="run directory or registry name; default: the run's own baseline side")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="write JUnit XML (one testcase per task)")] = None,
    margin: MarginOption = None,
    alpha: AlphaOption = None,
    on_inconclusive: Annotated[Literal["fail", "pass"] | None, typer.Option(
        "--on-inconclusive", help="replaces the run's setting (recorded as an override)")] = None,
    registry_dir: RegistryDir = DEFAULT_REGISTRY_DIR,
    force: ForceOption = False,
    allow_missing_tasks: Annotated[bool, typer.Option(
        "--allow-missing-tasks", help="gate the tasks the baseline has and record the others as not compared "
                                      "(default: a task the baseline lacks is an input error, exit 2)")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the gate's comparison document here")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="write the comparison as markdown here")] = None,
) -> None:
    """Apply the non-inferiority gate to a stored run. Exit 0 pass, 1 regression, 2 config error, 3 infra."""
    setup_logging(False)
    candidate = load_run_side(run_dir)
    if baseline is not None:
        reference = resolve_side(baseline, registry_dir)
    elif (read_resolved_config(run_dir).get("baseline") or {}):
        reference = load_run_side(run_dir, "baseline")
    else:
        raise UserError(f"{run_dir} has no baseline side; give --baseline RUN_DIR_OR_REGISTRY_NAME")
    missing = _missing_tasks(candidate, reference)
    if missing and not allow_missing_tasks:
        raise UserError(f"{reference.source} has no results for {sorted(missing)}, which the candidate has: they "
                        "would not be gated (give --allow-missing-tasks to gate the rest and record them)")
    settings = _gate_settings(run_dir, margin, alpha, on_inconclusive)
    comparisons = _compare(candidate, reference, settings, force)
    overrides = command_line_overrides(run_dir, settings, list(comparisons))
    not_compared = {task: f"{why} (--allow-missing-tasks)" for task, why in missing.items()}
    decision = decide(
        comparisons, _reference(candidate), _reference(reference), gate=settings,
        # The divergence probe measured the candidate against the run's own baseline server: it counts only there.
        probe=load_probe(run_dir) if baseline is None else None,
        forced_differences=_forced_differences(candidate, reference), missing_tasks=not_compared,
        overrides=overrides,
        operating=_gate_operating(run_dir, baseline is None, overrides, candidate, reference, settings, comparisons))
    result = decision.gate
    document = file_payload(decision.document)
    print_comparison(document)
    if junit is not None:
        junit.parent.mkdir(parents=True, exist_ok=True)
        junit.write_text(junit_xml(result, overrides=overrides, not_compared=document.get("missing_tasks")),
                         encoding="utf-8")
    if json_out is not None:
        _write_document(json_out, decision)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(comparison_markdown(document), encoding="utf-8")
    stdout.print(f"gate: {result.status} (exit code {result.exit_code})", highlight=False)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


# ---------------------------------------------------------------------------------------------------------
# evalpipe plan


def plan(
    config: Annotated[Path, typer.Argument(help="run config (YAML)")],
    baseline: Annotated[str | None, typer.Option(
        "--baseline", help="run directory or registry name whose per-question outcomes estimate the variance; "
                           "default: the config's registry baseline, else the latest run of this config")] = None,
    power: Annotated[float, typer.Option(help="power at which the detectable regression is computed")] = 0.8,
    registry_dir: RegistryDir = DEFAULT_REGISTRY_DIR,
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object (operating characteristics, "
                                                             "budget, plan rows) and nothing else")] = False,
    sims: Annotated[int, typer.Option(help="fewest simulated runs per task (small tasks get more)")] = DEFAULT_SIMS,
) -> None:
    """Per task: requests, token budget, the smallest regression the run can detect and the samples it needs; then
    the gate's operating characteristics (its error rates as a whole, by simulation)."""
    setup_logging(False)
    if not 0.0 < power < 1.0:
        raise UserError(f"--power must be in (0, 1), got {power}")
    if sims < 10:
        raise UserError(f"--sims must be at least 10, got {sims}")
    run_config, plans = plan_from_config(config)
    reference = planning_baseline(run_config, baseline, registry_dir)
    settings = Settings(sims=sims, identical_pass_rate=(run_config.gate or GateConfig()).identical_pass_rate)
    document = config_operating_characteristics(run_config, plans, reference, settings)
    spend = budget(run_config, plans, reference)
    if json_output:
        header, rows = plan_rows(run_config, plans, reference, power=power)
        typer.echo(json.dumps({"config": run_config.name, "operating_characteristics": document, "budget": spend,
                               "plan": [dict(zip(header, row, strict=True)) for row in rows],
                               "variance_from": reference.source if reference else None}, indent=2))
        return
    stdout.print(detectable_table(run_config, plans, reference, power=power))
    stdout.print(f"variance from: {reference.source if reference else 'no baseline data (prior or worst case)'}",
                 highlight=False, soft_wrap=True)
    stdout.print(budget_line(spend), highlight=False, soft_wrap=True)
    print_operating_characteristics(document)


def print_operating_characteristics(document: dict | None) -> None:
    if document is None:
        stdout.print("operating characteristics: no gate in this config (nothing is decided)", highlight=False)
        return
    stdout.print(oc_table(document, "operating characteristics of the gate (simulated; nothing sent)"))
    for line in oc_lines(document):
        stdout.print(line, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------------------
# evalpipe baseline save


baseline_app = typer.Typer(help="The baseline registry: stored per-question outcomes reused by later runs.",
                           no_args_is_help=True)


@baseline_app.command("save")
@user_errors
def baseline_save(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    name: Annotated[str, typer.Option("--name", help="registry name, e.g. r1-fp8")],
    side: Annotated[Literal["candidate", "baseline"], typer.Option(help="which side of the run to store")] = "candidate",
    registry_dir: RegistryDir = DEFAULT_REGISTRY_DIR,
    force: Annotated[bool, typer.Option("--force", help="replace an existing entry")] = False,
) -> None:
    """Store a run's per-question outcomes, token statistics, card hashes and endpoint as a named baseline."""
    path = save_baseline(run_dir, name, side=side, registry_dir=registry_dir, force=force)
    stored = load_registry(name, registry_dir)
    stdout.print(f"saved baseline {name!r} ({stored.label}; tasks {', '.join(stored.tasks)}) to {path}",
                 highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------------------
# evalpipe leaderboard


def leaderboard(
    results_dir: Annotated[Path, typer.Argument(help="results folder holding runs and baselines")] = Path("results"),
) -> None:
    """Write RESULTS_DIR/leaderboard.md and a self-contained RESULTS_DIR/leaderboard.html (a row per run)."""
    from evalpipe.render.leaderboard import write_leaderboard  # pandas is imported here: `evalpipe --help` stays fast

    setup_logging(False)
    rows = write_leaderboard(results_dir)
    stdout.print(f"{rows} rows: {results_dir / 'leaderboard.md'}, {results_dir / 'leaderboard.html'}",
                 highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------------------
# evalpipe export


def export(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    file_format: Annotated[str, typer.Option("--format", help="csv or parquet")] = "csv",
    out: Annotated[Path | None, typer.Option("--out", help="folder for the files; default RUN_DIR/export")] = None,
) -> None:
    """Write the run's tables (samples, questions side by side, summary) as csv or parquet files."""
    from evalpipe.tables import export_run  # pandas is imported here, so that `evalpipe --help` stays fast

    setup_logging(False)
    for path in export_run(run_dir, out or run_dir / EXPORT_DIR, file_format):
        stdout.print(str(path), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("compare")(user_errors(compare))
    app.command("gate")(user_errors(gate))
    app.command("plan")(user_errors(plan))
    app.add_typer(baseline_app, name="baseline")
    app.command("leaderboard")(user_errors(leaderboard))
    app.command("export")(user_errors(export))
