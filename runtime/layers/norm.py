"""RMSNorm: normalise in fp32, cast back, then scale (the transformers order of operations)."""

from __future__ import annotations

import torch
from torch import nn

from runtime.quant.base import new_param


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        new_param(self, "weight", (size,), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
