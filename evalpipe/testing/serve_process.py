"""`evalpipe serve` as a user starts it (tests, bench): a subprocess on a free 127.0.0.1 port, stopped with Ctrl-C."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

CLI = [sys.executable, "-c", "from evalpipe.cli import main; main()", "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeProcess:
    port: int
    proc: subprocess.Popen
    output: str = ""  # everything it printed, once stopped

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@contextmanager
def evalpipe_serve(
    *args: str, startup_timeout_s: float = 120.0, sigint_ignored: bool = False
) -> Iterator[ServeProcess]:
    """`evalpipe serve --port P ARGS...`; yields once /health answers, sends SIGINT on exit.

    sigint_ignored: start it with SIGINT ignored, as a shell starts a background job.
    """
    port = free_port()
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    server = ServeProcess(port, subprocess.Popen([*CLI, "--port", str(port), *args], stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True, preexec_fn=ignore_sigint))
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(f"evalpipe serve exited: {server.proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"evalpipe serve did not answer /health within {startup_timeout_s:g} s")
            time.sleep(0.2)
        yield server
    finally:
        server.proc.send_signal(signal.SIGINT)
        server.output = server.proc.communicate(timeout=30)[0]
