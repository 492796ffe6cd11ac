"""Triton W4AFP8 MoE and FP8 block linear against the torch reference on CPU, through Triton's interpreter, at
small shapes (the GPU runs the full shapes in test_gpu_kernels.py). Skips when Triton is not installed."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="Triton is not installed (pip install triton==3.6.0 to run these)")

from runtime.kernels.fp8_gemm import fp8_block_linear  # noqa: E402
from runtime.kernels.moe_shapes import MoEShape, synthetic_moe  # noqa: E402
from runtime.kernels.triton_moe import TritonW4AFp8MoE, route  # noqa: E402
from runtime.quant import numerics  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = {
    "demo_like": MoEShape("demo_like", 8, 8, 8, 576, 192, 64),
    "g128": MoEShape("g128", 6, 6, 2, 256, 128, 128),
    "ep": MoEShape("ep", 4, 12, 3, 128, 64, 64, expert_offset=4),
}


CASES = [("demo_like", 5, "skewed")] + [(s, m, r) for s in ("g128", "ep") for m in (1, 5, 40) for r in ("uniform", "skewed")]
if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter runs each program in numpy (the demo_like case alone takes ~35 s on a CI core): CI keeps
    # one case per group size (128; 64 with an expert offset); the GPU runs them all.
    CASES = [("g128", 5, "skewed"), ("ep", 40, "uniform")]


@pytest.mark.parametrize("shape_name,m,routing", CASES)
def test_triton_moe_matches_reference(shape_name, m, routing):
    shape = SMALL[shape_name]
    case = synthetic_moe(shape, m, routing, DEVICE, seed=m)
    backend = TritonW4AFp8MoE()
    routing = (case.topk_ids, case.topk_weights, 2.5)
    out = backend(case.x, case.weights(backend.prepare(*case.experts), shape.expert_offset), *routing)
    ref = numerics.w4afp8_moe_ref(case.x, case.weights(expert_offset=shape.expert_offset), *routing)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=0.1)
    assert (out.float() - ref.float()).norm() <= 1e-2 * ref.float().norm()


def test_triton_moe_clamps_saturating_activations():
    shape = SMALL["g128"]
    case = synthetic_moe(shape, 6, "uniform", DEVICE, seed=1, x_scale=8.0)
    backend = TritonW4AFp8MoE()
    routing = (case.topk_ids, case.topk_weights)
    out = backend(case.x, case.weights(backend.prepare(*case.experts)), *routing)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), numerics.w4afp8_moe_ref(case.x, case.weights(), *routing).float(), rtol=1e-2, atol=0.1)


def test_route_builds_expert_sorted_tiles():
    ids = torch.tensor([[5, 1], [1, 9], [1, 5]], dtype=torch.int32)  # expert 9 belongs to another rank
    tiles, row_token, src2dst = route(ids, n_experts=8, expert_offset=0, tile=2, max_tiles=5)
    # expert 1 has 3 rows -> tiles (1, 0, 2), (1, 2, 1); expert 5 has 2 rows -> (5, 3, 2); the rest are empty.
    assert tiles[:3].tolist() == [[1, 0, 2], [1, 2, 1], [5, 3, 2]]
    assert tiles[3:, 2].tolist() == [0, 0]  # unused grid slots have no rows
    assert row_token.tolist()[:5] == [0, 1, 2, 0, 2]
    assert src2dst.tolist() == [3, 0, 1, -1, 2, 4]


def test_backend_rejects_unprepared_weights():
    shape = SMALL["g128"]
    case = synthetic_moe(shape, 2, "uniform", DEVICE)
    with pytest.raises(ValueError, match="prepare"):
        TritonW4AFp8MoE()(case.x, case.weights(), case.topk_ids, case.topk_weights)


@pytest.mark.parametrize("m,n,k", [(3, 200, 576), (17, 256, 384)])
def test_fp8_block_linear_matches_reference(m, n, k):
    gen = torch.Generator(device=DEVICE).manual_seed(m)
    w, ws = numerics.quantize_fp8_block(torch.randn(n, k, device=DEVICE, generator=gen) / k**0.5)
    x = (torch.randn(m, k, device=DEVICE, generator=gen) * 3).to(torch.bfloat16)
    bias = torch.randn(n, device=DEVICE, generator=gen)
    out = fp8_block_linear(x, w, ws, bias)
    torch.testing.assert_close(out.float(), numerics.fp8_block_linear_ref(x, w, ws, bias).float(), rtol=1e-2, atol=0.1)


@pytest.mark.parametrize("split_k", [2, 3])
def test_fp8_block_linear_split_k_matches_reference(split_k):
    """Decode-sized M with K split across programs (5 K blocks: 3+2 or 2+2+1), bias added once after the sum."""
    gen = torch.Generator(device=DEVICE).manual_seed(split_k)
    w, ws = numerics.quantize_fp8_block(torch.randn(192, 576, device=DEVICE, generator=gen) / 24)
    x = (torch.randn(2, 576, device=DEVICE, generator=gen) * 3).to(torch.bfloat16)
    bias = torch.randn(192, device=DEVICE, generator=gen)
    out = fp8_block_linear(x, w, ws, bias, split_k=split_k, gemv=False)
    torch.testing.assert_close(out.float(), numerics.fp8_block_linear_ref(x, w, ws, bias).float(), rtol=1e-2, atol=0.1)


@pytest.mark.parametrize("m,n,k,block_n,block_k,split_k", [
    (1, 200, 1000, 16, 256, 1),  # ragged N tile and ragged last K block (1000 = 7 x 128 + 104)
    (1, 192, 1152, 64, 256, 3),  # 5 chunks of 256 split 2+2+1, the last chunk half past K
    (3, 130, 640, 32, 512, 2),   # M padded to 4 rows; one 512-chunk per split, the second mostly past K
])
def test_fp8_block_gemv_matches_reference(m, n, k, block_n, block_k, split_k):
    """The small-M path: several K blocks per step, each with its own activation and weight scale."""
    from runtime.kernels.fp8_gemm import GemvConfig

    gen = torch.Generator(device=DEVICE).manual_seed(n)
    w, ws = numerics.quantize_fp8_block(torch.randn(n, k, device=DEVICE, generator=gen) / k**0.5)
    ws = ws * torch.rand(ws.shape, device=DEVICE, generator=gen) * 4  # block scales that differ a lot
    x = torch.randn(m, k, device=DEVICE, generator=gen).to(torch.bfloat16)
    x[:, 128:256] *= 50  # one K block of large activations: each block needs its own activation scale
    bias = torch.randn(n, device=DEVICE, generator=gen)
    ref = numerics.fp8_block_linear_ref(x, w, ws, bias).float()
    out = fp8_block_linear(x, w, ws, bias, split_k=split_k, gemv=GemvConfig(block_n=block_n, block_k=block_k))
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=0.1)
    assert (out.float() - ref).norm() <= 1e-2 * ref.norm()


@pytest.mark.parametrize("rows,size", [(3, 7168), (1, 512), (5, 200)])
def test_rms_norm_kernel_matches_the_torch_expression(rows, size):
    """Fused RMSNorm against RMSNorm's torch path, on rows that are a strided view (as kv_a_layernorm's input)."""
    from runtime.kernels.rms_norm import rms_norm
    from runtime.layers.norm import RMSNorm

    gen = torch.Generator(device=DEVICE).manual_seed(size)
    norm = RMSNorm(size, 1e-6, torch.bfloat16, torch.device(DEVICE))
    norm.kernel = None
    norm.weight.data = (1 + 0.3 * torch.randn(size, device=DEVICE, generator=gen)).to(torch.bfloat16)
    wide = (torch.randn(rows, size + 64, device=DEVICE, generator=gen) * 4).to(torch.bfloat16)
    x = wide[:, :size]
    out, ref = rms_norm(x, norm.weight, norm.eps), norm(x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=8e-3, atol=1e-5)  # a bf16 ulp at most
    assert (out == ref).float().mean() > 0.95


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("heads", [0, 5, 20])  # 0: [T, dim] keys; 20: two programs of heads per token
def test_rotate_kernel_matches_the_torch_expression(interleaved, heads):
    """Fused rotary against RotaryEmbedding's torch path, on a strided view (q_pe is a slice of the query heads)."""
    from runtime.config import RopeConfig
    from runtime.kernels.rotary import rotate
    from runtime.layers.rotary import RotaryEmbedding

    gen = torch.Generator(device=DEVICE).manual_seed(heads)
    rope = RotaryEmbedding(64, RopeConfig(theta=10000.0), interleaved, torch.device(DEVICE))
    rope.kernel = None
    positions = torch.tensor([0, 7, 1000], device=DEVICE)
    cos, sin = rope.cos_sin(positions)
    full = (torch.randn(3, max(heads, 1), 192, device=DEVICE, generator=gen) * 3).to(torch.bfloat16)
    x = full[:, :, 128:] if heads else full[:, 0, 128:]
    out, ref = rotate(x, cos, sin, interleaved), rope.rotate(x, cos, sin)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=8e-3, atol=1e-2)  # a bf16 ulp at most
    assert (out == ref).float().mean() > 0.95


