"""Reference numerics for the FP8-block and W4AFP8 formats (the oracle every backend is checked against).

Everything here follows ../shared/reference/w4afp8-sglang.md (sections 2.2, 2.4 and 3): how SGLang serves
DeepSeek-R1-W4AFP8 and DeepSeek's FP8 block release. Functions are plain torch, run on CPU and GPU, and are
written for clarity, not speed.

Conventions
- fp8 means torch.float8_e4m3fn; every cast to it clamps to +-448 first (Triton casts do not saturate).
- int4 weights are signed, two per byte along K, element 2j in the low nibble (TRT-LLM packing).
- Group scales are multiplicative dequantization scales (the "_inv" in checkpoint names is historical).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT4_MAX = 7
INT4_MIN = -8
FP8_BLOCK = 128
# SGLang's per-token-group quantizer floors the group amax with this before dividing.
FP8_GROUP_EPS = 1e-10


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even cast of an fp32 tensor to e4m3."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


# --------------------------------------------------------------------------------------------- activations


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Static per-tensor activation quantization: fp8(clamp(x * (1/scale), +-448)).

    SGLang multiplies by the fp32 reciprocal of the scale (pre_reorder / silu_mul_static kernels), which can
    differ from a division in the last bit, so the reference does the same.
    """
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    inv = torch.reciprocal(scale)
    return to_fp8(x.float() * inv)


def quantize_fp8_per_token_group(x: torch.Tensor, group_size: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic 1 x group activation quantization used by the FP8 block linear.

    Returns (q [..., K] fp8, scale [..., ceil(K/group)] fp32) with scale = max(amax, eps) / 448 per group.
    A ragged last group (K not a multiple of group_size) is its own, narrower group.
    """
    k = x.shape[-1]
    n_groups = -(-k // group_size)
    pad = n_groups * group_size - k
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    g = xf.reshape(*xf.shape[:-1], n_groups, group_size)
    scale = g.abs().amax(dim=-1).clamp_min(FP8_GROUP_EPS) / FP8_MAX
    q = to_fp8(g / scale.unsqueeze(-1)).reshape(*xf.shape[:-1], n_groups * group_size)
    return q[..., :k], scale


def fp8_per_token_group_roundtrip(x: torch.Tensor, group_size: int = FP8_BLOCK) -> torch.Tensor:
    """fp32 x as an FP8 block GEMM sees it: quantized per 1 x group (quantize_fp8_per_token_group), dequantized."""
    q, scale = quantize_fp8_per_token_group(x, group_size)
    return q.float() * scale.repeat_interleave(group_size, dim=-1)[..., : x.shape[-1]]


# ------------------------------------------------------------------------------------------ FP8 block weights


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight [out, in] to DeepSeek's FP8 block format.

    Returns (weight fp8 [out, in], weight_scale_inv fp32 [ceil(out/bo), ceil(in/bi)]) with scale = amax/448
    per block; dequantization is weight * scale (broadcast per block).
    """
    bo, bi = block
    out_f, in_f = w.shape
    no, ni = -(-out_f // bo), -(-in_f // bi)
    wf = torch.nn.functional.pad(w.float(), (0, ni * bi - in_f, 0, no * bo - out_f))
    blocks = wf.reshape(no, bo, ni, bi)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = to_fp8(blocks / scale[:, None, :, None]).reshape(no * bo, ni * bi)[:out_f, :in_f]
    return q.contiguous(), scale.contiguous()


def dequantize_fp8_block(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)) -> torch.Tensor:
    """Inverse of quantize_fp8_block: fp32 [out, in]."""
    bo, bi = block
    out_f, in_f = q.shape
    s = scale.float().repeat_interleave(bo, dim=0)[:out_f].repeat_interleave(bi, dim=1)[:, :in_f]
    return q.float() * s


def fp8_block_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK),
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """y = x W^T for an FP8 block weight with dynamic 1 x block[1] activation quantization.

    Reference semantics of SGLang's w8a8_block_fp8_matmul: per K block the fp8 x fp8 partial product is
    scaled by (activation group scale * weight block scale) and accumulated in fp32; output cast once.
    Computed here as an fp32 matmul of the two dequantized operands, equal up to fp32 summation order.
    """
    return fp8_block_linear_dequantized(x, dequantize_fp8_block(weight, weight_scale_inv, block), bias, block, out_dtype)


def fp8_block_linear_dequantized(
    x: torch.Tensor,
    weight_dequantized: torch.Tensor,
    bias: torch.Tensor | None = None,
    block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK),
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """fp8_block_linear_ref given the weight already dequantized (fp32 [out, in], from dequantize_fp8_block)."""
    lead = x.shape[:-1]
    x_deq = fp8_per_token_group_roundtrip(x.reshape(-1, x.shape[-1]), block[1])
    y = x_deq @ weight_dequantized.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*lead, weight_dequantized.shape[0])


