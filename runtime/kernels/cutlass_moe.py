"""`--moe-backend cutlass`: the W4AFP8 routed-expert MoE on the SM90 kernels of csrc/w4afp8.

Four launches per call: routing + static fp8 quantization of x (one kernel), the gate/up grouped GEMM with the
SwiGLU + fp8 requantization fused into its epilogue (activations gathered by token, no permuted copy of x), the
down grouped GEMM, and the top-k combine. Grids are sized from upper bounds, so nothing is read back to the
host and a call can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from runtime.kernels import build
from runtime.kernels.moe_api import (
    TOKEN_TILES,
    PreparedExperts,
    check_moe_inputs,
    device_scalar,
    max_token_tiles,
    tokens_per_tile,
)
from runtime.kernels.wgmma_layout import TILE_ROWS, pack_wgmma_a_operand, prepare_scales, swiglu_row_order
from runtime.quant.numerics import FP8_DTYPE, W4AFp8MoEWeights

# CTAs per SM the work split aims for (split-K below it): enough weight streams in flight per SM. Measured on
# H100 (results/kernels): 8 is best from 2 to 16 tokens and neutral above. A single token did better at 2 on the
# H100 at R1 TP8 shapes; on the H200 (2026-12-03) 8 is as good there (32.1 against 33.8 us) and much better with
# 2048-wide experts (the batch-1 decode step's MoE GEMMs of results/serving/nvidia-h200.md: 0.35 against 0.49 ms).
CTAS_PER_SM = 8
# Pipeline stages (scale groups) a CTA should run through before it is worth launching it.
MIN_GROUPS_PER_CTA = 8


@dataclass(frozen=True)
class GemmPlan:
    n_per_cta: int  # 64-row weight tiles per CTA
    splits: int  # split-K factor (partials summed in a fixed order by the last CTA)


def plan_gemm(n: int, k: int, group: int, token_tiles: int, sm_count: int, ctas_per_sm: int = CTAS_PER_SM,
              groups_per_stage: int = 1, min_groups_per_cta: int = MIN_GROUPS_PER_CTA) -> GemmPlan:
    """Work split for one grouped GEMM: long K per CTA for short-K GEMMs, split K when CTAs are too few.

    The kernel consumes `groups_per_stage` scale groups per pipeline stage; splits cover whole stages.
    """
    n_tiles, groups = n // TILE_ROWS, k // group
    stages = math.ceil(groups / groups_per_stage)
    target = ctas_per_sm * sm_count
    n_per_cta = 1
    while (
        2 * n_per_cta <= n_tiles
        and groups * n_per_cta < min_groups_per_cta
        and token_tiles * math.ceil(n_tiles / (2 * n_per_cta)) >= target
    ):
        n_per_cta *= 2
    ctas = token_tiles * math.ceil(n_tiles / n_per_cta)
    splits = 1
    if ctas < target and stages > 1:
        splits = min(stages, math.ceil(target / ctas))
        splits = math.ceil(stages / math.ceil(stages / splits))  # every split gets at least one stage
    return GemmPlan(n_per_cta, splits)


class _Scratch:
    """Split-K workspace and arrival counters, kept per device (counters must start at zero; kernels re-zero them).

    Buffers outgrown by a larger call are kept, not freed: a CUDA graph captured earlier still uses them.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._outgrown: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(self, device: torch.device, floats: int, ints: int) -> tuple[torch.Tensor, torch.Tensor]:
        ws, counters = self._buffers.get(device, (None, None))
        if ws is None or ws.numel() < floats or counters.numel() < ints:
            if ws is not None:
                self._outgrown.append((ws, counters))
            ws = torch.empty(max(floats, 4), dtype=torch.float32, device=device)
            counters = torch.zeros(max(ints, 1), dtype=torch.int32, device=device)
            self._buffers[device] = (ws, counters)
        return ws, counters


