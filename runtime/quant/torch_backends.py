"""The quantized operations in plain torch: the references of bf16 and FP8 experts (the W4AFP8 experts' and the
FP8 linear's are in runtime.quant.numerics) and the CPU variants that compute the same math faster, with
weights unpacked or dequantized once at load (`prepare`) and experts batched. runtime.backends lists them.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from runtime.layers.cpu_dense import onednn_linear, pack_for_onednn
from runtime.quant import numerics as nx
from runtime.quant.base import batched_expert_moe, routed_tokens, silu_and_mul


def bf16_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    routed_scaling_factor: float = 1.0,
    expert_offset: int = 0,
) -> torch.Tensor:
    """Routed experts in the weights' dtype: GEMMs in x.dtype, SwiGLU and the top-k combine in fp32."""
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for e, token_idx, slot in routed_tokens(topk_ids, expert_offset, w13.shape[0]):
        h = F.linear(x[token_idx], w13[e])
        act = silu_and_mul(h[:, :inter], h[:, inter:])
        z = F.linear(act, w2[e])
        out.index_add_(0, token_idx, topk_weights[token_idx, slot].float().unsqueeze(-1) * z.float())
    return (routed_scaling_factor * out).to(x.dtype)


def _bf16_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Every expert of w13 [E, 2I, H] / w2 [E, H, I] on every row of x: [E, M, H] in x.dtype."""
    e, two_i, h = w13.shape
    gate_up = F.linear(x, w13.reshape(e * two_i, h)).view(-1, e, two_i)
    act = silu_and_mul(gate_up[..., : two_i // 2], gate_up[..., two_i // 2 :])
    return torch.bmm(act.transpose(0, 1), w2.transpose(1, 2))


def bf16_moe_batched(x, w13, w2, topk_ids, topk_weights, routed_scaling_factor=1.0, expert_offset=0):
    """bf16_moe_ref's math with the experts batched (runtime.quant.base.batched_expert_moe)."""
    return batched_expert_moe(x, topk_ids, topk_weights, w13.shape[0], expert_offset, routed_scaling_factor,
                              lambda rows, sel: _bf16_experts(rows, w13[sel], w2[sel]), x.dtype)


def _gate_up(x: torch.Tensor, w13: torch.Tensor, sel: slice, w13_packed: torch.Tensor | None = None,
             w13_half: torch.Tensor | None = None) -> torch.Tensor:
    """x (fp32) times the gate/up weights of experts `sel` (w13 [E, 2I, H] fp32) as [M, n * 2I] fp32. When `sel`
    is all of them (the dense path of batched_expert_moe, the only one a small model takes): from the half-precision
    weights for one row and from their oneDNN-packed copy for more, when given (runtime.layers.cpu_dense says why)."""
    e, two_i, h = w13.shape
    if sel == slice(0, e):
        if w13_half is not None and x.shape[0] == 1:
            return F.linear(x.to(w13_half.dtype), w13_half.reshape(e * two_i, h)).float()
        if w13_packed is not None:
            return onednn_linear(x, w13_packed, e * two_i)
    return F.linear(x, w13[sel].reshape(-1, h))


