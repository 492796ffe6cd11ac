"""fp32 -> bf16 / e4m3 casts and the exponential for the Triton kernels, exact (or accurate) under the CPU interpreter
too."""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Pass as the kernels' EXACT_CAST argument.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# EXACT_CAST (set under TRITON_INTERPRET=1 only) rounds in fp32 first, by integer round-to-nearest-even on the
# mantissa bits, so the cast itself is exact: Triton 3.6's interpreter truncates fp32 -> bf16 and rounds
# fp32 -> e4m3 across a binade wrongly (7.96 -> 4.0). GPU builds use the hardware conversions.


@triton.jit
def to_bf16(v, EXACT_CAST: tl.constexpr):
    if EXACT_CAST:
        bits = v.to(tl.int32, bitcast=True)
        v = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
    return v.to(tl.bfloat16)


@triton.jit
def to_e4m3(v, EXACT_CAST: tl.constexpr):
    """Saturating round-to-nearest-even cast of fp32 to e4m3 (e4m3 subnormals below 2^-6 round in fixed point)."""
    v = tl.clamp(v, -448.0, 448.0)
    if EXACT_CAST:
        bits = v.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
        subnormal = ((v * 512.0 + 12582912.0) - 12582912.0) / 512.0
        v = tl.where(tl.abs(v) < 0.015625, subnormal, normal)
    return v.to(tl.float8e4nv)


@triton.jit
def accurate_exp(v, INTERPRET: tl.constexpr):
    """exp(v) in fp32 as torch's CUDA kernels compute it (libdevice's accurate expf, not the fast ex2 path of
    tl.exp); under the interpreter, which has no libdevice, numpy's exp."""
    if INTERPRET:
        e = tl.exp(v)
    else:
        e = libdevice.exp(v)
    return e
