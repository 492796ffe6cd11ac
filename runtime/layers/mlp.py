"""Dense SwiGLU MLP (DeepSeek's first layers and shared experts, Qwen3's dense layers), tensor-parallel."""

from __future__ import annotations

import torch
from torch import nn

from runtime.kernels import triton_available
from runtime.layers.linear import Linear, join_output_features
from runtime.parallel import ParallelContext
from runtime.quant.base import QuantConfig, silu_and_mul


class GatedMLP(nn.Module):
    """On a GPU with Triton (bf16): gate and up joined into one GEMM after loading (`gate_proj` then computes
    both; up_proj is dropped), and the SwiGLU in one kernel (runtime/kernels/swiglu.py). Elsewhere two GEMMs
    and the torch SwiGLU."""

    def __init__(
        self, hidden: int, intermediate: int, *, quant: QuantConfig, prefix: str, parallel: ParallelContext,
        dtype: torch.dtype, device: torch.device, reduce_output: bool = True,
    ):
        super().__init__()
        common = dict(quant=quant, parallel=parallel, dtype=dtype, device=device)
        self.gate_proj = Linear(hidden, intermediate, prefix=f"{prefix}.gate_proj", mode="column", **common)
        self.up_proj = Linear(hidden, intermediate, prefix=f"{prefix}.up_proj", mode="column", **common)
        self.down_proj = Linear(intermediate, hidden, prefix=f"{prefix}.down_proj", mode="row", reduce_output=reduce_output, **common)
        self.swiglu_kernel = None
        if dtype == torch.bfloat16 and triton_available(torch.device(device)):
            from runtime.kernels.swiglu import silu_and_mul as fused

            self.swiglu_kernel = fused
        self.gate_up_joined = False

    def after_loading(self) -> None:
        if self.swiglu_kernel is not None and join_output_features(self.gate_proj, self.up_proj):
            del self.up_proj
            self.gate_up_joined = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_joined:
            gate, up = self.gate_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.swiglu_kernel is not None and gate.is_cuda and gate.dtype == torch.bfloat16:
            return self.down_proj(self.swiglu_kernel(gate, up))
        return self.down_proj(silu_and_mul(gate, up))