def test_rms_norm_kernel_names_bad_input():
    from runtime.kernels.rms_norm import rms_norm

    with pytest.raises(ValueError, match="bf16"):
        rms_norm(torch.ones(2, 8, device=DEVICE), torch.ones(8, device=DEVICE, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(ValueError, match="features"):
        rms_norm(torch.ones(2, 8, device=DEVICE, dtype=torch.bfloat16), torch.ones(4, device=DEVICE, dtype=torch.bfloat16), 1e-6)


def test_gemv_config_names_bad_tile():
    from runtime.kernels.fp8_gemm import GemvConfig

    with pytest.raises(ValueError, match="block_n"):
        GemvConfig(block_n=48)
    with pytest.raises(ValueError, match="block_k"):
        GemvConfig(block_k=192)


def test_split_k_factor_fills_the_gpu_with_whole_k_blocks():
    from runtime.kernels.fp8_gemm import split_k_factor

    assert split_k_factor(programs=9, k_blocks=56, sm_count=132) == 28  # R1 kv_a_proj at M=1: 9 tiles -> 252 programs
    assert split_k_factor(programs=576, k_blocks=56, sm_count=132) == 1  # enough tiles already
    assert split_k_factor(programs=112, k_blocks=5, sm_count=132) == 3  # ceil(5/3) = 2 blocks each: 3 splits, none empty
    assert split_k_factor(programs=96, k_blocks=14, sm_count=132, per_sm=4) == 5  # R1 q_a_proj GEMV: 6 wanted, 3 chunks each


def test_fp8_block_linear_names_bad_scale_shape():
    w, ws = numerics.quantize_fp8_block(torch.randn(128, 256))
    with pytest.raises(ValueError, match="weight_scale_inv"):
        fp8_block_linear(torch.randn(2, 256), w, ws[:, :1])


@pytest.mark.parametrize("experts,n_group,topk_group,k,dtype", [
    (64, 8, 4, 8, torch.bfloat16),  # the serving check's R1-width model (router logits rounded to bf16)
    (256, 8, 4, 8, torch.float32),  # DeepSeek-R1 (fp32 logits of dsv3_router_gemm)
    (16, 4, 2, 3, torch.float32),  # k not a power of two
])
def test_fused_routing_matches_grouped_sigmoid_topk(experts, n_group, topk_group, k, dtype):
    from runtime.kernels.routing import grouped_sigmoid_topk as fused
    from runtime.layers.moe import grouped_sigmoid_topk

    gen = torch.Generator(device=DEVICE).manual_seed(experts + k)
    logits = (torch.randn(37, experts, device=DEVICE, generator=gen) * 2).to(dtype)
    bias = torch.randn(experts, device=DEVICE, generator=gen) * 0.5  # large enough to change groups and experts
    for renormalize in (True, False):
        weights, ids = fused(logits, bias, k, n_group, topk_group, renormalize)
        ref_weights, ref_ids = grouped_sigmoid_topk(logits, bias, k, n_group, topk_group, renormalize)
        assert ids.dtype == ref_ids.dtype and weights.dtype == torch.float32
        assert torch.equal(ids, ref_ids)  # same experts in the same (descending biased-score) order
        torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-7)


def test_fused_routing_breaks_ties_by_index_and_names_bad_shapes():
    from runtime.kernels.routing import grouped_sigmoid_topk as fused

    logits = torch.zeros(1, 16, device=DEVICE)  # every score equal: the lowest groups and experts win
    weights, ids = fused(logits, torch.zeros(16, device=DEVICE), 3, 4, 2, True)
    assert ids.tolist() == [[0, 1, 2]]
    torch.testing.assert_close(weights, torch.full((1, 3), 1 / 3, device=DEVICE))
    with pytest.raises(ValueError, match="power-of-two"):
        fused(torch.zeros(2, 24, device=DEVICE), torch.zeros(24, device=DEVICE), 2, 3, 2, True)
    with pytest.raises(ValueError, match="correction_bias"):
        fused(torch.zeros(2, 16, device=DEVICE), torch.zeros(8, device=DEVICE), 2, 4, 2, True)


@pytest.mark.parametrize("rows,size", [(1, 2048), (3, 1500)])
def test_swiglu_kernel_matches_the_torch_expression(rows, size):
    """Fused SwiGLU against quant/base.silu_and_mul, on the two halves of one gate/up output (strided views)."""
    from runtime.kernels.swiglu import silu_and_mul as fused
    from runtime.quant.base import silu_and_mul

    gen = torch.Generator(device=DEVICE).manual_seed(size)
    gate_up = (torch.randn(rows, 2 * size, device=DEVICE, generator=gen) * 4).to(torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    out, ref = fused(gate, up), silu_and_mul(gate, up)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=8e-3, atol=1e-5)  # a bf16 ulp at most
    assert (out == ref).float().mean() > 0.99
    with pytest.raises(ValueError, match="bf16"):
        fused(gate.float(), up)
    with pytest.raises(ValueError, match="both be"):
        fused(gate, up[:, 1:])
