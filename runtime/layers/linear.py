"""Linear layers whose weights come from the quantization scheme, sharded for tensor parallelism."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from runtime.errors import CheckpointError
from runtime.loader import CheckpointTensor, copy_into
from runtime.parallel import ParallelContext
from runtime.quant.base import QuantConfig, new_param

Mode = Literal["replicated", "column", "row"]


class Linear(nn.Module):
    """y = x W^T (+ b).

    mode "column": output features split into `shards` (index, count) parts, default one per rank (GQA key/value
    heads use fewer parts when ranks outnumber heads); "row": input features split over the ranks and the
    partial outputs all-reduced, unless reduce_output=False (the caller sums several partials first);
    "replicated": every rank holds the whole weight.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        quant: QuantConfig,
        prefix: str,
        parallel: ParallelContext,
        mode: Mode,
        dtype: torch.dtype,
        device: torch.device,
        bias: bool = False,
        shards: tuple[int, int] | None = None,
        reduce_output: bool = True,
    ):
        super().__init__()
        self.mode = mode
        self.parallel = parallel
        self.reduce_output = reduce_output
        if mode == "replicated":
            self.shards = (0, 1)
        else:
            self.shards = shards or (parallel.rank, parallel.world_size)
        count = self.shards[1]
        split = output_size if mode == "column" else input_size
        if mode != "replicated" and split % count:
            raise CheckpointError(f"{prefix}: {split} features cannot be split into {count} tensor-parallel shards")
        in_local = input_size // count if mode == "row" else input_size
        out_local = output_size // count if mode == "column" else output_size
        self.quant_method = quant.linear_method(prefix)
        self.quant_method.create_weights(self, in_local, out_local, dtype, device)
        self.bias = new_param(self, "bias", (out_local,), dtype, device, output_dim=0) if bias else None

    def weight_loader(self, param: nn.Parameter, src: CheckpointTensor) -> None:
        dim = {"column": param.output_dim, "row": param.input_dim}.get(self.mode)
        index, count = self.shards
        multiple = param.shard_multiple.get(dim, 1) if dim is not None else 1
        copy_into(param, param.data, src.read_shard(dim, index, count, multiple), src.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "row":
            return self.quant_method.apply(self, x, self.bias)
        y = self.quant_method.apply(self, x)
        if self.reduce_output:
            y = self.parallel.all_reduce(y)
        if self.bias is not None and (self.reduce_output or self.parallel.rank == 0):
            y = y + self.bias
        return y
