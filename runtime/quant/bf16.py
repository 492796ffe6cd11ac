"""Unquantized weights (bf16, or whatever dtype the model runs in)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.backends import register_backend, select_backend
from runtime.quant.base import (
    LinearMethod,
    MoEMethod,
    QuantConfig,
    batched_expert_moe,
    new_param,
    register_quantization,
    routed_tokens,
    silu_and_mul,
)


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


register_backend("moe.bf16", "torch", bf16_moe_ref, batch_invariant=True)
register_backend("moe.bf16", "batched", bf16_moe_batched, priority=20, batch_invariant=True)


class Bf16LinearMethod(LinearMethod):
    def create_weights(self, layer, input_size, output_size, dtype, device):
        new_param(layer, "weight", (output_size, input_size), dtype, device, output_dim=0, input_dim=1)

    def apply(self, layer, x, bias=None):
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

    def apply(self, layer, x, topk_ids, topk_weights, routed_scaling_factor):
        return self.backend.run(
            x, layer.w13_weight, layer.w2_weight, topk_ids, topk_weights,
            routed_scaling_factor=routed_scaling_factor, expert_offset=layer.expert_offset,
        )

    def dequantized_expert(self, layer, e):
        return layer.w13_weight[e].float(), layer.w2_weight[e].float()


@register_quantization
class Bf16Config(QuantConfig):
    name = "bf16"

    @classmethod
    def from_checkpoint(cls, model_dir, hf_config, reader, **options):
        return cls(**options)

    def linear_method(self, prefix):
        return Bf16LinearMethod()

    def moe_method(self, prefix):
        return Bf16MoEMethod(self.moe_backend, self.batch_invariant)
