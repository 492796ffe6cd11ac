"""FP8 block linear on GPU (Triton): y = x W^T for DeepSeek FP8 128x128 block weights with dynamic 1x128
activation quantization fused into the GEMM (numerics.fp8_block_linear_ref semantics).

Each program quantizes its rows' 128-wide K block (scale = max(amax, 1e-10) / 448, ragged last block on its
own) right before the fp8 dot, so no quantized copy of x goes through memory; the partial product of each K
block is scaled by (activation scale x weight block scale) and accumulated in fp32.

Small M (decode) has few output tiles: R1's kv_a_proj (N=576) is 9 programs of 64 columns on a 132-SM GPU. There
the K blocks are split across programs (split-K) until about SPLIT_K_PROGRAMS_PER_SM programs per SM run; each
split writes fp32 partial sums that one more kernel adds in a fixed order, with the bias and the output cast
(deterministic for a given M).

Decode-sized M (up to GEMV_MAX_M rows) takes a GEMV path instead: at M=1 the tiled kernel's fp8 dot pads M to
16 and reads the weight as 64 separate 128-byte rows per step, well under the bandwidth limit. The GEMV kernel
reads BLOCK_N weight rows BLOCK_K (several 128-wide K blocks) bytes wide per step, with many programs over N
(and split-K where N alone gives too few), and computes on CUDA cores in fp32: each K block's quantized
activations are multiplied by (activation scale x weight block scale) first, so the product of the dequantized
operands is summed directly (the reference's semantics, up to fp32 summation order).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from runtime.kernels.triton_casts import INTERPRETED, to_bf16, to_e4m3
from runtime.quant.numerics import FP8_BLOCK, FP8_DTYPE, FP8_GROUP_EPS, FP8_MAX


@triton.jit
def _fp8_block_linear_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr,
    M, N, K, x_stride, ws_stride,
    EPS: tl.constexpr, QMAX: tl.constexpr, K_BLOCKS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OUT_BF16: tl.constexpr, EXACT_CAST: tl.constexpr,
    KB_PER_SPLIT: tl.constexpr, PARTIAL: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    r_ok, c_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, KB_PER_SPLIT):
        kb = split * KB_PER_SPLIT + i  # past K_BLOCKS (last split): every load below is masked, the product is 0
        k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * x_stride + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        x_scale = tl.maximum(tl.max(tl.abs(x), axis=1), EPS) / QMAX
        xq = to_e4m3(tl.math.div_rn(x, x_scale[:, None]), EXACT_CAST)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * K + k[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0.0)
        w_scale = tl.load(ws_ptr + (cols // BLOCK_K) * ws_stride + kb, mask=c_ok & (kb < K_BLOCKS), other=0.0)
        acc += tl.dot(xq, tl.trans(w)) * x_scale[:, None] * w_scale[None, :]
    _store_output(acc, y_ptr, bias_ptr, rows, cols, M, N, split, HAS_BIAS, OUT_BF16, EXACT_CAST, PARTIAL)


@triton.jit
def _store_output(acc, y_ptr, bias_ptr, rows, cols, M, N, split, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr,
                  EXACT_CAST: tl.constexpr, PARTIAL: tl.constexpr):
    """acc [rows, cols] to y (bias added, cast), or, with PARTIAL, to split's slice of the fp32 [splits, M, N] buffer."""
    r_ok, c_ok = rows < M, cols < N
    out_mask = r_ok[:, None] & c_ok[None, :]
    if PARTIAL:
        tl.store(y_ptr + (split * M + rows[:, None]).to(tl.int64) * N + cols[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if OUT_BF16:
            y = to_bf16(acc, EXACT_CAST)
        else:
            y = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], y, mask=out_mask)