class CutlassW4AFp8MoE:
    """A moe.w4afp8 backend (numerics.W4AFp8MoEWeights) on `prepare`d weights."""

    name = "cutlass"

    def __init__(self, ctas_per_sm: int | None = None, token_tiles: tuple[int, ...] = TOKEN_TILES, pdl: bool = True,
                 groups_per_stage: int = 2, min_groups_per_cta: int = MIN_GROUPS_PER_CTA) -> None:
        self.ctas_per_sm = ctas_per_sm  # None: CTAS_PER_SM
        self.min_groups_per_cta = min_groups_per_cta
        self.token_tiles = token_tiles
        # Programmatic dependent launch: each kernel starts while the previous one drains (the down GEMM
        # prefetches its weights meanwhile). Off: plain stream order.
        self.pdl = pdl
        # Scale groups per pipeline stage for small token tiles (the kernel uses 1 where it has no 2).
        self.groups_per_stage = groups_per_stage
        self._scratch = _Scratch()

    def prepare(self, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor) -> PreparedExperts:
        """Checkpoint layout -> kernel layout: w13 rows paired gate/up per thread, int4 in wgmma register order,
        scales rounded to bf16 with groups outermost."""
        inter = w13.shape[1] // 2
        order = swiglu_row_order(inter, device=w13.device)
        return PreparedExperts(
            w13=pack_wgmma_a_operand(w13[:, order]),
            w2=pack_wgmma_a_operand(w2),
            w13_scale=prepare_scales(w13_scale[:, order]),
            w2_scale=prepare_scales(w2_scale),
        )

    def __call__(self, x: torch.Tensor, experts: W4AFp8MoEWeights, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 routed_scaling_factor: float = 1.0) -> torch.Tensor:
        w13, w2, w13_scale, w2_scale = experts.w13, experts.w2, experts.w13_scale, experts.w2_scale
        if w13.dim() != 5:
            raise ValueError("cutlass backend: weights are in checkpoint layout; pass them through prepare() first")
        ext = build.load_extension()
        n_experts, hidden = w13.shape[0], w13.shape[2] * 64
        inter = w2.shape[2] * 64
        check_moe_inputs(x, topk_ids, topk_weights, hidden)
        m, topk = topk_ids.shape
        dev = x.device
        out = torch.empty(m, hidden, dtype=torch.bfloat16, device=dev)
        if m == 0:
            return out
        pairs = m * topk
        tile = tokens_per_tile(pairs, n_experts, self.token_tiles)
        max_tiles = max_token_tiles(pairs, n_experts, tile)
        a1t, a2t = device_scalar(experts.a1, dev), device_scalar(experts.a2, dev)

        xq = torch.empty(m, hidden, dtype=FP8_DTYPE, device=dev)
        expert_offsets = torch.empty(n_experts + 1, dtype=torch.int32, device=dev)
        row_token = torch.empty(pairs, dtype=torch.int32, device=dev)
        src2dst = torch.empty(pairs, dtype=torch.int32, device=dev)
        tiles = torch.empty(max_tiles, 3, dtype=torch.int32, device=dev)
        num_tiles = torch.empty(1, dtype=torch.int32, device=dev)
        ext.route_and_quantize(
            x.to(torch.bfloat16).contiguous(), topk_ids.contiguous(), a1t, n_experts, experts.expert_offset, tile,
            xq, expert_offsets, row_token, src2dst, tiles, num_tiles,
        )

        sm_count = torch.cuda.get_device_properties(dev).multi_processor_count
        group1 = hidden // w13_scale.shape[1]
        group2 = inter // w2_scale.shape[1]
        ctas_per_sm = self.ctas_per_sm or CTAS_PER_SM
        stage1 = ext.groups_per_stage(group1, tile, self.groups_per_stage)
        stage2 = ext.groups_per_stage(group2, tile, self.groups_per_stage)
        plan1 = plan_gemm(2 * inter, hidden, group1, max_tiles, sm_count, ctas_per_sm, stage1, self.min_groups_per_cta)
        plan2 = plan_gemm(hidden, inter, group2, max_tiles, sm_count, ctas_per_sm, stage2, self.min_groups_per_cta)
        ws_floats = max(ext.workspace_floats(max_tiles, n, tile, p.splits) if p.splits > 1 else 0
                        for n, p in ((2 * inter, plan1), (hidden, plan2)))
        counter_ints = max_tiles * max(2 * inter, hidden) // TILE_ROWS
        workspace, counters = self._scratch.get(dev, ws_floats, counter_ints)

        y = torch.empty(pairs, inter, dtype=FP8_DTYPE, device=dev)
        ext.grouped_gemm(xq, row_token, w13, w13_scale, a1t, a2t, tiles, num_tiles, y, workspace, counters,
                         group1, tile, plan1.n_per_cta, plan1.splits, stage1, self.pdl, False)
        z = torch.empty(pairs, hidden, dtype=torch.bfloat16, device=dev)
        ext.grouped_gemm(y, None, w2, w2_scale, a2t, None, tiles, num_tiles, z, workspace, counters,
                         group2, tile, plan2.n_per_cta, plan2.splits, stage2, self.pdl, True)
        ext.combine(z, src2dst, topk_weights.float().contiguous(), float(routed_scaling_factor), out, self.pdl)
        return out
