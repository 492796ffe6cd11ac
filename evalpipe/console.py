"""What every command shares: logging set-up, the stdout console, and one-line user errors.

User mistakes (UserError) are printed on one line on stderr and exit with their code (2 input, 3 endpoint);
stdout carries only the intended output.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from evalpipe.errors import UserError

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
