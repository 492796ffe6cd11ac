"""Servers the orchestrator starts itself, for sides that say `launch:` instead of `base_url:`.

Each launched server gets a free loopback port, runs in its own process group with its output streamed to
`<run_dir>/servers/<side>.log`, and must answer `GET /health` and list the side's model on `GET /v1/models`
within `startup_timeout`. `launched_sides` stops every server it started when the block ends, whether normally,
on an error, on Ctrl-C or on SIGTERM (turned into an exception by `terminate_on_sigterm`): SIGTERM to the whole
process group, then SIGKILL after a grace period. Each server also asks the kernel to send it SIGTERM when
evalpipe dies without cleaning up (Linux PR_SET_PDEATHSIG), so even a SIGKILLed run leaves no server behind.

Recipes build the command line per engine (`server_command`): evalpipe's own `evalpipe serve`, SGLang's
`sglang.launch_server` and vLLM's OpenAI server, each told to serve the side's model id.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from evalpipe.config import LaunchSpec, RunConfig, ServedSide
from evalpipe.errors import EndpointError, UserError
from evalpipe.runner import sides_of

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
STOP_GRACE_S = 15.0
_POLL_S = 0.25
_LOG_TAIL_LINES = 15


def server_command(spec: LaunchSpec, served_model: str, port: int | str) -> list[str]:
    """The command line that serves `spec.model` as `served_model` on 127.0.0.1:`port`; `spec.args` last, so
    they can add to or override the recipe's flags."""
    python = spec.python or sys.executable
    if spec.engine == "evalpipe":
        tp = ["--tp", str(spec.tp)] if spec.tp > 1 else []
        head = [python, "-m", "evalpipe", "serve", "--model", spec.model, *tp]
    elif spec.engine == "sglang":
        head = [python, "-m", "sglang.launch_server", "--model-path", spec.model, "--tp-size", str(spec.tp)]
    else:
        head = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", spec.model,
                "--tensor-parallel-size", str(spec.tp)]
    return [*head, "--host", HOST, "--port", str(port), "--served-model-name", served_model, *spec.args]


DEMO_PREFIX = "demo:"


def resolve_model(model: str) -> str:
    """`demo:VARIANT` (bf16, fp8, w4afp8) is the embedded demo model, built on first use and cached
    (runtime.tools.demo_model); anything else is a path (`~` expanded) or, for sglang / vllm, a hub id."""
    if not model.startswith(DEMO_PREFIX):
        return os.path.expanduser(model)
    from runtime.tools.demo_model import VARIANTS, demo_model_path, variant_dir

    variant = model[len(DEMO_PREFIX):]
    if variant not in VARIANTS:
        raise UserError(f"launch.model: {model!r} names no demo variant (choose {', '.join(DEMO_PREFIX + v for v in VARIANTS)})")
    if not (variant_dir(variant) / "config.json").is_file():
        log.info("building the demo model (SmolLM2-135M as an 8-expert MoE, bf16/fp8/w4afp8): once, about a minute")
    return str(demo_model_path(variant))


def engine_label(spec: LaunchSpec) -> str:
    """The leaderboard's engine column for a launched side that does not name one."""
    return f"{spec.engine} tp{spec.tp}"


