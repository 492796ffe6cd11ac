"""What every command shares: logging set-up, the stdout console, and one-line user errors.

User mistakes (UserError) are printed on one line on stderr and exit with their code (2 input, 3 endpoint);
stdout carries only the intended output. The handler is the runtime's (runtime.console): one UserError base
serves both packages' commands.
"""

from __future__ import annotations

import sys

from rich.console import Console

from runtime import console as runtime_console
from runtime.console import user_errors

__all__ = ["setup_logging", "stdout", "user_errors"]

# Wide tables when piped to a file or another program; the terminal width otherwise.
stdout = Console(width=None if sys.stdout.isatty() else 180)

# Clients the orchestrator uses that log every request at INFO.
QUIET_LOGGERS = ("openai", "datasets")


def setup_logging(verbose: bool) -> None:
    runtime_console.setup_logging(verbose, quiet=QUIET_LOGGERS)
