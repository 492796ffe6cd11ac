"""RMSNorm: normalise in fp32, cast back, then scale (the transformers order of operations)."""

from __future__ import annotations

import torch
from torch import nn

from runtime.kernels import triton_available
from runtime.quant.base import new_param


class RMSNorm(nn.Module):
    """bf16 rows on a GPU with Triton go through one fused kernel (runtime/kernels/rms_norm.py), same order of
    operations; anything else through the torch expression below."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        new_param(self, "weight", (size,), dtype, device)
        self.kernel = None
        if dtype == torch.bfloat16 and triton_available(torch.device(device)):
            from runtime.kernels.rms_norm import rms_norm

            self.kernel = rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.dtype == torch.bfloat16 and x.is_cuda:
            return self.kernel(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
