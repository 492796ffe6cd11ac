"""Tensor-parallel steps: rank 0 hands each StepInput to the other ranks, and every rank runs it on its shard.

Rank 0 owns the engine (scheduler, block tables, sampling). Its `TPModelRunner` sends every step over a gloo
"control" group, then runs its own `ModelRunner.execute`; ranks 1..N-1 sit in `serve_steps`, running each step
they receive on their shard and KV cache (same number of blocks everywhere, agreed at start-up) and discarding
the outputs, which the model's vocabulary all-gather already gave rank 0. A `None` step means stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from runtime.engine.model_runner import ModelRunner, StepInput, StepOutput

# How long a failed collective waits for the process monitor to name the rank that died.
_PEER_FAILURE_GRACE_S = 2.0


class RankFailedError(RuntimeError):
    """Another tensor-parallel rank died; the message names it."""


class StepChannel:
    """Rank 0 -> all ranks: one pickled StepInput (or None = stop) per step, over a CPU (gloo) group."""

    def __init__(self, group=None):
        self.group = group

    def send(self, step: StepInput | None) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([step], src=0, group=self.group)

    def receive(self) -> StepInput | None:
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class TPModelRunner:
    """Rank 0's runner: broadcasts the step, then runs its own shard (ModelRunner's interface for the engine).

    peer_failure() returns why a peer rank is gone (None while all live); a collective that fails because a rank
    died is reported as RankFailedError naming it, not as the transport's connection error.
    """

    def __init__(self, local: ModelRunner, channel: StepChannel, peer_failure: Callable[[], str | None]):
        self.local = local
        self.channel = channel
        self.peer_failure = peer_failure

    @property
    def device(self) -> torch.device:
        return self.local.device

    def execute(self, step: StepInput) -> StepOutput:
        try:
            self.channel.send(step)
            return self.local.execute(step)
        except Exception as exc:
            deadline = time.monotonic() + _PEER_FAILURE_GRACE_S
            while (reason := self.peer_failure()) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if reason is not None:
                raise RankFailedError(reason) from exc
            raise

    def stop_peers(self) -> None:
        self.channel.send(None)


def serve_steps(runner: ModelRunner, channel: StepChannel) -> int:
    """A rank other than 0: run every step rank 0 sends until it says stop; returns the number of steps run."""
    steps = 0
    while (step := channel.receive()) is not None:
        runner.execute(step)
        steps += 1
    return steps
