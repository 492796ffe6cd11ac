"""The one command-line entry point: `evalpipe <command>`.

Each command lives in the module that owns its work; this file only wires them together.
"""

from __future__ import annotations

import typer

from evalpipe import calibrate_cli, compare_cli, orchestrator_cli
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

orchestrator_cli.register(app)
compare_cli.register(app)
calibrate_cli.register(compare_cli.baseline_app)
interop_cli.register(app)
runtime_cli.register(app)
serve_cli.register(app)


def main() -> None:
    app()