def _fp32_experts(x, w13, w2, sel: slice, w13_packed=None, w13_half=None) -> torch.Tensor:
    """_bf16_experts on fp32 weights: each GEMM in fp32, its output rounded to x.dtype as the bf16 GEMM's is."""
    two_i = w13.shape[1]
    gate_up = _gate_up(x.float(), w13, sel, w13_packed, w13_half).to(x.dtype).view(x.shape[0], -1, two_i)
    act = silu_and_mul(gate_up[..., : two_i // 2], gate_up[..., two_i // 2 :])
    return torch.bmm(act.float().transpose(0, 1), w2[sel].transpose(1, 2)).to(x.dtype)


def bf16_moe_fp32(x, w13, w2, topk_ids, topk_weights, routed_scaling_factor=1.0, expert_offset=0, w13_packed=None,
                  w13_half=None):
    """bf16_moe_batched on weights upcast to fp32 at load (runtime.layers.cpu_dense says why)."""
    return batched_expert_moe(x, topk_ids, topk_weights, w13.shape[0], expert_offset, routed_scaling_factor,
                              lambda rows, sel: _fp32_experts(rows, w13, w2, sel, w13_packed, w13_half), x.dtype)


def upcast_bf16_experts(w13, w2) -> dict:
    return {"w13": w13.float(), "w2": w2.float()}


def pack_bf16_experts(w13, w2) -> dict:
    return {**upcast_bf16_experts(w13, w2), "w13_packed": pack_all_experts(w13), "w13_half": w13.detach()}


def pack_all_experts(w13: torch.Tensor) -> torch.Tensor:
    """Every expert's gate/up weight [E, 2I, H] as one oneDNN-packed [E * 2I, H] fp32 weight."""
    return pack_for_onednn(w13.reshape(-1, w13.shape[-1]))


def dequantize_fp8_expert(w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                          block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One FP8-block expert as fp32 (w13 [2I, H], w2 [H, I]); the gate and up halves have their own blocks."""
    inter, half = w13.shape[0] // 2, w13_scale.shape[0] // 2
    gate = nx.dequantize_fp8_block(w13[:inter], w13_scale[:half], block)
    up = nx.dequantize_fp8_block(w13[inter:], w13_scale[half:], block)
    return torch.cat((gate, up)), nx.dequantize_fp8_block(w2, w2_scale, block)


def fp8_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    routed_scaling_factor: float = 1.0,
    expert_offset: int = 0,
    block: tuple[int, int] = (nx.FP8_BLOCK, nx.FP8_BLOCK),
    dequantized: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """FP8-block routed experts: each GEMM as numerics.fp8_block_linear_ref (dynamic 1 x 128 activations),
    SwiGLU and the combine in fp32. `dequantized`: the fp32 expert weights if a backend cached them."""
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for e, token_idx, slot in routed_tokens(topk_ids, expert_offset, w13.shape[0]):
        if dequantized is None:
            d13, d2 = dequantize_fp8_expert(w13[e], w13_scale[e], w2[e], w2_scale[e], block)
        else:
            d13, d2 = dequantized[0][e], dequantized[1][e]
        h = nx.fp8_block_linear_dequantized(x[token_idx], d13, block=block, out_dtype=x.dtype)
        z = nx.fp8_block_linear_dequantized(silu_and_mul(h[:, :inter], h[:, inter:]), d2, block=block, out_dtype=x.dtype)
        out.index_add_(0, token_idx, topk_weights[token_idx, slot].float().unsqueeze(-1) * z.float())
    return (routed_scaling_factor * out).to(x.dtype)


def dequantize_fp8_experts(w13, w2, w13_scale, w2_scale, block) -> dict:
    pairs = [dequantize_fp8_expert(w13[e], w13_scale[e], w2[e], w2_scale[e], block) for e in range(w13.shape[0])]
    return {"dequantized": (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))}


def _fp8_experts(x, d13, d2, sel: slice, block: tuple[int, int], d13_packed=None) -> torch.Tensor:
    """Dequantized FP8 experts `sel` (d13 [E, 2I, H], d2 [E, H, I] fp32) on every row of x: [n, M, H] in x.dtype,
    with fp8_moe_ref's activation quantization (per token and 1 x block[1] group, per expert for GEMM2)."""
    two_i = d13.shape[1]
    x_deq = nx.fp8_per_token_group_roundtrip(x, block[1])
    gate_up = _gate_up(x_deq, d13, sel, d13_packed).to(x.dtype).view(x.shape[0], -1, two_i)
    act = nx.fp8_per_token_group_roundtrip(silu_and_mul(gate_up[..., : two_i // 2], gate_up[..., two_i // 2 :]), block[1])
    return torch.bmm(act.transpose(0, 1), d2[sel].transpose(1, 2)).to(x.dtype)


def fp8_moe_batched(x, w13, w2, w13_scale, w2_scale, topk_ids, topk_weights, routed_scaling_factor=1.0,
                    expert_offset=0, block=(nx.FP8_BLOCK, nx.FP8_BLOCK), dequantized=None, d13_packed=None):
    d13, d2 = dequantized
    return batched_expert_moe(x, topk_ids, topk_weights, w13.shape[0], expert_offset, routed_scaling_factor,
                              lambda rows, sel: _fp8_experts(rows, d13, d2, sel, block, d13_packed), x.dtype)


def pack_fp8_experts(w13, w2, w13_scale, w2_scale, block) -> dict:
    prepared = dequantize_fp8_experts(w13, w2, w13_scale, w2_scale, block)
    return {**prepared, "d13_packed": pack_all_experts(prepared["dequantized"][0])}


def fp8_linear_cached(x, weight, weight_scale_inv, bias=None, block=(nx.FP8_BLOCK, nx.FP8_BLOCK), out_dtype=torch.bfloat16, weight_dequantized=None):
    return nx.fp8_block_linear_dequantized(x, weight_dequantized, bias, block, out_dtype)


def dequantize_fp8_linear(weight, weight_scale_inv, block) -> dict:
    return {"weight_dequantized": nx.dequantize_fp8_block(weight, weight_scale_inv, block)}


def w4afp8_moe_cached(x, experts: nx.W4AFp8MoEWeights, topk_ids, topk_weights, routed_scaling_factor=1.0,
                      w13_values=None, w2_values=None):
    unpacked = replace(experts, w13=w13_values, w2=w2_values)
    return nx.w4afp8_moe_ref(x, unpacked, topk_ids, topk_weights, routed_scaling_factor)


def unpack_w4afp8_experts(w13, w2, w13_scale, w2_scale) -> dict:
    return {"w13_values": nx.unpack_int4(w13).float(), "w2_values": nx.unpack_int4(w2).float()}


def _w4afp8_experts(x, f13, f2, sel: slice, a1, a2, f13_packed=None) -> torch.Tensor:
    """Experts `sel` (f13 [E, 2I, H], f2 [E, H, I]: int4 values times their bf16 group scales, fp32) on every row
    of x: [n, M, H] bf16. w4afp8_moe_ref's math, except that each GEMM sums over K at once instead of per group."""
    two_i = f13.shape[1]
    xq = nx.quantize_fp8_static(x.to(torch.bfloat16), a1).float()
    gate_up = (a1 * _gate_up(xq, f13, sel, f13_packed)).to(torch.bfloat16).view(x.shape[0], -1, two_i)
    act = torch.nn.functional.silu(gate_up[..., : two_i // 2].float()) * gate_up[..., two_i // 2 :].float()
    yq = nx.quantize_fp8_static(act, a2).float()
    return (a2 * torch.bmm(yq.transpose(0, 1), f2[sel].transpose(1, 2))).to(torch.bfloat16)


def w4afp8_moe_batched(x, experts: nx.W4AFp8MoEWeights, topk_ids, topk_weights, routed_scaling_factor=1.0,
                       w13_dequantized=None, w2_dequantized=None, w13_packed=None):
    a1, a2 = experts.a1.float(), experts.a2.float()
    return batched_expert_moe(
        x, topk_ids, topk_weights, experts.w13.shape[0], experts.expert_offset, routed_scaling_factor,
        lambda rows, sel: _w4afp8_experts(rows, w13_dequantized, w2_dequantized, sel, a1, a2, w13_packed),
        torch.bfloat16,
    )


def dequantize_w4afp8_experts(w13, w2, w13_scale, w2_scale) -> dict:
    return {"w13_dequantized": nx.dequantize_w4_groupwise(w13, w13_scale.to(torch.bfloat16)),
            "w2_dequantized": nx.dequantize_w4_groupwise(w2, w2_scale.to(torch.bfloat16))}


def pack_w4afp8_experts(w13, w2, w13_scale, w2_scale) -> dict:
    prepared = dequantize_w4afp8_experts(w13, w2, w13_scale, w2_scale)
    return {**prepared, "w13_packed": pack_all_experts(prepared["w13_dequantized"])}
