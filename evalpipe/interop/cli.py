"""`evalpipe crosscheck` and `evalpipe import evalscope|lm-eval`: the interop commands.

As for `evalpipe run`, a user mistake prints one line and exits 2 (a missing harness environment included, with
what to install); a harness that fails while grading exits 4. stdout ends with the path of what was written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from evalpipe.console import setup_logging, stdout, user_errors
from evalpipe.interop.crosscheck import AGREEMENT_COLUMNS, agreement_rows, crosscheck_run
from evalpipe.interop.harnesses import HARNESS_NAMES
from evalpipe.interop.importers import READERS, write_imported_run
from evalpipe.render.run_report import results_table
from evalpipe.run_files import CROSSCHECK


def crosscheck(
    run_dir: Annotated[Path, typer.Argument(help="run directory of `evalpipe run` (or of `evalpipe import`)")],
    grader: Annotated[str, typer.Option("--grader", help=f"whose extraction and grader: {' | '.join(HARNESS_NAMES)}")],
    side: Annotated[str, typer.Option(help="which side's journal to re-grade")] = "candidate",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Re-grade every answered sample of a run with another harness's own extraction and grader (no new
    generations); write crosscheck.json and a report.md section; print agreement per task."""
    setup_logging(verbose)
    if grader not in HARNESS_NAMES:
        raise typer.BadParameter(f"'{grader}' is not one of {', '.join(HARNESS_NAMES)}", param_hint="--grader")
    if not run_dir.is_dir():
        raise typer.BadParameter(f"no such run directory: {run_dir}", param_hint="RUN_DIR")
    entry = crosscheck_run(run_dir, grader, side)
    table = Table(title=f"cross-check of {side} with {grader} {entry['harness_version']}")
    for column in AGREEMENT_COLUMNS:
        table.add_column(column, justify="left" if column in ("task", "their task", "where they part") else "right")
    for row in agreement_rows(entry):
        table.add_row(*row)
    stdout.print(table)
    stdout.print(str(run_dir / CROSSCHECK), highlight=False, soft_wrap=True)


import_app = typer.Typer(help="Turn another harness's per-sample outputs into an evalpipe run directory (its "
                                "protocol under its own card hash), for the leaderboard, compare and gate.",
                         no_args_is_help=True)

SourceDir = Annotated[Path, typer.Argument(help="the harness's output directory")]
OutputDir = Annotated[Path, typer.Option("--output-dir", help="run dir = <output-dir>/<name>/<run_id>/")]
Label = Annotated[str | None, typer.Option("--label", help="label on the leaderboard (default: '<model> (<harness>)')")]


def _import(harness: str, source: Path, output_dir: Path, name: str | None, label: str | None) -> None:
    setup_logging(False)
    if not source.exists():
        raise typer.BadParameter(f"no such directory: {source}", param_hint="DIR")
    run = READERS[harness](source)
    run_dir, summary = write_imported_run(run, output_dir, name or f"imported-{harness}", label)
    stdout.print(results_table(summary, f"imported from {harness} {run.version}"))
    stdout.print(str(run_dir), highlight=False, soft_wrap=True)


@import_app.command("evalscope")
@user_errors
def import_evalscope(
    source: SourceDir, output_dir: OutputDir = Path("results/runs"),
    name: Annotated[str | None, typer.Option("--name", help="default: imported-evalscope")] = None, label: Label = None,
) -> None:
    """Import an `evalscope eval` output directory (its reviews, predictions and task config)."""
    _import("evalscope", source, output_dir, name, label)


@import_app.command("lm-eval")
@user_errors
def import_lmeval(
    source: SourceDir, output_dir: OutputDir = Path("results/runs"),
    name: Annotated[str | None, typer.Option("--name", help="default: imported-lm-eval")] = None, label: Label = None,
) -> None:
    """Import an lm-eval run written with --log_samples (its results_*.json and samples_*.jsonl)."""
    _import("lm-eval", source, output_dir, name, label)


def register(app: typer.Typer) -> None:
    app.command("crosscheck")(user_errors(crosscheck))
    app.add_typer(import_app, name="import")
