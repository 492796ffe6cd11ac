"""MoE layer shapes the kernels are checked and benchmarked at, and synthetic W4AFP8 layers of those shapes.

Values are random but scaled like a real layer: GEMM outputs of order 1, so the rtol 1e-2 / atol 0.1
tolerance of the kernel tests is meaningful, and x's static scale puts the largest activation at +-448.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.kernels.moe_api import PreparedExperts
from runtime.quant.numerics import W4AFp8MoEWeights


@dataclass(frozen=True)
class MoEShape:
    name: str
    n_experts: int  # experts held by this rank
    total_experts: int  # experts the router chooses from (EP: the other ranks hold the rest)
    topk: int
    hidden: int
    inter: int  # intermediate size per rank
    group: int
    expert_offset: int = 0


SHAPES = {
    "r1_tp8": MoEShape("r1_tp8", 256, 256, 8, 7168, 256, 128),
    "r1_ep8": MoEShape("r1_ep8", 32, 256, 8, 7168, 2048, 128, expert_offset=32),
    "demo": MoEShape("demo", 8, 8, 8, 576, 192, 64),
}
TOKEN_COUNTS = (1, 2, 4, 8, 16, 64, 128, 256, 1024, 4096)
ROUTINGS = ("uniform", "skewed")


@dataclass
class SyntheticMoE:
    x: torch.Tensor
    experts: PreparedExperts  # checkpoint layout (int8 packed int4, fp32 group scales)
    a1: torch.Tensor
    a2: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor

    def weights(self, prepared: PreparedExperts | None = None, expert_offset: int = 0) -> W4AFp8MoEWeights:
        """The backend contract's experts: these in checkpoint layout (the reference), or `prepared` by a backend."""
        return W4AFp8MoEWeights(*(prepared if prepared is not None else self.experts), self.a1, self.a2, expert_offset)


def random_experts(shape: MoEShape, device: torch.device | str, generator: torch.Generator | None = None) -> PreparedExperts:
    """Random int4 weights (every byte is a valid pair of int4) and group scales giving unit-scale GEMM outputs."""
    e, h, i, g = shape.n_experts, shape.hidden, shape.inter, shape.group

    def weights(n: int, k: int) -> torch.Tensor:
        return torch.randint(-128, 128, (e, n, k // 2), dtype=torch.int8, device=device, generator=generator)

    def scales(n: int, k: int) -> torch.Tensor:
        # int4 uniform on -8..7 has std ~4.6; a K-long dot of unit inputs then has std 4.6 * sqrt(K) * scale.
        u = torch.rand(e, n, k // g, device=device, generator=generator)
        return (0.5 + u) / (4.6 * k**0.5)

    return PreparedExperts(weights(2 * i, h), weights(h, i), scales(2 * i, h), scales(h, i))


def route_tokens(m: int, shape: MoEShape, routing: str, device: torch.device | str, generator: torch.Generator | None = None):
    """(topk_ids int32 [m, topk] over all experts, topk_weights fp32 renormalised). "skewed" favours a few experts."""
    scores = torch.rand(m, shape.total_experts, device=device, generator=generator)
    if routing == "skewed":
        scores = scores * (1.0 + torch.arange(shape.total_experts, device=device)).pow(-1.5)
    elif routing != "uniform":
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    weights, ids = torch.topk(scores, shape.topk, dim=-1)
    return ids.to(torch.int32), (weights / weights.sum(-1, keepdim=True)).float()


def synthetic_moe(shape: MoEShape, m: int, routing: str, device: torch.device | str, seed: int = 0,
                  experts: PreparedExperts | None = None, x_scale: float = 1.0) -> SyntheticMoE:
    """A full set of MoE-call inputs. `x_scale` > 1 drives x past the static scale (saturation tests)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    experts = experts if experts is not None else random_experts(shape, device, gen)
    x = torch.randn(m, shape.hidden, device=device, generator=gen).to(torch.bfloat16)
    a1 = (x.float().abs().amax().clamp_min(1e-4) / 448.0 / x_scale).to(torch.bfloat16).float().reshape(1)
    # SwiGLU of unit-scale inputs stays within about +-10.
    a2 = torch.tensor([10.0 / 448.0], device=device).to(torch.bfloat16).float()
    ids, weights = route_tokens(m, shape, routing, device, gen)
    return SyntheticMoE(x, experts, a1, a2, ids, weights)
