"""DeepSeek-V3 routing (layers/moe.grouped_sigmoid_topk) in one Triton kernel, one program per token.

The torch expression is about fifteen kernels (sigmoid, bias add, two top-k, sum, scatter, mask, gather,
renormalise); a batch-1 decode step of the R1-width model runs it in every MoE layer, where the launches cost
more than the arithmetic. Same operations in fp32: sigmoid as 1 / (1 + exp(-x)) with an IEEE division (torch's
CUDA sigmoid), groups ranked by the sum of their two best biased scores, experts picked in descending order of
biased score from the best `topk_group` groups, weights the unbiased scores. Ties go to the lower index (torch
leaves the order of equal values unspecified); the renormalising sum may differ from torch's in the last bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels.triton_casts import INTERPRETED, accurate_exp


@triton.jit
def _first_max(v, idx, BIG: tl.constexpr):
    """(max, lowest flat index holding it) of a 2-D block."""
    best = tl.max(tl.max(v, axis=1), axis=0)
    return best, tl.min(tl.min(tl.where(v == best, idx, BIG), axis=1), axis=0)


@triton.jit
def _grouped_sigmoid_topk_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, logits_stride,
    N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr,
    K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr, INTERPRET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    E: tl.constexpr = N_GROUP * GROUP_SIZE
    g = tl.arange(0, N_GROUP)
    idx = g[:, None] * GROUP_SIZE + tl.arange(0, GROUP_SIZE)[None, :]  # [groups, experts per group]
    x = tl.load(logits_ptr + row * logits_stride + idx).to(tl.float32)
    e = accurate_exp(-x, INTERPRET)
    scores = tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + e)
    choice = scores + tl.load(bias_ptr + idx)
    # Group score: its best biased score plus its second best (the best's position taken out, so a repeated
    # maximum counts twice, as torch.topk(2) does).
    best = tl.max(choice, axis=1)
    best_at = tl.min(tl.where(choice == best[:, None], idx, E), axis=1)
    second = tl.max(tl.where(idx == best_at[:, None], float("-inf"), choice), axis=1)
    group_score = best + second
    eligible = tl.zeros((N_GROUP,), dtype=tl.int1)
    for _ in tl.static_range(TOPK_GROUP):
        s = tl.where(eligible, float("-inf"), group_score)
        top = tl.max(s, axis=0)
        pick = tl.min(tl.where(s == top, g, N_GROUP), axis=0)
        eligible = eligible | (g == pick)
    choice = tl.where(eligible[:, None], choice, float("-inf"))
    slots = tl.arange(0, K_PAD)
    chosen_ids = tl.zeros((K_PAD,), dtype=tl.int64)
    chosen_w = tl.zeros((K_PAD,), dtype=tl.float32)
    for r in tl.static_range(K):
        _, at = _first_max(choice, idx, E)
        w = tl.sum(tl.sum(tl.where(idx == at, scores, 0.0), axis=1), axis=0)
        chosen_ids = tl.where(slots == r, at.to(tl.int64), chosen_ids)
        chosen_w = tl.where(slots == r, w, chosen_w)
        choice = tl.where(idx == at, float("-inf"), choice)
    if RENORMALIZE:
        chosen_w = tl.math.div_rn(chosen_w, tl.sum(chosen_w, axis=0) + 1e-20)
    ok = slots < K
    tl.store(ids_ptr + row * K + slots, chosen_ids, mask=ok)
    tl.store(weights_ptr + row * K + slots, chosen_w, mask=ok)


def supports(num_experts: int, n_group: int, k: int, topk_group: int) -> bool:
    """Block shapes are powers of two: groups and experts per group must be; enough eligible experts for k."""
    size = num_experts // max(n_group, 1)
    pow2 = lambda v: v > 0 and v & (v - 1) == 0  # noqa: E731
    return (num_experts % max(n_group, 1) == 0 and pow2(n_group) and pow2(size) and 0 < topk_group <= n_group
            and 0 < k <= topk_group * size)


def grouped_sigmoid_topk(logits: torch.Tensor, correction_bias: torch.Tensor, k: int, n_group: int, topk_group: int,
                         renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """layers/moe.grouped_sigmoid_topk in one launch: (fp32 weights [T, k], int64 expert ids [T, k])."""
    t, e = logits.shape
    if not supports(e, n_group, k, topk_group):
        raise ValueError(f"fused routing needs power-of-two groups and group sizes and k <= topk_group * group size; "
                         f"got {e} experts, {n_group} groups, top {topk_group} groups, k={k}")
    if correction_bias.shape != (e,):
        raise ValueError(f"correction_bias must be [{e}], got {tuple(correction_bias.shape)}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    weights = torch.empty(t, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, k, dtype=torch.int64, device=logits.device)
    if t:
        _grouped_sigmoid_topk_kernel[(t,)](
            logits, correction_bias.float().contiguous(), weights, ids, logits.stride(0),
            N_GROUP=n_group, GROUP_SIZE=e // n_group, TOPK_GROUP=topk_group, K=k, K_PAD=triton.next_power_of_2(k),
            RENORMALIZE=renormalize, INTERPRET=INTERPRETED, num_warps=1 if e <= 256 else 4,
        )
    return weights, ids
