"""Rotary embedding of bf16 query/key heads in one Triton kernel (one program per token), in layers/rotary.py's
order of operations: rotate in fp32 with the given cos/sin, round to bf16 once.

The torch expression is about ten kernels per call (cast, two slices, four products, two sums, concatenation or
stack, cast); the R1-width model rotates queries and keys in each of its layers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels.triton_casts import INTERPRETED, to_bf16

# Heads per program: at decode sizes one program per token would leave the GPU nearly idle (128 query heads).
HEADS_PER_PROGRAM = 16


@triton.jit
def _rotate_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, HALF, x_stride_t, x_stride_h, cs_stride,
                   INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, EXACT_CAST: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    mask = (h < H)[:, None] & i_ok[None, :]
    if INTERLEAVED:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + HALF
    src = x_ptr + t * x_stride_t + h[:, None] * x_stride_h
    x1 = tl.load(src + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + second[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t * cs_stride + i, mask=i_ok, other=0.0)[None, :]
    s = tl.load(sin_ptr + t * cs_stride + i, mask=i_ok, other=0.0)[None, :]
    dst = y_ptr + (t * H + h[:, None]) * (2 * HALF)
    tl.store(dst + first[None, :], to_bf16(x1 * c - x2 * s, EXACT_CAST), mask=mask)
    tl.store(dst + second[None, :], to_bf16(x2 * c + x1 * s, EXACT_CAST), mask=mask)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x bf16 [T, heads, dim] or [T, dim] (last dimension contiguous) rotated by cos/sin fp32 [T, dim/2]."""
    if x.dtype != torch.bfloat16 or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"rotate takes bf16 x and fp32 cos/sin, got {x.dtype}, {cos.dtype}, {sin.dtype}")
    x3 = x.unsqueeze(1) if x.dim() == 2 else x
    t, heads, dim = x3.shape
    if dim % 2 or cos.shape != (t, dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"rotate: cos/sin must be [{t}, {dim // 2}] for x {tuple(x.shape)}, got {tuple(cos.shape)}")
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    if t:
        block_h = min(HEADS_PER_PROGRAM, triton.next_power_of_2(heads))
        _rotate_kernel[(t, triton.cdiv(heads, block_h))](x3, cos, sin, y, heads, dim // 2, x3.stride(0), x3.stride(1),
                             cos.stride(0), INTERLEAVED=interleaved, BLOCK_H=block_h,
                             BLOCK_HALF=triton.next_power_of_2(dim // 2), EXACT_CAST=INTERPRETED)
    return y.view(x.shape)
