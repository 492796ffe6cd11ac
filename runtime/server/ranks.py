"""Tensor-parallel serving processes. The `evalpipe serve` process is rank 0 (engine and HTTP); it starts ranks
1..N-1 as child processes (`python -m runtime.server.rank_worker`), one per GPU or a share of the CPU cores.

Start-up: rank 0 opens a TCPStore on 127.0.0.1 and starts the others; every rank loads only its own shard; a rank
that fails while loading makes rank 0 exit with that rank's error. Once all ranks have loaded, they form the
process group (NCCL on GPUs with a gloo group for the step broadcast, gloo on CPUs) and agree on the KV cache size
(the minimum over ranks).

Serving: rank 0 broadcasts every step (runtime.engine.tp_runner). A monitor thread watches the other processes: if
one exits, the engine is declared dead at once (health 503, requests 503, streams end with an error), even while
rank 0 is blocked in a collective with the dead rank.

Shutdown: rank 0 sends the stop step and waits for the others, terminating any that linger. The others ignore
Ctrl-C (a terminal sends it to every process of the group; rank 0 coordinates) and exit by themselves when rank 0
disappears (their parent changes, or their connections to it break), so no process outlives the server.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch

from runtime.engine.model_runner import ModelRunner
from runtime.engine.tp_runner import RankFailedError, StepChannel, TPModelRunner
from runtime.errors import UserError
from runtime.parallel import ParallelContext, TorchDistributedComm
from runtime.server.options import ServeOptions

log = logging.getLogger(__name__)

STORE_HOST = "127.0.0.1"
# Start-up: how long ranks wait for each other at the rendezvous (loading a large checkpoint takes minutes).
STORE_TIMEOUT = timedelta(minutes=30)
# Collectives: the other ranks wait for rank 0's next step however long the server stays idle.
IDLE_TIMEOUT = timedelta(days=365)
_POLL_S = 0.1
_STOP_GRACE_S = 10.0


def rank_device(rank: int, world_size: int) -> torch.device:
    """cuda:rank when there are GPUs (one per rank), else the CPU with an equal share of its cores."""
    if torch.cuda.is_available():
        if torch.cuda.device_count() < world_size:
            raise UserError(f"--tp {world_size} needs {world_size} GPUs; {torch.cuda.device_count()} visible")
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    return torch.device("cpu")


def parallel_context(options: ServeOptions, rank: int) -> ParallelContext:
    return ParallelContext(rank, options.tp, options.moe_parallel, TorchDistributedComm(ordered=options.deterministic))


def join_collectives(store, rank: int, world_size: int, device: torch.device, local_kv_blocks: int
                     ) -> tuple[StepChannel, int]:
    """Form the process group; returns the step channel and the KV cache blocks every rank allocates."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=IDLE_TIMEOUT)
    control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    blocks = torch.tensor([local_kv_blocks], dtype=torch.long)
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=control)
    return StepChannel(control), int(blocks.item())


class RankGroup:
    """Ranks 1..N-1 as seen from rank 0: their processes, the step channel and how they failed, if they did."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.world_size = options.tp
        self.device = rank_device(0, options.tp)
        self.parallel = parallel_context(options, 0)
        # Set by the server when its engine loop has stopped between steps: the peers can be told to stop.
        self.peers_idle = False
        self._store = None
        self._channel: StepChannel | None = None
        self._procs: dict[int, subprocess.Popen] = {}
        self._relays: list[threading.Thread] = []
        self._error_lines: dict[int, str] = {}
        self._failure: str | None = None
        self._callbacks: list[Callable[[BaseException], None]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @classmethod
    @contextmanager
    def launch(cls, options: ServeOptions) -> Iterator["RankGroup"]:
        group = cls(options)
        try:
            group._spawn()
            yield group
        finally:
            group._stop()

    # ------------------------------------------------------------------------------------------ start-up

    def _spawn(self) -> None:
        import torch.distributed as dist

        self._store = dist.TCPStore(STORE_HOST, 0, self.world_size, is_master=True, wait_for_workers=False,
                                    timeout=STORE_TIMEOUT)
        for rank in range(1, self.world_size):
            cmd = [sys.executable, "-m", "runtime.server.rank_worker", self.options.to_json(), str(rank),
                   str(self._store.port)]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            self._procs[rank] = proc
            relay = threading.Thread(target=self._relay, args=(rank, proc), name=f"rank-{rank}-log", daemon=True)
            relay.start()
            self._relays.append(relay)
        threading.Thread(target=self._monitor, name="rank-monitor", daemon=True).start()
        log.info("started tensor-parallel ranks 1..%d (pids %s)", self.world_size - 1,
                 ", ".join(str(p.pid) for p in self._procs.values()))

    def start_collectives(self, local_kv_blocks: int) -> int:
        """Wait until every rank has loaded its shard, form the process group; returns the agreed KV blocks."""
        loaded = [f"loaded/{rank}" for rank in self._procs]
        while not self._store.check(loaded):
            if (reason := self.failure()) is not None:
                raise UserError(reason)
            time.sleep(_POLL_S)
        self._channel, blocks = join_collectives(self._store, 0, self.world_size, self.device, local_kv_blocks)
        return blocks

    def runner(self, local: ModelRunner) -> TPModelRunner:
        return TPModelRunner(local, self._channel, self.failure)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values()]

    # ------------------------------------------------------------------------------------------ failures

    def failure(self) -> str | None:
        """Why a rank is gone (None while all live)."""
        return self._failure

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(RankFailedError)` once a rank dies (at once if one already has)."""
        with self._lock:
            self._callbacks.append(callback)
            failure = self._failure
        if failure is not None:
            callback(RankFailedError(failure))

    def _relay(self, rank: int, proc: subprocess.Popen) -> None:
        """Copy a rank's output to our stderr, prefixed; its one-line error (if any) is kept for our report."""
        for line in proc.stdout:
            if line.startswith("error: "):
                self._error_lines[rank] = line[len("error: "):].strip()
            else:
                sys.stderr.write(f"[rank {rank}] {line}")

    def _monitor(self) -> None:
        while not self._stopping.is_set():
            for rank, proc in self._procs.items():
                code = proc.poll()
                if code is not None and not self._stopping.is_set():
                    self._declare_failed(rank, proc, code)
                    return
            time.sleep(_POLL_S)

    def _declare_failed(self, rank: int, proc: subprocess.Popen, code: int) -> None:
        for relay in self._relays:
            relay.join(timeout=1.0)  # its last lines (the error) are in
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        detail = self._error_lines.get(rank)
        reason = f"tensor-parallel rank {rank} (pid {proc.pid}) {how}" + (f": {detail}" if detail else "")
        log.error("%s; the server cannot serve any more", reason)
        with self._lock:
            self._failure = reason
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(RankFailedError(reason))

    # ------------------------------------------------------------------------------------------ shutdown

    def _stop(self) -> None:
        import torch.distributed as dist

        self._stopping.set()
        told = False
        if self._channel is not None and self.peers_idle and self._failure is None:
            try:
                self._channel.send(None)
                told = True
            except Exception as exc:  # noqa: BLE001 - a broken channel: fall through to terminating them
                log.warning("could not tell the other ranks to stop (%s); terminating them", exc)
        deadline = time.monotonic() + (_STOP_GRACE_S if told else 0.0)
        for proc in self._procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for relay in self._relays:
            relay.join(timeout=1.0)
        if told and dist.is_initialized():
            dist.destroy_process_group()
        log.info("tensor-parallel ranks stopped")
