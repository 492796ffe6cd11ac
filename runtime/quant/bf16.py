"""Unquantized weights (bf16, or whatever dtype the model runs in)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from runtime.backends import select_backend
from runtime.layers.cpu_dense import Fp32CpuWeight, wants_fp32_compute
from runtime.quant.base import LinearMethod, MoEMethod, QuantConfig, new_param, prepare_backend


class Bf16LinearMethod(LinearMethod):
    """A half-precision weight on CPU is computed in fp32 (runtime.layers.cpu_dense), the output rounded to x.dtype."""

    def create_weights(self, layer, input_size, output_size, dtype, device):
        new_param(layer, "weight", (output_size, input_size), dtype, device, output_dim=0, input_dim=1)
        layer.fp32_weight = None

    def process_weights_after_loading(self, layer):
        layer.fp32_weight = Fp32CpuWeight(layer.weight) if wants_fp32_compute(layer.weight) else None

    def apply(self, layer, x, bias=None):
        if layer.fp32_weight is not None:
            return layer.fp32_weight.linear(x, bias).to(x.dtype)
        return F.linear(x, layer.weight, bias)

    def dequantized_weight(self, layer):
        return layer.weight.float()


class Bf16MoEMethod(MoEMethod):
    def __init__(self, backend: str, batch_invariant: bool = False):
        self.backend_name = backend
        self.batch_invariant = batch_invariant

    def create_weights(self, layer, num_experts, hidden, intermediate, dtype, device):
        new_param(layer, "w13_weight", (num_experts, 2 * intermediate, hidden), dtype, device, output_dim=1, input_dim=2, expected_loads=2 * num_experts)
        new_param(layer, "w2_weight", (num_experts, hidden, intermediate), dtype, device, output_dim=1, input_dim=2, expected_loads=num_experts)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.backend = select_backend("moe.bf16", self.backend_name, layer.w13_weight.device, self.batch_invariant)
        prepare_backend(self.backend, layer, {"w13": "w13_weight", "w2": "w2_weight"})

    def apply(self, layer, x, topk_ids, topk_weights, routed_scaling_factor):
        return self.backend.run(
            x, layer.w13_weight, layer.w2_weight, topk_ids, topk_weights,
            routed_scaling_factor=routed_scaling_factor, expert_offset=layer.expert_offset,
        )

    def dequantized_expert(self, layer, e):
        return layer.w13_weight[e].float(), layer.w2_weight[e].float()


class Bf16Config(QuantConfig):
    name = "bf16"

    @classmethod
    def from_checkpoint(cls, model_dir, hf_config, reader, **options):
        return cls(**options)

    def linear_method(self, prefix):
        return Bf16LinearMethod()

    def moe_method(self, prefix):
        return Bf16MoEMethod(self.moe_backend, self.batch_invariant)
