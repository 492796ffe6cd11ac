"""Paged MLA decode attention in Triton (split-KV "flash decoding", two stages).

MLA with the up-projection absorbed has one shared key head per token: the cache row is [latent (kv_lora) | rope]
and the value is the latent part of the same row. So the heads of a sequence all read the same cache rows, and
one program takes BLOCK_H heads at once: the scores of a tile are one [BLOCK_H, kv_lora + rope] x
[kv_lora + rope, BLOCK_N] matrix product on the tensor cores, and each cache row is read once per head block
instead of once per head. Each sequence's context is cut into `splits` pieces run in parallel (enough programs to
fill the GPU at batch 1); stage 2 merges the pieces' partial outputs by their log-sum-exp.

Softmax and accumulation are fp32; p is rounded to the cache dtype for the second product, as FlashAttention does.
Runs under TRITON_INTERPRET=1 on CPU (tests/test_triton_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels.triton_casts import INTERPRETED

BLOCK_H = 16  # heads per program: the M extent of the products (tensor-core tiles need 16)
BLOCK_N = 32  # cache rows per iteration
# Programs per SM that the split count aims for (partials cost a [heads, kv_lora] fp32 write per split).
PROGRAMS_PER_SM = 4
MAX_SPLITS = 64


@triton.jit
def _mla_decode_partial(
    q_ptr, kv_ptr, slots_ptr, lens_ptr, mid_o_ptr, mid_lse_ptr,
    stride_qb, stride_qh, stride_kv, stride_sb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    num_heads, split_len, scale,
    LATENT: tl.constexpr, ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    head_ok = heads < num_heads
    ctx = tl.load(lens_ptr + b)
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)

    d_lat = tl.arange(0, LATENT)
    d_rope = tl.arange(0, ROPE)
    q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_row + d_lat[None, :], mask=head_ok[:, None], other=0.0)
    q_rope = tl.load(q_row + LATENT + d_rope[None, :], mask=head_ok[:, None], other=0.0)
    if UPCAST:
        q_lat, q_rope = q_lat.to(tl.float32), q_rope.to(tl.float32)

    # A finite floor for the running max: a tile with no valid row then adds exp(-inf) = 0 instead of a NaN.
    m = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, LATENT], tl.float32)
    # A while loop: its bounds come from memory (the context length), and Triton's interpreter (CPU tests) cannot
    # take those as range() bounds. Rows at or past `end` are masked, so their loads touch no memory.
    n0 = start
    while n0 < end:
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        slot = tl.load(slots_ptr + b * stride_sb + n, mask=valid, other=0)
        row = kv_ptr + slot.to(tl.int64)[:, None] * stride_kv
        k_lat = tl.load(row + d_lat[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, LATENT]; also the value
        k_rope = tl.load(row + LATENT + d_rope[None, :], mask=valid[:, None], other=0.0)
        if UPCAST:
            k_lat, k_rope = k_lat.to(tl.float32), k_rope.to(tl.float32)
        s = tl.dot(q_lat, tl.trans(k_lat), input_precision=PRECISION)
        s += tl.dot(q_rope, tl.trans(k_rope), input_precision=PRECISION)
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_lat.dtype), k_lat, input_precision=PRECISION)
        m = m_new
        n0 += BLOCK_N

    # An empty split (past the context) leaves l = 0: its lse is -inf and stage 2 gives it weight 0.
    has_rows = l > 0
    out = acc / tl.where(has_rows, l, 1.0)[:, None]
    lse = tl.where(has_rows, m + tl.log(tl.where(has_rows, l, 1.0)), float("-inf"))
    o_ptr = mid_o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d_lat[None, :]
    tl.store(o_ptr, out, mask=head_ok[:, None])
    tl.store(mid_lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=head_ok)


@triton.jit
def _mla_decode_merge(
    mid_o_ptr, mid_lse_ptr, out_ptr,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    splits,
    LATENT: tl.constexpr,
):
    """out = sum_s exp(lse_s) * o_s / sum_s exp(lse_s), one split at a time with a running max."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, LATENT)
    m = tl.full([1], -1.0e30, tl.float32)
    total = tl.zeros([1], tl.float32)
    acc = tl.zeros([LATENT], tl.float32)
    s = 0
    while s < splits:
        lse = tl.load(mid_lse_ptr + b * stride_lb + h * stride_lh + s + tl.arange(0, 1))
        part = tl.load(mid_o_ptr + b * stride_ob + h * stride_oh + s * stride_os + d)
        m_new = tl.maximum(m, lse)
        keep, w = tl.exp(m - m_new), tl.exp(lse - m_new)  # an empty split has lse -inf: weight 0
        acc = acc * keep + part * w
        total = total * keep + w
        m = m_new
        s += 1
    tl.store(out_ptr + b * stride_outb + h * stride_outh + d, (acc / total).to(out_ptr.dtype.element_ty))


