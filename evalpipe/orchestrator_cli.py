"""`evalpipe run` and `evalpipe tasks`: the orchestrator's commands.

User mistakes (UserError) are printed on one line on stderr and exit with their code (2 input, 3 endpoint);
stdout carries only the intended output, and `run` ends it with the run directory's path.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from evalpipe.cards import available_tasks, load_card
from evalpipe.client import EndpointPool
from evalpipe.config import RunConfig
from evalpipe.errors import EndpointError, UserError
from evalpipe.journal import read_journal
from evalpipe.paired_run import run_with_baseline
from evalpipe.plan import TaskPlan
from evalpipe.progress import RunProgress
from evalpipe.report import (
    plan_table,
    report_markdown,
    results_table,
    summarize_side,
    truncation_warnings,
    write_json,
)
from evalpipe.runner import (
    CANDIDATE,
    RESOLVED_CONFIG,
    answered_keys,
    check_endpoint,
    create_run_dir,
    data_source,
    evaluate_side,
    load_resumable,
    plan_from_config,
    preflight_side,
)

log = logging.getLogger("evalpipe")
# Wide tables when piped to a file or another program; the terminal width otherwise.
stdout = Console(width=None if sys.stdout.isatty() else 180)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", force=True,
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)],
    )
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "datasets", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


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
    run_config, plans = plan_from_config(config)
    if dry_run:
        print_plan(run_config, plans)
        return
    if resume is not None and not resume.is_dir():
        raise UserError(f"--resume: no such run directory: {resume}")
    try:
        evaluate = run_with_baseline if run_config.baseline is not None else run_candidate
        run_dir, exit_code = asyncio.run(
            evaluate(run_config, plans, str(config), resume, progress and sys.stderr.isatty())
        )
    except KeyboardInterrupt:
        typer.echo("interrupted; every finished sample is in the journal. Resume with --resume RUN_DIR", err=True)
        raise typer.Exit(130) from None
    stdout.print(str(run_dir), highlight=False, soft_wrap=True)
    if exit_code:
        raise typer.Exit(exit_code)


def print_plan(config: RunConfig, plans: list[TaskPlan]) -> None:
    spec = config.candidate
    stdout.print(f"config {config.name}: candidate '{spec.label}' model {spec.model} at {', '.join(spec.base_url)}")
    stdout.print(f"data: {data_source(config)}; concurrency {config.concurrency}; "
                 f"streaming {'on' if config.client.stream else 'off'}")
    stdout.print(plan_table(plans))
    requests = sum(len(p.requests) for p in plans)
    budget = sum(len(p.requests) * p.card.sampling.max_tokens for p in plans)
    stdout.print(f"total: {requests:,} requests, at most {budget:,} completion tokens per side")


async def run_candidate(
    config: RunConfig, plans: list[TaskPlan], config_path: str, resume: Path | None, show_progress: bool
) -> tuple[Path, int]:
    spec = config.candidate
    pool = EndpointPool(spec.base_url, spec.api_key, config.client)
    try:
        previous = load_resumable(resume, config, plans, CANDIDATE) if resume else []
        done = answered_keys(previous)
        if resume:
            await check_endpoint(pool, CANDIDATE, spec, plans)
            pilot = []
        else:
            pilot = await preflight_side(pool, CANDIDATE, spec, plans, config, done)
        run_dir = resume or create_run_dir(config, plans)
        log.info("run dir: %s (%d samples already answered)", run_dir, len(done))
        journal_path = run_dir / CANDIDATE / "journal.jsonl"
        with RunProgress(plans, CANDIDATE, enabled=show_progress) as bar:
            for plan in plans:
                bar.already_done(plan.name, sum(r.key in done for r in plan.requests))
            await evaluate_side(pool, spec, plans, config, journal_path, done, pilot, bar.advance)
        replicas = {r.url: r.sent for r in pool.replicas}
    finally:
        await pool.aclose()
    return run_dir, write_results(config, plans, config_path, run_dir, journal_path, replicas)


def write_results(
    config: RunConfig, plans: list[TaskPlan], config_path: str, run_dir: Path, journal_path: Path,
    replicas: dict[str, int],
) -> int:
    saved = yaml.safe_load((run_dir / RESOLVED_CONFIG).read_text(encoding="utf-8"))
    run_id = saved["resolved"]["run_id"]
    spec = config.candidate
    records = read_journal(journal_path)
    endpoint = {"model": spec.model, "endpoint": ", ".join(spec.base_url), "concurrency": config.concurrency,
                "requests sent per replica (this invocation)": replicas}
    summary, details = summarize_side(records, plans, run_id=run_id, config_name=config.name, label=spec.label,
                                      extra_details={"endpoint": endpoint})
    write_json(journal_path.parent / "summary.json", summary)
    write_json(journal_path.parent / "details.json", details)
    warnings = truncation_warnings(summary, plans)
    (run_dir / "report.md").write_text(
        report_markdown(config_name=config.name, run_dir=run_dir, sides={CANDIDATE: (summary, details)},
                        endpoint=endpoint, warnings=warnings, config_path=config_path),
        encoding="utf-8",
    )
    stdout.print(results_table(summary, CANDIDATE))
    for warning in warnings:
        log.warning(warning)
    latest = {r.key: r for r in records}
    if latest and all(r.outcome == "error" for r in latest.values()):
        log.error("every request failed; see error fields in %s", journal_path)
        return EndpointError.exit_code
    return 0


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