@triton.jit
def _fp8_block_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr,
    M, N, K, x_stride, ws_stride, K_BLOCKS,
    CHUNKS_PER_SPLIT: tl.constexpr, EPS: tl.constexpr, QMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, OUT_BF16: tl.constexpr,
    EXACT_CAST: tl.constexpr, PARTIAL: tl.constexpr,
):
    """Small-M path: program (n tile, K split) of BLOCK_N output columns over all M (<= BLOCK_M) rows.

    BLOCK_N divides GROUP, so one weight-scale row serves the whole tile; BLOCK_K is a multiple of GROUP."""
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    r_ok, c_ok = rows < M, cols < N
    ws_row = ws_ptr + (tl.program_id(0) * BLOCK_N // GROUP) * ws_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_rows = w_ptr + cols[:, None].to(tl.int64) * K
    for i in range(0, CHUNKS_PER_SPLIT):
        k0 = (split * CHUNKS_PER_SPLIT + i) * BLOCK_K  # past K (last split): loads masked, the product is 0
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(w_rows + k[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * x_stride + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.reshape(x.to(tl.float32), (BLOCK_M, GROUPS, GROUP))
        x_scale = tl.maximum(tl.max(tl.abs(x), axis=2), EPS) / QMAX
        kb = k0 // GROUP + tl.arange(0, GROUPS)
        w_scale = tl.load(ws_row + kb, mask=kb < K_BLOCKS, other=0.0)
        xq = to_e4m3(tl.math.div_rn(x, x_scale[:, :, None]), EXACT_CAST).to(tl.float32)
        xs = tl.reshape(xq * (x_scale * w_scale[None, :])[:, :, None], (BLOCK_M, BLOCK_K))
        acc += tl.sum(xs[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    _store_output(acc, y_ptr, bias_ptr, rows, cols, M, N, split, HAS_BIAS, OUT_BF16, EXACT_CAST, PARTIAL)


@triton.jit
def _sum_splits_kernel(partial_ptr, bias_ptr, y_ptr, MN, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       OUT_BF16: tl.constexpr, EXACT_CAST: tl.constexpr, BLOCK: tl.constexpr):
    """y = sum over splits of the fp32 [SPLITS, M, N] partials, in split order, + bias, cast once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(partial_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    if OUT_BF16:
        y = to_bf16(acc, EXACT_CAST)
    else:
        y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, y, mask=ok)


SPLIT_K_PROGRAMS_PER_SM = 2
SUM_SPLITS_BLOCK = 1024


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of the small-M path: BLOCK_N columns (dividing 128) by BLOCK_K (a multiple of 128) per step,
    K split until about programs_per_sm programs per SM run."""

    block_n: int = 16
    block_k: int = 512
    num_warps: int = 4
    programs_per_sm: int = 4

    def __post_init__(self):
        if self.block_n < 1 or FP8_BLOCK % self.block_n or self.block_n & (self.block_n - 1):
            raise ValueError(f"GemvConfig.block_n must be a power of two dividing {FP8_BLOCK}, got {self.block_n}")
        if self.block_k < FP8_BLOCK or self.block_k & (self.block_k - 1):
            raise ValueError(f"GemvConfig.block_k must be a power of two of at least {FP8_BLOCK}, got {self.block_k}")


# Rows up to which the GEMV path runs by default (the CUDA-core FMAs grow with M; the fp8 dot does not): on the
# H200 (bench/fp8_linear.py, 2026-12-03) it beats the tiled kernel at M=1 and 2; at 4 two runs disagreed. 16 x 1024 tiles were
# the fastest of the shapes swept at M=1 (8 x 2048 within 0.3%); loading the next step's weights ahead in
# registers made every shape slower (1150-1490 against 655 us for one step's linears).
GEMV_MAX_M = 2
DEFAULT_GEMV = GemvConfig(block_n=16, block_k=1024)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_k_factor(programs: int, k_blocks: int, sm_count: int, per_sm: int = SPLIT_K_PROGRAMS_PER_SM) -> int:
    """K splits for an output grid of `programs` tiles: up to `per_sm` programs per SM, whole K blocks per
    split, no empty split."""
    want = min(k_blocks, max(1, -(-per_sm * sm_count // programs)))
    return -(-k_blocks // -(-k_blocks // want))


def fp8_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK),
    out_dtype: torch.dtype = torch.bfloat16,
    split_k: int | None = None,
    gemv: GemvConfig | bool | None = None,
) -> torch.Tensor:
    """Drop-in GPU version of numerics.fp8_block_linear_ref (128x128 weight blocks only).

    split_k: K splits (None: chosen from the grid size on a GPU, 1 elsewhere).
    gemv: the small-M path with this launch shape; None: with DEFAULT_GEMV for M <= GEMV_MAX_M, else the tiled
    kernel; False: the tiled kernel at any M."""
    if tuple(block) != (FP8_BLOCK, FP8_BLOCK):
        raise ValueError(f"fp8_block_linear supports {FP8_BLOCK}x{FP8_BLOCK} weight blocks, got {tuple(block)}")
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D {FP8_DTYPE} tensor, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    if weight_scale_inv.shape != (triton.cdiv(n, FP8_BLOCK), triton.cdiv(k, FP8_BLOCK)):
        raise ValueError(f"weight_scale_inv must be [{triton.cdiv(n, FP8_BLOCK)}, {triton.cdiv(k, FP8_BLOCK)}], got {tuple(weight_scale_inv.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if not m:
        return y.reshape(*lead, n)
    if gemv is None:
        gemv = DEFAULT_GEMV if m <= GEMV_MAX_M else False
    sm_count = _sm_count(x.device.index or 0) if x.is_cuda else None
    scales = weight_scale_inv.float().contiguous()
    k_blocks = triton.cdiv(k, FP8_BLOCK)
    common = dict(EPS=FP8_GROUP_EPS, QMAX=FP8_MAX, HAS_BIAS=bias is not None, OUT_BF16=out_dtype == torch.bfloat16,
                  EXACT_CAST=INTERPRETED)
    if gemv:
        grid_n, chunks = triton.cdiv(n, gemv.block_n), triton.cdiv(k, gemv.block_k)
        if split_k is None:
            split_k = split_k_factor(grid_n, chunks, sm_count, gemv.programs_per_sm) if sm_count else 1
        per_split = triton.cdiv(chunks, split_k)
        splits = triton.cdiv(chunks, per_split)
        partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else y
        _fp8_block_gemv_kernel[(grid_n, splits)](
            x2, weight.contiguous(), scales, bias if bias is not None else scales, partial,
            m, n, k, x2.stride(0), scales.stride(0), k_blocks, **common, CHUNKS_PER_SPLIT=per_split,
            BLOCK_M=triton.next_power_of_2(m), BLOCK_N=gemv.block_n, BLOCK_K=gemv.block_k, GROUP=FP8_BLOCK,
            PARTIAL=splits > 1, num_warps=gemv.num_warps,
        )
    else:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        block_n = 64 if m <= 64 else 128
        grid_mn = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        if split_k is None:
            split_k = split_k_factor(grid_mn[0] * grid_mn[1], k_blocks, sm_count) if sm_count else 1
        kb_per_split = triton.cdiv(k_blocks, split_k)
        splits = triton.cdiv(k_blocks, kb_per_split)
        partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else y
        _fp8_block_linear_kernel[(*grid_mn, splits)](
            x2, weight.contiguous(), scales, bias if bias is not None else scales, partial,
            m, n, k, x2.stride(0), scales.stride(0), **common, K_BLOCKS=k_blocks,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=FP8_BLOCK, KB_PER_SPLIT=kb_per_split, PARTIAL=splits > 1,
        )
    if splits > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, SUM_SPLITS_BLOCK),)](
            partial, bias if bias is not None else partial, y, m * n, n, SPLITS=splits, HAS_BIAS=bias is not None,
            OUT_BF16=out_dtype == torch.bfloat16, EXACT_CAST=INTERPRETED, BLOCK=SUM_SPLITS_BLOCK,
        )
    return y.reshape(*lead, n)