def supports(latent_dim: int, rope_dim: int) -> bool:
    """Widths the kernel takes: powers of two (Triton block shapes) of at least 16 (the products' K extent)."""
    return all(w >= 16 and w & (w - 1) == 0 for w in (latent_dim, rope_dim))


def num_splits(batch: int, heads: int, max_len: int, sm_count: int) -> int:
    """Context pieces per sequence: enough programs for PROGRAMS_PER_SM per SM, each piece at least BLOCK_N rows."""
    programs = batch * triton.cdiv(heads, BLOCK_H)
    want = triton.cdiv(PROGRAMS_PER_SM * sm_count, programs)
    return max(1, min(want, MAX_SPLITS, triton.cdiv(max_len, BLOCK_N)))


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, slot_table: torch.Tensor, context_lens: torch.Tensor,
               latent_dim: int, scale: float, splits: int | None = None) -> torch.Tensor:
    """One new token per sequence attending to its cached tokens.

    q [B, heads, latent + rope] (absorbed query: latent part then rope part); kv_cache [slots, latent + rope];
    slot_table [B, L] cache slot of each position (entries past a sequence's length are not read);
    context_lens [B] int. Returns [B, heads, latent] in q's dtype.
    """
    batch, heads, dim = q.shape
    rope = dim - latent_dim
    if kv_cache.shape[-1] != dim or kv_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError(f"mla_decode: q {tuple(q.shape)} and kv_cache {tuple(kv_cache.shape)} must share a contiguous last dim")
    if not supports(latent_dim, rope):
        raise ValueError(f"mla_decode: latent ({latent_dim}) and rope ({rope}) widths must be powers of two >= 16")
    max_len = slot_table.shape[1]
    if splits is None:
        sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
        splits = num_splits(batch, heads, max_len, sm_count)
    split_len = triton.cdiv(triton.cdiv(max_len, splits), BLOCK_N) * BLOCK_N
    mid_o = torch.empty(batch, heads, splits, latent_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    out = q.new_empty(batch, heads, latent_dim)
    slot_table = slot_table.contiguous()
    lens = context_lens.to(torch.int32)
    _mla_decode_partial[(batch, triton.cdiv(heads, BLOCK_H), splits)](
        q, kv_cache, slot_table, lens, mid_o, mid_lse,
        q.stride(0), q.stride(1), kv_cache.stride(0), slot_table.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        heads, split_len, scale,
        LATENT=latent_dim, ROPE=rope, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N,
        # fp32 models (tests against the CPU) get fp32 products; tf32 would move them by ~1e-3.
        PRECISION="ieee" if q.dtype == torch.float32 or INTERPRETED else "tf32",
        # Triton 3.6's interpreter multiplies bf16 tiles wrongly (garbage); it gets fp32 operands instead.
        UPCAST=INTERPRETED, num_warps=4, num_stages=2,
    )
    _mla_decode_merge[(batch, heads)](
        mid_o, mid_lse, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), splits,
        LATENT=latent_dim, num_warps=4,
    )
    return out
