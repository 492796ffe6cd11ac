"""Unquantized weights (bf16, or whatever dtype the model runs in)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from runtime.backends import select_backend
from runtime.layers.cpu_dense import CpuDenseWeight, wants_fp32_compute
from runtime.quant.base import LinearMethod, MoEMethod, QuantConfig, new_param, prepare_backend


class Bf16LinearMethod(LinearMethod):
    """A half-precision weight on CPU computes from the copies runtime.layers.cpu_dense prepares (the oneDNN-packed
    ones unless the model must be batch-invariant), or, with `cpu_copies=False` (linear_backend "torch"), as
    stored."""

    def __init__(self, batch_invariant: bool = False, cpu_copies: bool = True):
        self.batch_invariant = batch_invariant
        self.cpu_copies = cpu_copies

    def create_weights(self, layer, input_size, output_size, dtype, device):
        new_param(layer, "weight", (output_size, input_size), dtype, device, output_dim=0, input_dim=1)
        layer.cpu_weight = None

    def process_weights_after_loading(self, layer):
        if self.cpu_copies and wants_fp32_compute(layer.weight):
            layer.cpu_weight = CpuDenseWeight(layer.weight, fast=not self.batch_invariant, half_for_one_row=True)

    def apply(self, layer, x, bias=None):
        if layer.cpu_weight is not None:
            return layer.cpu_weight.linear(x, bias)
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
        self.extras = prepare_backend(self.backend, layer, {"w13": "w13_weight", "w2": "w2_weight"})

    def apply(self, layer, x, topk_ids, topk_weights, routed_scaling_factor):
        return self.backend.run(
            x, layer.w13_weight, layer.w2_weight, topk_ids, topk_weights,
            routed_scaling_factor=routed_scaling_factor, expert_offset=layer.expert_offset, **self.extras,
        )

    def dequantized_expert(self, layer, e):
        return layer.w13_weight[e].float(), layer.w2_weight[e].float()


class Bf16Config(QuantConfig):
    name = "bf16"

    @classmethod
    def from_checkpoint(cls, model_dir, hf_config, reader, **options):
        return cls(**options)

    def linear_method(self, prefix):
        return Bf16LinearMethod(self.batch_invariant, cpu_copies=self.linear_backend != "torch")

    def moe_method(self, prefix):
        return Bf16MoEMethod(self.moe_backend, self.batch_invariant)
