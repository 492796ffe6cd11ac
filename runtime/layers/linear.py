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


def join_output_features(first: Linear, second: Linear) -> bool:
    """After loading, before the quant methods lay the weights out: append `second`'s output features to
    `first`'s, so that one GEMM reads the shared input once (decode on a GPU: one launch, and small GEMVs run
    far under the bandwidth limit). Output column j of the joined layer is computed as before, only the
    kernel's work split may change (fp32 summation order). Returns False, changing nothing, when the two
    cannot be joined: different quant methods or parameters, a row-parallel layer, or a blocked scale (FP8
    block) that `first`'s size would split."""
    if type(first.quant_method) is not type(second.quant_method) or "row" in (first.mode, second.mode):
        return False
    mine, theirs = dict(first.named_parameters(recurse=False)), dict(second.named_parameters(recurse=False))
    if mine.keys() != theirs.keys() or "weight" not in mine:
        return False
    n1, n2 = (layer.weight.shape[layer.weight.output_dim] for layer in (first, second))
    for name, a in mine.items():
        b, dim = theirs[name], getattr(a, "output_dim", None)
        if dim is None or a.dtype != b.dtype or a.dim() != b.dim():
            return False
        if any(sa != sb for i, (sa, sb) in enumerate(zip(a.shape, b.shape)) if i != dim):
            return False
        if (a.shape[dim], b.shape[dim]) == (n1, n2):
            continue  # one entry per output feature (weight, bias)
        block = getattr(first.quant_method, "block", (0,))[0]  # per-block entries (FP8 block scales)
        if not block or n1 % block or (a.shape[dim], b.shape[dim]) != (n1 // block, -(-n2 // block)):
            return False
    for name, a in mine.items():
        joined = nn.Parameter(torch.cat((a.data, theirs[name].data), dim=a.output_dim), requires_grad=False)
        for tag in ("output_dim", "input_dim"):
            setattr(joined, tag, getattr(a, tag, None))
        delattr(first, name)
        first.register_parameter(name, joined)
    return True
