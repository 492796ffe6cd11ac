"""`evalpipe run` and `evalpipe tasks`: the orchestrator's commands.

User mistakes (UserError) are printed on one line on stderr and exit with their code (2 input, 3 endpoint);
stdout carries only the intended output, and `run` ends it with the run directory's path.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from evalpipe.pipeline import run as run_pipeline
from evalpipe.cards import available_tasks, load_card
from evalpipe.config import RegistrySide, RunConfig, ServedSide
from evalpipe.console import setup_logging, stdout, user_errors
from evalpipe.launch import server_command
from evalpipe.planning import (
    budget,
    budget_line,
    config_operating_characteristics,
    detectable_table,
    oc_lines,
    oc_table,
    planning_baseline,
)
from evalpipe.registry import DEFAULT_REGISTRY_DIR
from evalpipe.render.comparison import comparison_table, divergence_lines, gate_lines
from evalpipe.render.run_report import plan_table, results_table
from evalpipe.run_files import file_payload
from evalpipe.runner import data_source, plan_from_config, sides_of
from evalpipe.task_plan import TaskPlan


# ---------------------------------------------------------------------------------------------------------
# evalpipe run


def run(
    config: Annotated[Path, typer.Argument(help="run config (YAML), e.g. configs/smoke.yaml")],
    resume: Annotated[Path | None, typer.Option("--resume", help="run directory to complete")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan and token budget; send nothing")] = False,
    progress: Annotated[bool, typer.Option(help="live progress bars on stderr")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Evaluate the config's candidate endpoint on its tasks; print the results and, last, the run dir."""
    setup_logging(verbose)
    if dry_run:
        print_plan(*plan_from_config(config))
        return
    try:
        outcome = run_pipeline(config, resume=resume, show_progress=progress and sys.stderr.isatty())
    except KeyboardInterrupt:
        typer.echo("interrupted; every finished sample is in the journal. Resume with --resume RUN_DIR", err=True)
        raise typer.Exit(130) from None
    for side, summary in outcome.summaries.items():
        stdout.print(results_table(file_payload(summary), side))
    if outcome.comparison is not None:
        print_comparison(file_payload(outcome.comparison))
    stdout.print(str(outcome.run_dir), highlight=False, soft_wrap=True)
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)


def print_comparison(document: dict[str, Any]) -> None:
    stdout.print(comparison_table(document))
    for line in divergence_lines(document):
        stdout.print(line, highlight=False, soft_wrap=True)
    for line in gate_lines(document):
        stdout.print(line, highlight=False, soft_wrap=True)


def _side_line(name: str, spec: ServedSide) -> str:
    if spec.launch is None:
        return f"{name} '{spec.label}': model {spec.model} at {', '.join(spec.urls)}"
    command = shlex.join(server_command(spec.launch, spec.model, "PORT"))
    return f"{name} '{spec.label}': launches `{command}` (a free loopback port for PORT)"


def print_plan(config: RunConfig, plans: list[TaskPlan]) -> None:
    stdout.print(f"config {config.name}", highlight=False)
    for name, spec in sides_of(config):
        stdout.print(_side_line(name, spec), highlight=False, soft_wrap=True)
    if isinstance(config.baseline, RegistrySide):
        stdout.print(f"baseline: registry entry {config.baseline.registry} ({config.baseline.registry_dir})",
                     highlight=False)
    stdout.print(f"data: {data_source(config)}; concurrency {config.concurrency}; "
                 f"streaming {'on' if config.client.stream else 'off'}")
    stdout.print(plan_table(plans))
    requests = sum(len(p.requests) for p in plans)
    ceiling = sum(len(p.requests) * p.card.sampling.max_tokens for p in plans)
    stdout.print(f"total: {requests:,} requests, at most {ceiling:,} completion tokens per side")
    if config.baseline is not None:
        reference = planning_baseline(config, None, DEFAULT_REGISTRY_DIR)
        stdout.print(detectable_table(config, plans, reference, power=0.8))
        stdout.print(budget_line(budget(config, plans, reference)), highlight=False, soft_wrap=True)
        operating = config_operating_characteristics(config, plans, reference)
        if operating is not None:
            stdout.print(oc_table(operating, "operating characteristics of the gate (simulated; nothing sent)"))
            for line in oc_lines(operating):
                stdout.print(line, highlight=False, soft_wrap=True)
    probe = config.divergence
    if probe is not None:
        source = f"registry entry {probe.from_registry}" if probe.from_registry else "this run's baseline answers"
        stdout.print(f"divergence: up to {probe.limit} generations from {source}, up to {probe.max_tokens} tokens "
                     f"each, scored teacher-forced on both servers with top-{probe.top_logprobs} prompt logprobs",
                     highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------------------
# evalpipe tasks


def tasks(
    name: Annotated[str | None, typer.Argument(help="show this card as hashed (its score-moving fields)")] = None,
) -> None:
    """List the protocol cards with their card_hash (or show one card's hashed fields)."""
    if name:
        card = load_card(name)
        stdout.print(f"# {card.name} card_hash {card.card_hash}", highlight=False)
        stdout.print(yaml.safe_dump(card.hashed_view(), sort_keys=False, allow_unicode=True), highlight=False)
        return
    table = Table(title="protocol cards (tasks/)")
    for column in ("task", "card_hash", "hub dataset @ revision", "local files", "samples", "max_tokens",
                   "temperature", "top_p", "answer", "extraction ladder"):
        table.add_column(column)
    for task_name in available_tasks():
        card = load_card(task_name)
        hub, s = card.dataset.hub, card.sampling
        table.add_row(card.name, card.card_hash, f"{hub.path}@{hub.revision[:12]}", str(len(card.dataset.local.files)),
                      str(s.samples), str(s.max_tokens), f"{s.temperature:g}", f"{s.top_p:g}",
                      card.scoring.answer_type, " > ".join(card.scoring.extract))
    stdout.print(table)


def register(app: typer.Typer) -> None:
    app.command("run")(user_errors(run))
    app.command("tasks")(user_errors(tasks))
