"""What the fast W4AFP8 MoE backends share: the prepared-weights tuple and the tiling arithmetic.

A backend object is called exactly like runtime.quant.numerics.w4afp8_moe_ref (the contract is
numerics.W4AFp8MoEWeights), except that the four weight tensors are the ones its `prepare` returned (once per
layer after loading; layouts differ per backend):

    prepared = backend.prepare(w13, w2, w13_scale, w2_scale)       # checkpoint layout in, backend layout out
    out = backend(x, W4AFp8MoEWeights(*prepared, a1, a2, expert_offset), topk_ids, topk_weights, routed_scaling_factor)

runtime.kernels registers them with runtime.backends ("moe.w4afp8": "cutlass", "triton").
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class PreparedExperts(NamedTuple):
    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor
    w2_scale: torch.Tensor


TOKEN_TILES = (8, 16, 32, 64, 128)


def tokens_per_tile(pairs: int, n_experts: int, tiles: tuple[int, ...] = TOKEN_TILES) -> int:
    """Token tile for the grouped GEMMs: the smallest that holds the mean tokens per expert (decode: 8).

    Larger tiles convert each int4 weight once for more tokens, which is what bounds the compute-bound regime."""
    mean = pairs / max(n_experts, 1)
    return next((t for t in tiles if mean <= t), tiles[-1])


def max_token_tiles(pairs: int, n_experts: int, tile: int) -> int:
    """Upper bound of sum_e ceil(count_e / tile) over any routing: sizes grids without reading counts back."""
    return pairs // tile + min(pairs, n_experts)


def device_scalar(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A one-element fp32 tensor on `device` (no copy when it already is one)."""
    return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(1)


def check_moe_inputs(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, hidden: int) -> None:
    """Shape checks shared by the backends; messages name the argument."""
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"x must be [M, {hidden}], got {tuple(x.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be [M, topk] with M={x.shape[0]}")