def free_port() -> int:
    """A port free on the loopback interface right now (the server binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launching process dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Terminated(SystemExit):
    """SIGTERM arrived: raised in the main thread so every `finally` (server shutdown included) runs, then the
    process exits with 143 (128 + SIGTERM) as if killed by the signal."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` instead of killing the process outright."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class LaunchedServer:
    side: str
    served_model: str
    spec: LaunchSpec
    log_path: Path
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def start(self) -> None:
        self.port = free_port()
        command = server_command(self.spec, self.served_model, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"$ {' '.join(command)}\n".encode())
            log_file.flush()
            try:
                self.process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    env={**os.environ, **self.spec.env}, start_new_session=True, preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                raise EndpointError(f"{self.side}.launch: cannot start {command[0]}: {exc.strerror or exc}") from None
        log.info("%s: started %s server (pid %d) on %s; log %s", self.side, self.spec.engine, self.process.pid,
                 self.base_url, self.log_path)

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in lines[-_LOG_TAIL_LINES:] if line.strip())

    def _get(self, path: str) -> tuple[int, bytes]:
        with urllib.request.urlopen(f"http://{HOST}:{self.port}{path}", timeout=5) as response:  # noqa: S310
            return response.status, response.read()

    def ready(self) -> bool:
        """Healthy and listing its model (raises EndpointError if the process has exited)."""
        if self.process is not None and self.process.poll() is not None:
            raise EndpointError(f"{self.side}: the {self.spec.engine} server exited with code "
                                f"{self.process.returncode} while starting; log {self.log_path}: {self.log_tail()}")
        try:
            status, _ = self._get("/health")
            if status != 200:
                return False
            status, body = self._get("/v1/models")
        except (urllib.error.URLError, OSError, TimeoutError):
            return False
        if status != 200:
            return False
        try:
            return any(m.get("id") == self.served_model for m in json.loads(body).get("data", []))
        except (ValueError, AttributeError):
            return False

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after STOP_GRACE_S; returns when the group is gone."""
        if self.process is None:
            return
        group = self.process.pid  # start_new_session: the server leads its own group
        for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
            if not _group_alive(group):
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
            deadline = time.monotonic() + wait_s
            while _group_alive(group) and time.monotonic() < deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=_POLL_S)  # reaps the leader, so the group check sees it gone
        code = self.process.poll()
        log.info("%s: server stopped (exit code %s)", self.side, code)
        self.process = None


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_until_ready(servers: list[LaunchedServer], show: bool) -> None:
    """Poll every server until all are ready; EndpointError when one exits or overstays its startup_timeout."""
    start = time.monotonic()
    pending = list(servers)
    status = _status_line(show)
    with status as spinner:
        while pending:
            for server in list(pending):
                if server.ready():
                    log.info("%s: server ready after %.0f s", server.side, time.monotonic() - start)
                    pending.remove(server)
                elif time.monotonic() - start > server.spec.startup_timeout:
                    raise EndpointError(
                        f"{server.side}.launch: the server was not ready within startup_timeout "
                        f"{server.spec.startup_timeout:g} s; log {server.log_path}: {server.log_tail()}")
            if pending and spinner is not None:
                spinner.update(f"starting {', '.join(s.side for s in pending)} server(s): "
                               f"{time.monotonic() - start:.0f} s")
            if pending:
                time.sleep(_POLL_S)


def _status_line(show: bool):
    if not show:
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status("starting servers")


def launch_sides(config: RunConfig) -> list[tuple[str, ServedSide]]:
    """The (side name, spec) pairs of the config whose servers evalpipe starts."""
    return [(name, spec) for name, spec in sides_of(config) if spec.launch is not None]


@contextlib.contextmanager
def launched_sides(config: RunConfig, log_dir: Path, show_progress: bool = False) -> Iterator[RunConfig]:
    """Start the config's `launch:` servers together, wait until all are ready, and yield the config with their
    base_url filled in (and an engine label where none was given). Every started server is stopped on exit."""
    servers = [LaunchedServer(name, spec.model, spec.launch.model_copy(update={"model": resolve_model(spec.launch.model)}),
                              log_dir / f"{name}.log")
               for name, spec in launch_sides(config)]
    try:
        for server in servers:
            server.start()
        wait_until_ready(servers, show_progress)
        updates = {}
        for server, (name, spec) in zip(servers, launch_sides(config), strict=True):
            updates[name] = spec.model_copy(update={"base_url": [server.base_url],
                                                    "engine": spec.engine or engine_label(spec.launch)})
        yield config.model_copy(update=updates)
    finally:
        # A second SIGTERM must not cut the shutdown short; it is delivered (and raises) once all are stopped.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            for server in servers:
                server.stop()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
