"""`--moe-backend triton`: the fused W4AFP8 routed-expert MoE in Triton, for GPUs without the CUTLASS build.

Same numerics as numerics.w4afp8_moe_ref: per K group an fp8 x fp8 dot (casts clamp to +-448 first) (int4 converted exactly to e4m3) into a
fresh fp32 partial, scaled by the bf16 group scale, one alpha per GEMM, bf16 GEMM outputs. Kernels:
gate/up GEMM that gathers x by token and quantizes it on the fly, with SwiGLU + fp8 requantization fused
(gate and up rows of the same neurons in one program); down GEMM; top-k combine. Routing metadata is built
with torch ops on the device (no host synchronisation). Runs under TRITON_INTERPRET=1 on CPU for tests
(loop bounds are constexpr: the interpreter cannot loop over run-time scalars with numpy 2.4).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels.moe_api import PreparedExperts, check_moe_inputs, device_scalar, max_token_tiles, tokens_per_tile
from runtime.kernels.triton_casts import INTERPRETED, to_bf16, to_e4m3
from runtime.quant.numerics import FP8_DTYPE, W4AFp8MoEWeights

BLOCK_N = 64
COMBINE_BLOCK = 512
# tl.dot needs at least 16 rows.
TOKEN_TILES = (16, 32, 64)


@triton.jit
def _int4_to_fp8(packed):
    """int8 [R, G/2] (element 2j low nibble) -> e4m3 [R, G]; exact for -8..7."""
    lo = (packed << 4) >> 4
    hi = packed >> 4
    q = tl.join(lo, hi).reshape(packed.shape[0], packed.shape[1] * 2)
    return q.to(tl.float32).to(tl.float8e4nv)


@triton.jit
def _group_partial(a, w_ptrs, s_ptrs):
    """fp32 [BM, BN] = bf16 scale * (a @ e4m3(w)^T) for one K group."""
    w = _int4_to_fp8(tl.load(w_ptrs))
    return tl.dot(a, tl.trans(w)) * tl.load(s_ptrs).to(tl.float32)[None, :]


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, row_token_ptr, w_ptr, s_ptr, a1_ptr, a2_ptr, tiles_ptr, y_ptr,
    H, INTER, w_stride_e, s_stride_e,
    N_GROUPS: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXACT_CAST: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tiles_ptr + 3 * tile)
    row0 = tl.load(tiles_ptr + 3 * tile + 1)
    nrows = tl.load(tiles_ptr + 3 * tile + 2)
    if nrows > 0:
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < nrows
        token = tl.load(row_token_ptr + row0 + offs_m, mask=m_ok, other=0).to(tl.int64)
        neuron = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, G)
        offs_kb = tl.arange(0, G // 2)
        a1 = tl.load(a1_ptr)
        inv_a1 = tl.math.div_rn(1.0, a1)
        w_gate = w_ptr + expert * w_stride_e + neuron[:, None] * (H // 2) + offs_kb[None, :]
        w_up = w_gate + INTER * (H // 2)
        s_gate = s_ptr + expert * s_stride_e + neuron * N_GROUPS
        s_up = s_gate + INTER * N_GROUPS
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, N_GROUPS):
            x = tl.load(x_ptr + token[:, None] * H + g * G + offs_k[None, :], mask=m_ok[:, None], other=0.0)
            a = to_e4m3(x.to(tl.float32) * inv_a1, EXACT_CAST)
            acc_gate += _group_partial(a, w_gate + g * (G // 2), s_gate + g)
            acc_up += _group_partial(a, w_up + g * (G // 2), s_up + g)
        gate = to_bf16(a1 * acc_gate, EXACT_CAST).to(tl.float32)
        up = to_bf16(a1 * acc_up, EXACT_CAST).to(tl.float32)
        act = tl.math.div_rn(gate, 1.0 + tl.exp(-gate)) * up
        inv_a2 = tl.math.div_rn(1.0, tl.load(a2_ptr))
        y = to_e4m3(act * inv_a2, EXACT_CAST)
        rows = (row0 + offs_m).to(tl.int64)
        tl.store(y_ptr + rows[:, None] * INTER + neuron[None, :], y, mask=m_ok[:, None])


@triton.jit
def _down_kernel(
    y_ptr, w_ptr, s_ptr, a2_ptr, tiles_ptr, z_ptr,
    H, INTER, w_stride_e, s_stride_e,
    N_GROUPS: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXACT_CAST: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tiles_ptr + 3 * tile)
    row0 = tl.load(tiles_ptr + 3 * tile + 1)
    nrows = tl.load(tiles_ptr + 3 * tile + 2)
    if nrows > 0:
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < nrows
        rows = (row0 + offs_m).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, G)
        offs_kb = tl.arange(0, G // 2)
        w_rows = w_ptr + expert * w_stride_e + n[:, None] * (INTER // 2) + offs_kb[None, :]
        s_rows = s_ptr + expert * s_stride_e + n * N_GROUPS
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, N_GROUPS):
            a = tl.load(y_ptr + rows[:, None] * INTER + g * G + offs_k[None, :], mask=m_ok[:, None], other=0.0)
            acc += _group_partial(a, w_rows + g * (G // 2), s_rows + g)
        z = to_bf16(tl.load(a2_ptr) * acc, EXACT_CAST)
        tl.store(z_ptr + rows[:, None] * H + n[None, :], z, mask=m_ok[:, None])


@triton.jit
def _combine_kernel(z_ptr, src2dst_ptr, w_ptr, out_ptr, H, rsf, TOPK: tl.constexpr, BLOCK: tl.constexpr, EXACT_CAST: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    c_ok = cols < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, TOPK):
        row = tl.load(src2dst_ptr + token * TOPK + k)
        weight = tl.load(w_ptr + token * TOPK + k)
        z = tl.load(z_ptr + row.to(tl.int64) * H + cols, mask=c_ok & (row >= 0), other=0.0)
        acc += weight * z.to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * H + cols, to_bf16(rsf * acc, EXACT_CAST), mask=c_ok)


def route(topk_ids: torch.Tensor, n_experts: int, expert_offset: int, tile: int, max_tiles: int):
    """Expert-sorted rows, per-tile (expert, first row, rows) and pair -> row map, all on the device."""
    topk = topk_ids.shape[1]
    dev = topk_ids.device
    local = topk_ids.reshape(-1).long() - expert_offset
    valid = (local >= 0) & (local < n_experts)
    key = torch.where(valid, local, n_experts)
    order = torch.argsort(key, stable=True)
    # scatter_add rather than bincount: bincount reads its size back to the host, which breaks graph capture.
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))[:n_experts]
    offsets = torch.cumsum(counts, 0) - counts
    tiles_per_expert = (counts + tile - 1) // tile
    tiles_end = torch.cumsum(tiles_per_expert, 0)
    t = torch.arange(max_tiles, device=dev)
    tile_expert = torch.searchsorted(tiles_end, t, right=True)
    e = tile_expert.clamp(max=n_experts - 1)
    index_in_expert = t - (tiles_end[e] - tiles_per_expert[e])
    rows = torch.clamp(counts[e] - index_in_expert * tile, min=0, max=tile)
    rows = torch.where(tile_expert < n_experts, rows, torch.zeros_like(rows))
    tiles = torch.stack((e, offsets[e] + index_in_expert * tile, rows), dim=1).to(torch.int32).contiguous()
    row_token = (order // topk).to(torch.int32)
    src2dst = torch.empty_like(local)
    src2dst[order] = torch.arange(order.numel(), device=dev)
    src2dst = torch.where(valid, src2dst, -1).to(torch.int32)
    return tiles, row_token, src2dst


class TritonW4AFp8MoE:
    """A moe.w4afp8 backend (numerics.W4AFp8MoEWeights) on `prepare`d weights."""

    name = "triton"

    def prepare(self, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor) -> PreparedExperts:
        """Weights keep the checkpoint layout; scales are rounded to bf16 (as SGLang serves them)."""
        return PreparedExperts(
            w13=w13.contiguous(),
            w2=w2.contiguous(),
            w13_scale=w13_scale.to(torch.bfloat16).contiguous(),
            w2_scale=w2_scale.to(torch.bfloat16).contiguous(),
        )

    def __call__(self, x: torch.Tensor, experts: W4AFp8MoEWeights, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 routed_scaling_factor: float = 1.0) -> torch.Tensor:
        w13, w2, w13_scale, w2_scale = experts.w13, experts.w2, experts.w13_scale, experts.w2_scale
        n_experts, two_inter, half_hidden = w13.shape
        hidden, inter = 2 * half_hidden, two_inter // 2
        check_moe_inputs(x, topk_ids, topk_weights, hidden)
        if w13_scale.dtype != torch.bfloat16 or w2_scale.dtype != torch.bfloat16:
            raise ValueError("triton backend: scales are in checkpoint form; pass the weights through prepare() first")
        m, topk = topk_ids.shape
        dev = x.device
        out = torch.empty(m, hidden, dtype=torch.bfloat16, device=dev)
        if m == 0:
            return out
        if inter % BLOCK_N or hidden % BLOCK_N:
            raise ValueError(f"triton backend needs hidden ({hidden}) and intermediate ({inter}) to be multiples of {BLOCK_N}")
        pairs = m * topk
        tile = tokens_per_tile(pairs, n_experts, TOKEN_TILES)
        max_tiles = max_token_tiles(pairs, n_experts, tile)
        tiles, row_token, src2dst = route(topk_ids, n_experts, experts.expert_offset, tile, max_tiles)
        a1t, a2t = device_scalar(experts.a1, dev), device_scalar(experts.a2, dev)
        group1, group2 = hidden // w13_scale.shape[2], inter // w2_scale.shape[2]

        y = torch.empty(pairs, inter, dtype=FP8_DTYPE, device=dev)
        _gate_up_swiglu_kernel[(max_tiles, inter // BLOCK_N)](
            x.to(torch.bfloat16).contiguous(), row_token, w13, w13_scale, a1t, a2t, tiles, y,
            hidden, inter, w13.stride(0), w13_scale.stride(0),
            N_GROUPS=hidden // group1, G=group1, BLOCK_M=tile, BLOCK_N=BLOCK_N, EXACT_CAST=INTERPRETED,
        )
        z = torch.empty(pairs, hidden, dtype=torch.bfloat16, device=dev)
        _down_kernel[(max_tiles, hidden // BLOCK_N)](
            y, w2, w2_scale, a2t, tiles, z, hidden, inter, w2.stride(0), w2_scale.stride(0),
            N_GROUPS=inter // group2, G=group2, BLOCK_M=tile, BLOCK_N=BLOCK_N, EXACT_CAST=INTERPRETED,
        )
        _combine_kernel[(m, triton.cdiv(hidden, COMBINE_BLOCK))](
            z, src2dst, topk_weights.float().contiguous(), out, hidden, float(routed_scaling_factor), TOPK=topk, BLOCK=COMBINE_BLOCK, EXACT_CAST=INTERPRETED,
        )
        return out

