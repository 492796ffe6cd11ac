"""GPU correctness of the fast backends against the torch reference (runtime.quant.numerics), at R1 TP8, R1 EP8
and demo shapes, M in {1..4096}, uniform and skewed routing. Skips on machines without a suitable GPU."""

from __future__ import annotations

import functools

import pytest
import torch

from runtime.kernels import build
from runtime.kernels.moe_shapes import ROUTINGS, SHAPES, TOKEN_COUNTS, MoEShape, random_experts, synthetic_moe
from runtime.quant import numerics

pytestmark = pytest.mark.gpu

CUDA_REASON = None if torch.cuda.is_available() else "no CUDA GPU on this machine"


def _backend(name: str):
    if name == "cutlass":
        reason = build.cuda_unavailable_reason()
        if reason:
            pytest.skip(reason)
        from runtime.kernels.cutlass_moe import CutlassW4AFp8MoE

        return CutlassW4AFp8MoE()
    if CUDA_REASON:
        pytest.skip(CUDA_REASON)
    from runtime.kernels.triton_moe import TritonW4AFp8MoE

    return TritonW4AFp8MoE()


@functools.cache
def _layer(shape_name: str):
    """Checkpoint-layout experts of a shape, shared by all cases of that shape (building them costs seconds)."""
    gen = torch.Generator(device="cuda").manual_seed(1234)
    return random_experts(SHAPES[shape_name], "cuda", gen)


@functools.cache
def _prepared(backend_name: str, shape_name: str):
    backend = _backend(backend_name)
    return backend, backend.prepare(*_layer(shape_name))


