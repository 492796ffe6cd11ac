"""FP8 block linear on GPU (Triton): y = x W^T for DeepSeek FP8 128x128 block weights with dynamic 1x128
activation quantization fused into the GEMM (numerics.fp8_block_linear_ref semantics).

Each program quantizes its rows' 128-wide K block (scale = max(amax, 1e-10) / 448, ragged last block on its
own) right before the fp8 dot, so no quantized copy of x goes through memory; the partial product of each K
block is scaled by (activation scale x weight block scale) and accumulated in fp32.

Small M (decode) has few output tiles: R1's kv_a_proj (N=576) is 9 programs of 64 columns on a 132-SM GPU. There
the K blocks are split across programs (split-K) until about SPLIT_K_PROGRAMS_PER_SM programs per SM run; each
split writes fp32 partial sums that are added in a fixed order afterwards (deterministic for a given M).
"""

from __future__ import annotations

import functools

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
    out_mask = r_ok[:, None] & c_ok[None, :]
    if PARTIAL:  # y_ptr is the fp32 [splits, M, N] partial-sum buffer
        tl.store(y_ptr + (split * M + rows[:, None]).to(tl.int64) * N + cols[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if OUT_BF16:
            y = to_bf16(acc, EXACT_CAST)
        else:
            y = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], y, mask=out_mask)


SPLIT_K_PROGRAMS_PER_SM = 2


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_k_factor(programs: int, k_blocks: int, sm_count: int) -> int:
    """K splits for an output grid of `programs` tiles: up to SPLIT_K_PROGRAMS_PER_SM programs per SM, whole K
    blocks per split, no empty split."""
    want = min(k_blocks, max(1, -(-SPLIT_K_PROGRAMS_PER_SM * sm_count // programs)))
    return -(-k_blocks // -(-k_blocks // want))


def fp8_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK),
    out_dtype: torch.dtype = torch.bfloat16,
    split_k: int | None = None,
) -> torch.Tensor:
    """Drop-in GPU version of numerics.fp8_block_linear_ref (128x128 weight blocks only).

    split_k: K splits (None: chosen from the grid size on a GPU, 1 elsewhere)."""
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
    if m:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        block_n = 64 if m <= 64 else 128
        scales = weight_scale_inv.float().contiguous()
        grid_mn = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        k_blocks = triton.cdiv(k, FP8_BLOCK)
        if split_k is None:
            split_k = split_k_factor(grid_mn[0] * grid_mn[1], k_blocks, _sm_count(x.device.index or 0)) if x.is_cuda else 1
        kb_per_split = triton.cdiv(k_blocks, split_k)
        splits = triton.cdiv(k_blocks, kb_per_split)
        partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else y
        _fp8_block_linear_kernel[(*grid_mn, splits)](
            x2, weight.contiguous(), scales, bias if bias is not None else scales, partial,
            m, n, k, x2.stride(0), scales.stride(0),
            EPS=FP8_GROUP_EPS, QMAX=FP8_MAX, K_BLOCKS=k_blocks, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=FP8_BLOCK, OUT_BF16=out_dtype == torch.bfloat16, EXACT_CAST=INTERPRETED,
            KB_PER_SPLIT=kb_per_split, PARTIAL=splits > 1,
        )
        if splits > 1:
            acc = partial.sum(0)
            if bias is not None:
                acc += bias.float()
            y.copy_(acc)
    return y.reshape(*lead, n)

