"""Tensor / expert parallel context: which shard of every weight this process holds and how ranks combine.

world_size == 1 is the degenerate case of the same code: every shard is the whole tensor and the collectives are
identities. Multi-process launching lives with the engine; it passes a `TorchDistributedComm` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from runtime.errors import CheckpointError

MoeParallel = Literal["tp", "ep"]


class Communicator(Protocol):
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over ranks (returns a tensor; the input may be reused)."""
        ...

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenation of every rank's `t` along `dim`, in rank order."""
        ...


class SingleProcessComm:
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t


class TorchDistributedComm:
    """Collectives over a torch.distributed process group (gloo on CPU, NCCL on GPU; None = the default group,
    looked up at call time, so a model can be built before the group exists).

    ordered: sum in rank order (all-gather, then add rank 0's part, rank 1's, ...), so that an element's result
    does not depend on where it sits in the buffer. A ring all-reduce over more than two ranks starts each chunk
    at a different rank, and the chunks follow the batch size; deterministic serving needs the fixed order.
    """

    def __init__(self, group=None, ordered: bool = False):
        self.group = group
        self.ordered = ordered

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.ordered and dist.get_world_size(self.group) > 2:
            parts = self._gather(t)
            total = parts[0].clone()
            for part in parts[1:]:
                total += part
            return total
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat(self._gather(t), dim=dim)

    def _gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return parts


@dataclass(frozen=True)
class ParallelContext:
    """This process's place among `world_size` ranks.

    Attention heads, dense MLPs, shared experts, the embedding and the LM head are always tensor-parallel.
    Routed experts follow `moe_parallel`: "tp" = every rank holds all experts with the intermediate dimension
    sharded (SGLang's TP mode); "ep" = experts are partitioned in contiguous ranges, each whole.
    """

    rank: int = 0
    world_size: int = 1
    moe_parallel: MoeParallel = "tp"
    comm: Communicator = field(default_factory=SingleProcessComm, compare=False)

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"invalid parallel context: rank {self.rank} of world size {self.world_size}")
        if self.moe_parallel not in ("tp", "ep"):
            raise ValueError(f"moe_parallel must be 'tp' or 'ep', got {self.moe_parallel!r}")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.world_size == 1 else self.comm.all_reduce(t)

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return t if self.world_size == 1 else self.comm.all_gather(t, dim)

    def split(self, size: int, what: str) -> int:
        """Per-rank share of `size` that must divide evenly (e.g. heads, intermediate size)."""
        if size % self.world_size:
            raise CheckpointError(f"{what}={size} is not divisible by the tensor-parallel size {self.world_size}")
        return size // self.world_size

    def moe_layout(self, num_experts: int, intermediate: int) -> tuple[int, int, int, int]:
        """(first local expert id, local experts, intermediate size per rank, intermediate shard index) for routed experts."""
        if self.moe_parallel == "ep":
            local = self.split(num_experts, "n_routed_experts (expert parallel)")
            return self.rank * local, local, intermediate, 0
        return 0, num_experts, self.split(intermediate, "moe_intermediate_size (tensor parallel)"), self.rank


SINGLE = ParallelContext()
