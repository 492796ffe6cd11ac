"""How the runtime's commands (`evalpipe serve`, `quantize`, `model ...`) talk to the terminal: log records on
stderr, and a user's mistake as one `error: ...` line with the error's exit code instead of a traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from runtime.errors import UserError

# Libraries that log every HTTP request or file lock at INFO (huggingface_hub's clients among them).
QUIET_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "filelock", "fsspec")


def setup_logging(verbose: bool, quiet: Iterable[str] = ()) -> None:
    """Log records at INFO (DEBUG if verbose) on stderr; QUIET_LOGGERS and `quiet` only from WARNING up."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", force=True,
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)],
    )
    for noisy in (*QUIET_LOGGERS, *quiet):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a typer command: a UserError prints `error: <message>` on stderr and exits with its exit_code."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper
