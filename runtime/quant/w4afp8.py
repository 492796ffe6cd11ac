"""SGLang's W4AFP8 MoE (DeepSeek-R1-W4AFP8 format): int4 routed experts with per-group scales and static FP8
activations; every other linear layer stays FP8 block (w4afp8-sglang.md sections 1-3).

Routed-expert tensors: `experts.E.{gate,up,down}_proj.weight` int8 (two signed int4 per byte along K, low nibble
first), `...weight_scale_inv` fp32 [N, K/G], and `experts.E.w{1,2,3}.input_scale` [1] (amax/448). The group
size G is read from the tensors' shapes (128 in SGLang's checkpoints, 64 allowed).
"""

from __future__ import annotations

import torch

from runtime.backends import select_backend
from runtime.errors import CheckpointError
from runtime.loader import EXPERT_NAME
from runtime.quant import numerics as nx
from runtime.quant.base import MoEMethod, QuantConfig, new_param, prepare_backend, replace_param
from runtime.quant.faults import plant_w4afp8_faults
from runtime.quant.fp8 import Fp8BlockLinearMethod


class W4AFp8MoEMethod(MoEMethod):
    def __init__(self, group_size: int, backend: str, batch_invariant: bool = False, prefix: str = ""):
        self.group_size = group_size
        self.backend_name = backend
        self.batch_invariant = batch_invariant
        self.prefix = prefix

    def create_weights(self, layer, num_experts, hidden, intermediate, dtype, device):
        g, e = self.group_size, num_experts
        for what, size in (("hidden_size", hidden), ("moe_intermediate_size per rank", intermediate)):
            if size % g:
                raise CheckpointError(f"w4afp8: {what}={size} is not a multiple of the group size {g}")
        new_param(layer, "w13_weight", (e, 2 * intermediate, hidden // 2), torch.int8, device, output_dim=1, input_dim=2, expected_loads=2 * e)
        new_param(layer, "w2_weight", (e, hidden, intermediate // 2), torch.int8, device, output_dim=1, input_dim=2, expected_loads=e, shard_multiple={2: g // 2})
        new_param(layer, "w13_weight_scale_inv", (e, 2 * intermediate, hidden // g), torch.float32, device, output_dim=1, input_dim=2, expected_loads=2 * e)
        new_param(layer, "w2_weight_scale_inv", (e, hidden, intermediate // g), torch.float32, device, output_dim=1, input_dim=2, expected_loads=e)
        # bf16 like SGLang's parameters, so the checkpoint's fp32 scales are rounded to bf16 on load.
        new_param(layer, "w13_input_scale", (e, 2), torch.bfloat16, device, expected_loads=2 * e, per_expert_scalar=True)
        new_param(layer, "w2_input_scale", (e,), torch.bfloat16, device, expected_loads=e, per_expert_scalar=True)

    def process_weights_after_loading(self, layer):
        for name in ("w13_weight_scale_inv", "w2_weight_scale_inv"):
            replace_param(layer, name, getattr(layer, name).to(torch.bfloat16))
        # One static scale per GEMM: the max over this rank's experts (and over w1/w3), as SGLang.
        replace_param(layer, "w13_input_scale", layer.w13_input_scale.float().max().reshape(1))
        replace_param(layer, "w2_input_scale", layer.w2_input_scale.float().max().reshape(1))
        plant_w4afp8_faults(layer, self.prefix)  # test-only (EVALPIPE_FAULT); does nothing unless set
        self.backend = select_backend("moe.w4afp8", self.backend_name, layer.w13_weight.device, self.batch_invariant)
        names = {"w13": "w13_weight", "w2": "w2_weight", "w13_scale": "w13_weight_scale_inv", "w2_scale": "w2_weight_scale_inv"}
        self.extras = prepare_backend(self.backend, layer, names)

    def apply(self, layer, x, topk_ids, topk_weights, routed_scaling_factor):
        experts = nx.W4AFp8MoEWeights(
            layer.w13_weight, layer.w2_weight, layer.w13_weight_scale_inv, layer.w2_weight_scale_inv,
            layer.w13_input_scale, layer.w2_input_scale, expert_offset=layer.expert_offset,
        )
        out = self.backend.run(x, experts, topk_ids, topk_weights, routed_scaling_factor, **self.extras)
        return out.to(x.dtype)

    def dequantized_expert(self, layer, e):
        return (
            nx.dequantize_w4_groupwise(layer.w13_weight[e], layer.w13_weight_scale_inv[e].to(torch.bfloat16)),
            nx.dequantize_w4_groupwise(layer.w2_weight[e], layer.w2_weight_scale_inv[e].to(torch.bfloat16)),
        )


def infer_group_size(reader) -> int:
    """G from the first routed expert: K (twice the packed bytes) divided by the number of scale columns."""
    for name in reader.names():
        m = EXPERT_NAME.match(name)
        if m and m["suffix"] == "weight":
            scale_name = name + "_scale_inv"
            if scale_name not in reader:
                raise CheckpointError(f"w4afp8 checkpoint: {scale_name} is missing")
            k = 2 * reader.get(name).shape[-1]
            groups = reader.get(scale_name).shape[-1]
            if groups == 0 or k % groups:
                raise CheckpointError(f"w4afp8 checkpoint: {scale_name} has {groups} groups for K={k}")
            return k // groups
    raise CheckpointError(f"{reader.model_dir}: w4afp8 checkpoint without routed-expert weights")


class W4AFp8Config(QuantConfig):
    name = "w4afp8"

    def __init__(self, group_size: int = 128, **options):
        super().__init__(**options)
        self.group_size = group_size
        self.block = (nx.FP8_BLOCK, nx.FP8_BLOCK)  # SGLang hard-codes the FP8 block of the non-expert layers

    @classmethod
    def from_checkpoint(cls, model_dir, hf_config, reader, **options):
        return cls(infer_group_size(reader), **options)

    def linear_method(self, prefix):
        return Fp8BlockLinearMethod(self.block, self.linear_backend, self.batch_invariant)

    def moe_method(self, prefix):
        return W4AFp8MoEMethod(self.group_size, self.moe_backend, self.batch_invariant, prefix)