# ---------------------------------------------------------------------------------------------- int4 weights


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 values (int8 tensor in [-8, 7], last dim even) two per byte, low nibble first."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {tuple(q.shape)}")
    q = q.to(torch.int16)
    lo = q[..., 0::2] & 0xF
    hi = q[..., 1::2] & 0xF
    byte = (hi << 4) | lo  # 0..255
    return torch.where(byte > 127, byte - 256, byte).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: int8 [..., 2 * K/2] in [-8, 7] (sign-extended nibbles)."""
    b = packed.to(torch.int16)
    lo = ((b & 0xF) ^ 0x8) - 0x8
    hi = (((b >> 4) & 0xF) ^ 0x8) - 0x8
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.int8)


def quantize_w4_groupwise(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight [N, K] the way TRT-LLM's mixed-precision script does for W4AFP8 experts.

    The weight is first rounded to bf16 (the script dequantizes FP8 to bf16), then per output row and K group
    scale = amax / 7 and q = clamp(round(w / scale), -8, 7). Returns (packed int8 [N, K/2], scale fp32 [N, K/G]).
    An all-zero group gets scale 0 and q 0.
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    wf = w.to(torch.bfloat16).float().reshape(n, k // group_size, group_size)
    scale = wf.abs().amax(dim=-1) / INT4_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wf / safe.unsqueeze(-1)).clamp(INT4_MIN, INT4_MAX)
    q = torch.where(scale.unsqueeze(-1) > 0, q, torch.zeros_like(q))
    return pack_int4(q.reshape(n, k).to(torch.int8)), scale.contiguous()


def dequantize_w4_groupwise(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] = q * scale, scale applied per K group (as given: round it to bf16 first to mimic SGLang)."""
    q = unpack_int4(packed).float()
    group = q.shape[-1] // scale.shape[-1]
    return q * scale.float().repeat_interleave(group, dim=-1)


def interleave_scales(s: torch.Tensor) -> torch.Tensor:
    """SGLang's scale layout for the CUTLASS kernel: [E, N, K/G] -> [E, K/(G*a), N*a], a = 4 if (K/G) % 4 == 0 else 1."""
    e, n, kg = s.shape
    a = 4 if kg % 4 == 0 else 1
    return s.reshape(e, n, kg // a, a).permute(0, 2, 1, 3).reshape(e, kg // a, n * a).contiguous()


# ------------------------------------------------------------------------------------------- W4AFP8 GEMMs


def w4afp8_gemm_ref(a_q: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """One expert's W4AFP8 GEMM exactly as the SM90 kernel defines it (section 2.2).

    a_q: fp8 [M, K]; w_packed: int8 [N, K/2] (or the int4 values already unpacked, [N, K], as a CPU backend
    caches them); w_scale: bf16 [N, K/G]; alpha: fp32 scalar.
    P_g = sum over group g of fp8(q) * a_q (fp32), acc = sum_g float(s[n, g]) * P_g, D = bf16(alpha * acc).
    """
    m, k = a_q.shape
    n, n_groups = w_scale.shape
    g = k // n_groups
    a = a_q.float().reshape(m, n_groups, g)
    q = (w_packed if w_packed.shape[-1] == k else unpack_int4(w_packed)).float().reshape(n, n_groups, g)
    partial = torch.einsum("mgk,ngk->mng", a, q)  # [M, N, groups], one fp32 partial sum per K group
    acc = (partial * w_scale.to(torch.bfloat16).float().unsqueeze(0)).sum(dim=-1)
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=a_q.device)
    return (alpha * acc).to(torch.bfloat16)


@dataclass(frozen=True)
class W4AFp8MoEWeights:
    """One rank's W4AFP8 routed experts as every `moe.w4afp8` backend takes them (the backend contract):

        out = backend(x, experts, topk_ids, topk_weights, routed_scaling_factor)  # bf16 [M, H]

    x [M, H] (cast to bf16 first, as the server holds it); topk_ids [M, k] global expert ids; topk_weights [M, k]
    fp32 (renormalised, routed scaling not applied); w4afp8_moe_ref gives the semantics.

    The weight tensors are in checkpoint layout for the reference, or in the layout the backend's `prepare`
    returned (runtime.kernels.moe_api). Checkpoint layout: w13 int8 [E, 2I, H/2] (gate rows then up rows), w2
    int8 [E, H, I/2] (both may also be given unpacked, [E, 2I, H] and [E, H, I]); w13_scale [E, 2I, H/G] and
    w2_scale [E, H, I/G] (rounded to bf16 by the reference). a1, a2: the layer's single activation scale per
    GEMM (fp32 scalars, already bf16-rounded and maxed over experts by the loader). Experts outside
    [expert_offset, expert_offset + E) belong to other ranks (EP) and are skipped.
    """

    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor
    w2_scale: torch.Tensor
    a1: torch.Tensor | float
    a2: torch.Tensor | float
    expert_offset: int = 0


def w4afp8_moe_ref(x: torch.Tensor, experts: W4AFp8MoEWeights, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   routed_scaling_factor: float = 1.0) -> torch.Tensor:
    """The W4AFP8 routed-expert MoE of one rank, per section 2.4. Returns bf16 [M, H] (before any all-reduce).

    Arguments as W4AFp8MoEWeights describes. The combine is fp32, routed_scaling_factor applied once, result
    cast to bf16.
    """
    w13, w2, w13_scale, w2_scale = experts.w13, experts.w2, experts.w13_scale, experts.w2_scale
    a1, a2 = experts.a1, experts.a2
    m, h = x.shape
    n_local = w13.shape[0]
    inter = w13.shape[1] // 2
    xb = x.to(torch.bfloat16)
    out = torch.zeros(m, h, dtype=torch.float32, device=x.device)
    local_ids = topk_ids.long() - experts.expert_offset
    for e in range(n_local):
        token_idx, slot = torch.nonzero(local_ids == e, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        xq = quantize_fp8_static(xb[token_idx], a1)
        h13 = w4afp8_gemm_ref(xq, w13[e], w13_scale[e], a1)  # bf16 [T, 2I]
        gate, up = h13[:, :inter].float(), h13[:, inter:].float()
        act = torch.nn.functional.silu(gate) * up  # fp32 SwiGLU on the bf16 GEMM output
        yq = quantize_fp8_static(act, a2)
        z = w4afp8_gemm_ref(yq, w2[e], w2_scale[e], a2)  # bf16 [T, H]
        w = topk_weights[token_idx, slot].float().unsqueeze(-1)
        out.index_add_(0, token_idx, w * z.float())
    return (routed_scaling_factor * out).to(torch.bfloat16)
