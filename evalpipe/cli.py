"""The one command-line entry point: `evalpipe <command>`.

Each command lives in the module that owns its work; this file only wires them together.
"""

from __future__ import annotations

import typer

from runtime.cli import model_app, quantize_command

app = typer.Typer(
    name="evalpipe",
    help="Accuracy gate for quantized MoE models: evaluate, compare against a baseline, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("quantize")(quantize_command)
app.add_typer(model_app, name="model")


def main() -> None:
    app()
