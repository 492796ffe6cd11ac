"""The one command-line entry point: `evalpipe <command>`.

Each command lives in a module of this package named for its work (run, results, calibrate); this file only
wires them together.
"""

from __future__ import annotations

import typer

from evalpipe.cli import calibrate, results, run
from evalpipe.interop import cli as interop_cli
from runtime.server import cli as serve_cli
from runtime.tools import cli as runtime_cli

app = typer.Typer(
    name="evalpipe",
    help="Accuracy gate for quantized MoE models: evaluate, compare against a baseline, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

run.register(app)
results.register(app)
calibrate.register(results.baseline_app)
interop_cli.register(app)
runtime_cli.register(app)
serve_cli.register(app)


def main() -> None:
    app()
