"""DeepSeek's FP8 block format: e4m3 weights with fp32 `weight_scale_inv` per [128, 128] block, activations
quantized dynamically per 1 x 128 group (quant_method "fp8" with weight_block_size in config.json)."""

from __future__ import annotations

import torch

from runtime.backends import on_cpu, register_backend, select_backend
from runtime.errors import CheckpointError
from runtime.quant import numerics as nx
from runtime.quant.base import (
    LinearMethod,
    MoEMethod,
    QuantConfig,
    new_param,
    batched_expert_moe,
    prepare_backend,
    register_quantization,
    routed_tokens,
    silu_and_mul,
)
from runtime.quant.bf16 import Bf16LinearMethod


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


def _dequantize_all_experts(w13, w2, w13_scale, w2_scale, block) -> dict:
    pairs = [dequantize_fp8_expert(w13[e], w13_scale[e], w2[e], w2_scale[e], block) for e in range(w13.shape[0])]
    return {"dequantized": (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))}


def _fp8_experts(x: torch.Tensor, d13: torch.Tensor, d2: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Every dequantized FP8 expert (d13 [E, 2I, H], d2 [E, H, I] fp32) on every row of x: [E, M, H] in x.dtype,
    with fp8_moe_ref's activation quantization (per token and 1 x block[1] group, per expert for GEMM2)."""
    e, two_i, h = d13.shape
    gate_up = nx.fp8_block_linear_dequantized(x, d13.reshape(e * two_i, h), block=block, out_dtype=x.dtype)
    gate_up = gate_up.view(-1, e, two_i)
    act = nx.fp8_per_token_group_roundtrip(silu_and_mul(gate_up[..., : two_i // 2], gate_up[..., two_i // 2 :]), block[1])
    return torch.bmm(act.transpose(0, 1), d2.transpose(1, 2)).to(x.dtype)


def _fp8_moe_batched(x, w13, w2, w13_scale, w2_scale, topk_ids, topk_weights, routed_scaling_factor=1.0,
                     expert_offset=0, block=(nx.FP8_BLOCK, nx.FP8_BLOCK), dequantized=None):
    d13, d2 = dequantized
    return batched_expert_moe(x, topk_ids, topk_weights, w13.shape[0], expert_offset, routed_scaling_factor,
                              lambda rows, sel: _fp8_experts(rows, d13[sel], d2[sel], block), x.dtype)


def _fp8_linear_cached(x, weight, weight_scale_inv, bias=None, block=(nx.FP8_BLOCK, nx.FP8_BLOCK), out_dtype=torch.bfloat16, weight_dequantized=None):
    return nx.fp8_block_linear_dequantized(x, weight_dequantized, bias, block, out_dtype)


register_backend("moe.fp8", "torch", fp8_moe_ref, batch_invariant=True)
register_backend("linear.fp8_block", "torch", nx.fp8_block_linear_ref, batch_invariant=True)
# The reference math on weights dequantized once at load (fp32 copies: 4 more bytes per weight), same results.
register_backend("moe.fp8", "cached", fp8_moe_ref, prepare=_dequantize_all_experts, available=on_cpu, priority=10,
                 batch_invariant=True)
# Same weights, experts batched (runtime.quant.base.batched_expert_moe); equal to the reference up to fp32 order.
register_backend("moe.fp8", "batched", _fp8_moe_batched, prepare=_dequantize_all_experts, available=on_cpu,
                 priority=20, batch_invariant=True)
register_backend(
    "linear.fp8_block", "cached", _fp8_linear_cached, available=on_cpu, priority=10, batch_invariant=True,
    prepare=lambda weight, weight_scale_inv, block: {"weight_dequantized": nx.dequantize_fp8_block(weight, weight_scale_inv, block)},
)


def _blocks(n: int, b: int) -> int:
    return -(-n // b)


class Fp8BlockLinearMethod(LinearMethod):
    def __init__(self, block: tuple[int, int], backend: str, batch_invariant: bool = False):
        self.block = block
        self.backend_name = backend
        self.batch_invariant = batch_invariant

    def create_weights(self, layer, input_size, output_size, dtype, device):
        bn, bk = self.block
        new_param(layer, "weight", (output_size, input_size), nx.FP8_DTYPE, device, output_dim=0, input_dim=1, shard_multiple={0: bn, 1: bk})
        new_param(layer, "weight_scale_inv", (_blocks(output_size, bn), _blocks(input_size, bk)), torch.float32, device, output_dim=0, input_dim=1)

    def process_weights_after_loading(self, layer):
        self.backend = select_backend("linear.fp8_block", self.backend_name, layer.weight.device, self.batch_invariant)
        self.extras = prepare_backend(self.backend, layer, {"weight": "weight", "weight_scale_inv": "weight_scale_inv"}, block=self.block)

    def apply(self, layer, x, bias=None):
        return self.backend.run(x, layer.weight, layer.weight_scale_inv, bias, block=self.block, out_dtype=x.dtype, **self.extras)

    def dequantized_weight(self, layer):
        return nx.dequantize_fp8_block(layer.weight, layer.weight_scale_inv, self.block)


class Fp8MoEMethod(MoEMethod):
    """w13_weight_scale_inv holds ceil(I/bn) rows of gate blocks then as many of up blocks (I need not be a block multiple)."""

    def __init__(self, block: tuple[int, int], backend: str, batch_invariant: bool = False):
        self.block = block
        self.backend_name = backend
        self.batch_invariant = batch_invariant

    def create_weights(self, layer, num_experts, hidden, intermediate, dtype, device):
        bn, bk = self.block
        e = num_experts
        new_param(layer, "w13_weight", (e, 2 * intermediate, hidden), nx.FP8_DTYPE, device, output_dim=1, input_dim=2, expected_loads=2 * e, shard_multiple={1: bn})
        new_param(layer, "w2_weight", (e, hidden, intermediate), nx.FP8_DTYPE, device, output_dim=1, input_dim=2, expected_loads=e, shard_multiple={2: bk})
        new_param(layer, "w13_weight_scale_inv", (e, 2 * _blocks(intermediate, bn), _blocks(hidden, bk)), torch.float32, device, output_dim=1, input_dim=2, expected_loads=2 * e)
        new_param(layer, "w2_weight_scale_inv", (e, _blocks(hidden, bn), _blocks(intermediate, bk)), torch.float32, device, output_dim=1, input_dim=2, expected_loads=e)

    def process_weights_after_loading(self, layer):
        self.backend = select_backend("moe.fp8", self.backend_name, layer.w13_weight.device, self.batch_invariant)
        names = {"w13": "w13_weight", "w2": "w2_weight", "w13_scale": "w13_weight_scale_inv", "w2_scale": "w2_weight_scale_inv"}
        self.extras = prepare_backend(self.backend, layer, names, block=self.block)

    def apply(self, layer, x, topk_ids, topk_weights, routed_scaling_factor):
        return self.backend.run(
            x, layer.w13_weight, layer.w2_weight, layer.w13_weight_scale_inv, layer.w2_weight_scale_inv, topk_ids, topk_weights,
            routed_scaling_factor=routed_scaling_factor, expert_offset=layer.expert_offset, block=self.block, **self.extras,
        )

    def dequantized_expert(self, layer, e):
        return dequantize_fp8_expert(layer.w13_weight[e], layer.w13_weight_scale_inv[e], layer.w2_weight[e], layer.w2_weight_scale_inv[e], self.block)


def _block_from_config(qc: dict) -> tuple[int, int]:
    block = qc.get("weight_block_size")
    if block is None:
        raise CheckpointError("config.json: quantization_config.weight_block_size is missing (only block-wise FP8 is supported)")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"config.json: quantization_config.weight_block_size must be two positive integers, got {block!r}")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError("config.json: quantization_config.activation_scheme must be 'dynamic' for block FP8")
    return block[0], block[1]


@register_quantization
class Fp8Config(QuantConfig):
    name = "fp8"

    def __init__(self, block=(nx.FP8_BLOCK, nx.FP8_BLOCK), ignored_layers=(), **options):
        super().__init__(**options)
        self.block = tuple(block)
        self.ignored_layers = tuple(ignored_layers)

    @classmethod
    def from_checkpoint(cls, model_dir, hf_config, reader, **options):
        qc = hf_config["quantization_config"]
        ignored = qc.get("ignored_layers") or qc.get("modules_to_not_convert") or []
        return cls(_block_from_config(qc), ignored, **options)

    def linear_method(self, prefix):
        if any(prefix == p or prefix.startswith(p + ".") for p in self.ignored_layers):
            return Bf16LinearMethod()
        return Fp8BlockLinearMethod(self.block, self.linear_backend, self.batch_invariant)

    def moe_method(self, prefix):
        return Fp8MoEMethod(self.block, self.moe_backend, self.batch_invariant)
