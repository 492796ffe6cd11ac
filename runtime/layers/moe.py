"""Routed experts of one layer (FusedMoE: stacked per-rank expert weights) and the routers that pick them."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from runtime.loader import CheckpointTensor, copy_into
from runtime.parallel import ParallelContext
from runtime.quant.base import QuantConfig, new_param


class FusedMoE(nn.Module):
    """This rank's routed experts; forward returns the rank's partial output (the caller all-reduces).

    TP layout: all experts, intermediate rows [r*I/tp, (r+1)*I/tp) of gate/up and the same columns of down.
    EP layout: experts [r*E/ep, (r+1)*E/ep), whole; tokens routed elsewhere contribute nothing here.
    """

    def __init__(
        self, num_experts: int, hidden: int, intermediate: int, *, quant: QuantConfig, prefix: str,
        parallel: ParallelContext, dtype: torch.dtype, device: torch.device,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.expert_offset, self.num_local, inter_local, self.tp_index = parallel.moe_layout(num_experts, intermediate)
        self.tp_count = parallel.world_size if parallel.moe_parallel == "tp" else 1
        self.quant_method = quant.moe_method(prefix)
        self.quant_method.create_weights(self, self.num_local, hidden, inter_local, dtype, device)
        # Calibration hook: called with (layer, x, topk_ids) before the experts run.
        self.observer: Callable[[nn.Module, torch.Tensor, torch.Tensor], None] | None = None

    def load_expert(self, suffix: str, src: CheckpointTensor, expert_id: int, shard: str) -> None:
        """Load checkpoint tensor `experts.<expert_id>.<shard>.<suffix>`; other ranks' experts are not read."""
        e = expert_id - self.expert_offset
        if not 0 <= expert_id < self.num_experts:
            raise KeyError(src.name)
        if not 0 <= e < self.num_local:
            return
        param = self._parameters[("w2_" if shard == "w2" else "w13_") + suffix]
        if param.per_expert_scalar:
            dst = param.data[e] if shard == "w2" else param.data[e, 0 if shard == "w1" else 1]
            copy_into(param, dst, src.read(), src.name)
            return
        if shard == "w2":
            dim, dst = param.input_dim, param.data[e]
        else:
            dim, half = param.output_dim, param.shape[param.output_dim] // 2
            dst = param.data[e, :half] if shard == "w1" else param.data[e, half:]
        tensor = src.read_shard(dim - 1, self.tp_index, self.tp_count, param.shard_multiple.get(dim, 1))
        copy_into(param, dst, tensor, src.name)

    def unloaded_expert_scalars(self) -> list[str]:
        """`<expert>.<w1|w3|w2>.<suffix>` of this rank's per-expert scalars the checkpoint did not provide."""
        out = []
        for name, param in self._parameters.items():
            if getattr(param, "per_expert_scalar", False):
                shards, suffix = (("w1", "w3") if name.startswith("w13_") else ("w2",)), name.split("_", 1)[1]
                for e, slot in param.data.view(param.shape[0], -1).isnan().nonzero().tolist():
                    out.append(f"{self.expert_offset + e}.{shards[slot]}.{suffix}")
        return out

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, routed_scaling_factor: float = 1.0) -> torch.Tensor:
        if self.observer is not None:
            self.observer(self, x, topk_ids)
        return self.quant_method.apply(self, x, topk_ids, topk_weights, routed_scaling_factor)


# SGLang's DeepSeek gate (MoEGate in models/deepseek_v2.py) switches to dsv3_router_gemm, bf16 inputs with an
# fp32 output, for at most this many tokens at these (experts, hidden) shapes on Hopper; otherwise F.linear in the
# model dtype (bf16 logits). Deterministic inference skips that kernel.
DSV3_ROUTER_GEMM_MAX_TOKENS = 16
DSV3_ROUTER_GEMM_SHAPES = {(256, 7168), (384, 7168)}


class Router(nn.Module):
    """Router logits x W^T (weight [E, H], replicated), plus DeepSeek's e_score_correction_bias, in the precision
    SGLang's routers produce them, so that near-ties route the same way: the weight rounded to the model dtype,
    fp32 accumulation, logits rounded to the model dtype, except with `dsv3_router_gemm` for batches of at most
    16 tokens at DeepSeek-V3/R1 shapes (fp32 logits). That is SGLang on Hopper, the only GPUs it runs W4AFP8
    on; the rule is applied on every device. The routing that follows upcasts to fp32, as SGLang's does.
    """

    def __init__(self, num_experts: int, hidden: int, dtype: torch.dtype, device: torch.device,
                 correction_bias: bool = False, dsv3_router_gemm: bool = False):
        super().__init__()
        self.dtype = dtype
        new_param(self, "weight", (num_experts, hidden), torch.float32, device)
        if correction_bias:
            new_param(self, "e_score_correction_bias", (num_experts,), torch.float32, device)
        use_fp32 = dsv3_router_gemm and (num_experts, hidden) in DSV3_ROUTER_GEMM_SHAPES
        self.fp32_max_tokens = DSV3_ROUTER_GEMM_MAX_TOKENS if use_fp32 else 0

    def after_loading(self) -> None:
        # SGLang's router weight is a model-dtype parameter: an fp32 checkpoint weight is rounded on load.
        self.weight.data = self.weight.data.to(self.dtype).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.weight)
        return logits if x.shape[0] <= self.fp32_max_tokens else logits.to(self.dtype)


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen routing: (fp32 weights [T, k], expert ids [T, k]) from softmax probabilities."""
    weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_sigmoid_topk(
    logits: torch.Tensor, correction_bias: torch.Tensor, k: int, n_group: int, topk_group: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing (noaux_tc): sigmoid scores; the bias only steers the choice of groups and experts.

    Groups are ranked by the sum of their two best biased scores; the top `topk_group` groups stay eligible and
    the top-k biased scores among them are picked; the weights are the unbiased scores, optionally renormalised
    (the routed scaling factor is applied later, in the combine).
    """
    scores = logits.float().sigmoid()
    choice = scores + correction_bias
    t, e = choice.shape
    group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(dim=-1)
    groups = group_scores.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
    expert_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    ids = choice.masked_fill(~expert_mask, float("-inf")).topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, ids
