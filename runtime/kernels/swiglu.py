"""SwiGLU of bf16 GEMM outputs in one Triton kernel: bf16(silu(gate.float()) * up.float()), as
quant/base.silu_and_mul computes it in torch (five kernels there: two casts, silu, multiply, cast back).

silu(x) = x / (1 + exp(-x)) in fp32 with an IEEE division and the accurate exp, torch's CUDA formula, so the
result matches the torch path bit for bit except where the two exps differ in the last bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels.triton_casts import INTERPRETED, accurate_exp, to_bf16

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(gate_ptr, up_ptr, y_ptr, N, gate_stride, up_stride, BLOCK: tl.constexpr,
                         INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(gate_ptr + row * gate_stride + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_stride + cols, mask=ok, other=0.0).to(tl.float32)
    e = accurate_exp(-g, INTERPRET)
    tl.store(y_ptr + row * N + cols, to_bf16(tl.math.div_rn(g, 1.0 + e) * u, INTERPRET), mask=ok)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up bf16 [T, N] (rows may be strided views, e.g. the halves of one gate/up GEMM output)."""
    if gate.dtype != torch.bfloat16 or up.dtype != torch.bfloat16:
        raise ValueError(f"silu_and_mul takes bf16 gate and up, got {gate.dtype} and {up.dtype}")
    if gate.shape != up.shape or gate.dim() != 2:
        raise ValueError(f"gate and up must both be [T, N], got {tuple(gate.shape)} and {tuple(up.shape)}")
    gate, up = (t if t.stride(-1) == 1 else t.contiguous() for t in (gate, up))
    t, n = gate.shape
    y = torch.empty(t, n, dtype=torch.bfloat16, device=gate.device)
    if t and n:
        _silu_and_mul_kernel[(t, triton.cdiv(n, BLOCK))](gate, up, y, n, gate.stride(0), up.stride(0), BLOCK=BLOCK,
                                                         INTERPRET=INTERPRETED, num_warps=4)
    return y