def _check(out: torch.Tensor, ref: torch.Tensor) -> None:
    """The issue's tolerance (rtol 1e-2, atol 0.1) on all but a 1e-4 fraction of elements, and 4x it on all.

    Why not every element: the intermediate is rounded twice (bf16 GEMM output, then fp8 after SwiGLU). Any fp32
    summation order other than the reference's flips a few of those roundings, and one flipped fp8 intermediate
    moves a whole output row by up to ~0.2 (seen: 1149 of 29M elements at R1 TP8, M=4096). A layout or indexing
    bug instead gives O(1) relative error, which the norm check catches.
    """
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    out, ref = out.float(), ref.float()
    diff, bound = (out - ref).abs(), 0.1 + 1e-2 * ref.abs()
    outside = (diff > bound).float().mean().item()
    assert outside <= 1e-4, f"{outside:.2e} of elements outside rtol 1e-2 / atol 0.1 (max diff {diff.max():.3f})"
    assert (diff <= 4 * bound).all(), f"max diff {diff.max():.3f}"
    rel = (out - ref).norm() / ref.norm().clamp_min(1e-6)
    assert rel < 2e-2, f"relative error {rel:.3e}"


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("m", TOKEN_COUNTS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("backend_name", ["cutlass", "triton"])
def test_moe_matches_reference(backend_name, shape_name, m, routing):
    backend, prepared = _prepared(backend_name, shape_name)
    shape = SHAPES[shape_name]
    case = synthetic_moe(shape, m, routing, "cuda", seed=m, experts=_layer(shape_name))
    routing = (case.topk_ids, case.topk_weights, 2.5)
    ref = numerics.w4afp8_moe_ref(case.x, case.weights(expert_offset=shape.expert_offset), *routing)
    _check(backend(case.x, case.weights(prepared, shape.expert_offset), *routing), ref)


@pytest.mark.parametrize("shape_name", ["r1_tp8", "demo"])
@pytest.mark.parametrize("backend_name", ["cutlass", "triton"])
def test_moe_saturating_activations_stay_finite(backend_name, shape_name):
    """x at 4x the static scale's range: every cast must clamp to +-448 (no NaN/Inf) and still match."""
    backend, prepared = _prepared(backend_name, shape_name)
    shape = SHAPES[shape_name]
    case = synthetic_moe(shape, 64, "uniform", "cuda", seed=7, experts=_layer(shape_name), x_scale=4.0)
    routing = (case.topk_ids, case.topk_weights, 1.0)
    _check(backend(case.x, case.weights(prepared, shape.expert_offset), *routing),
           numerics.w4afp8_moe_ref(case.x, case.weights(expert_offset=shape.expert_offset), *routing))


def test_cutlass_is_deterministic_with_split_k():
    backend, prepared = _prepared("cutlass", "r1_tp8")
    case = synthetic_moe(SHAPES["r1_tp8"], 1, "uniform", "cuda", seed=3, experts=_layer("r1_tp8"))
    args = (case.x, case.weights(prepared), case.topk_ids, case.topk_weights)
    first = backend(*args)
    for _ in range(3):
        assert torch.equal(backend(*args), first)


@pytest.mark.parametrize("groups_per_stage", [1, 2])
@pytest.mark.parametrize("m", [1, 8, 40])
def test_cutlass_odd_group_counts(m, groups_per_stage):
    """K of 3 and 1 scale groups: with two groups per pipeline stage the last stage is half empty."""
    from runtime.kernels.cutlass_moe import CutlassW4AFp8MoE

    if build.cuda_unavailable_reason():
        pytest.skip(build.cuda_unavailable_reason())
    shape = MoEShape("odd_groups", 8, 8, 2, 384, 128, 128)
    case = synthetic_moe(shape, m, "uniform", "cuda", seed=m)
    backend = CutlassW4AFp8MoE(groups_per_stage=groups_per_stage)
    routing = (case.topk_ids, case.topk_weights)
    _check(backend(case.x, case.weights(backend.prepare(*case.experts)), *routing),
           numerics.w4afp8_moe_ref(case.x, case.weights(), *routing))


@pytest.mark.parametrize("m", [1, 8, 300])
def test_cutlass_dependent_launch_gives_identical_results(m):
    """Programmatic dependent launch only overlaps kernels: outputs must match plain stream order bit for bit."""
    from runtime.kernels.cutlass_moe import CutlassW4AFp8MoE

    backend, prepared = _prepared("cutlass", "r1_tp8")
    case = synthetic_moe(SHAPES["r1_tp8"], m, "skewed", "cuda", seed=11, experts=_layer("r1_tp8"))
    args = (case.x, case.weights(prepared), case.topk_ids, case.topk_weights)
    plain = CutlassW4AFp8MoE(pdl=False)(*args)
    assert torch.equal(backend(*args), plain)


@pytest.mark.parametrize("m", [8, 1000, 4096])
def test_cutlass_dependent_launch_reads_this_calls_routing(m):
    """Issue 16: the down GEMM used to read the tile list before routing had finished writing it (the gate/up
    GEMM let it launch before its own wait). Routing runs in block 0 of the routing kernel while the other blocks
    quantize x; from about a thousand tokens (a prompt chunk) those blocks come in waves, and the down GEMM could
    start while block 0 was still writing. The buffers come from the caching allocator, so a stale read sees
    whatever the block held last: here the previous call's tiles for a different routing, which gives wrong
    experts (in the engine, other kernels' data: an illegal memory access). Alternating two routings over
    reused buffers must give each one's plain-stream-order result every time. A guard, not a reproduction: on an
    H200 the kernel before the fix also passed it (the window is narrow), and so did a served sweep."""
    from runtime.kernels.cutlass_moe import CutlassW4AFp8MoE

    backend, prepared = _prepared("cutlass", "r1_tp8")
    plain = CutlassW4AFp8MoE(pdl=False)
    cases = [synthetic_moe(SHAPES["r1_tp8"], m, "uniform", "cuda", seed=s, experts=_layer("r1_tp8")) for s in (21, 22)]
    calls = [(c.x, c.weights(prepared), c.topk_ids, c.topk_weights) for c in cases]
    expected = [plain(*args) for args in calls]
    mismatches = 0
    for i in range(60):
        out = backend(*calls[i % 2])
        mismatches += not torch.equal(out, expected[i % 2])
    assert mismatches == 0, f"{mismatches} of 60 calls differ from plain stream order"


@pytest.mark.parametrize("m,n,k", [(1, 7168, 7168), (4096, 2112, 7168), (7, 1536, 576), (33, 200, 1000)])
def test_fp8_block_linear_matches_reference(m, n, k):
    if CUDA_REASON:
        pytest.skip(CUDA_REASON)
    from runtime.kernels.fp8_gemm import fp8_block_linear

    gen = torch.Generator(device="cuda").manual_seed(m)
    w, ws = numerics.quantize_fp8_block(torch.randn(n, k, device="cuda", generator=gen) / k**0.5)
    x = (torch.randn(m, k, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    bias = torch.randn(n, device="cuda", generator=gen)
    _check(fp8_block_linear(x, w, ws, bias), numerics.fp8_block_linear_ref(x, w, ws, bias))
