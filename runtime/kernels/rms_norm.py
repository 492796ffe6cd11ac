"""RMSNorm of bf16 rows in one Triton kernel (one program per row), in layers/norm.py's order of operations:
normalise in fp32, round to bf16, then multiply by the bf16 weight (rounded once more).

The torch expression is about eight kernels (cast, square, mean, add, rsqrt, multiply, cast, scale); a decode step
of the R1-width model runs 17 norms, so at batch 1 these launches cost more than the arithmetic. Each row is
reduced by one program whatever the batch, so the result does not depend on the batch size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels.triton_casts import INTERPRETED, to_bf16


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, N, x_stride, eps, BLOCK: tl.constexpr, EXACT_CAST: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + row.to(tl.int64) * x_stride + offs, mask=ok, other=0.0).to(tl.float32)
    normed = to_bf16(x * tl.math.rsqrt(tl.sum(x * x, axis=0) / N + eps), EXACT_CAST)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    tl.store(y_ptr + row.to(tl.int64) * N + offs, to_bf16(w.to(tl.float32) * normed.to(tl.float32), EXACT_CAST), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x.float() * rsqrt(mean(x^2) + eps)).to(bf16) over the last dimension; x and weight bf16."""
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        raise ValueError(f"rms_norm takes bf16 rows and weight, got {x.dtype} and {weight.dtype}")
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, rows have {n} features")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, n, x2.stride(0), float(eps), BLOCK=block, EXACT_CAST=INTERPRETED,
                                          num_warps=min(16, max(1, block // 512)))
    return y.view(x.shape)
