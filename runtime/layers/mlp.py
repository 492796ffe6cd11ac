"""Dense SwiGLU MLP (DeepSeek's first layers and shared experts, Qwen3's dense layers), tensor-parallel."""

from __future__ import annotations

import torch
from torch import nn

from runtime.layers.linear import Linear
from runtime.parallel import ParallelContext
from runtime.quant.base import QuantConfig, silu_and_mul


class GatedMLP(nn.Module):
    def __init__(
        self, hidden: int, intermediate: int, *, quant: QuantConfig, prefix: str, parallel: ParallelContext,
        dtype: torch.dtype, device: torch.device, reduce_output: bool = True,
    ):
        super().__init__()
        common = dict(quant=quant, parallel=parallel, dtype=dtype, device=device)
        self.gate_proj = Linear(hidden, intermediate, prefix=f"{prefix}.gate_proj", mode="column", **common)
        self.up_proj = Linear(hidden, intermediate, prefix=f"{prefix}.up_proj", mode="column", **common)
        self.down_proj = Linear(intermediate, hidden, prefix=f"{prefix}.down_proj", mode="row", reduce_output=reduce_output, **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x)))
