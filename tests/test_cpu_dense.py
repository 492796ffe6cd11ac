"""CPU compute paths for half-precision weights (runtime.layers.cpu_dense) and the MoE backends built on them:
each equals the bf16 reference up to fp32 summation order, and deterministic mode never picks the packed ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime import backends
from runtime.layers.cpu_dense import CpuDenseWeight, onednn_available
from runtime.quant.base import prepare_backend
from runtime.quant.bf16 import Bf16LinearMethod
from runtime.quant.torch_backends import bf16_moe_ref

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN (mkldnn)")
BF16_TOL = dict(rtol=1.6e-2, atol=1e-2)  # one bf16 rounding of the output apart


def _weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    return (torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) / 8).bfloat16()


@pytest.mark.parametrize("fast", [False, pytest.param(True, marks=needs_onednn)])
@pytest.mark.parametrize("rows", [1, 5])
def test_dense_weight_matches_the_bf16_product(fast, rows):
    w = _weight(96, 64, 0)
    bias = torch.randn(96).bfloat16()
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    out = CpuDenseWeight(w, fast=fast, half_for_one_row=True).linear(x, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
    torch.testing.assert_close(out.float(), F.linear(x.float(), w.float(), bias.float()), **BF16_TOL)


@needs_onednn
def test_one_row_uses_the_half_weight_and_more_rows_the_packed_copy():
    w = _weight(96, 64, 2)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    dense = CpuDenseWeight(w, fast=True, half_for_one_row=True)
    assert torch.equal(dense.linear(x), F.linear(x, w))  # the bf16 product itself
    assert dense.packed is not None and dense.fp32 is None


def test_batch_invariant_linear_keeps_a_plain_fp32_copy():
    layer = torch.nn.Module()
    for batch_invariant, packed in ((True, False), (False, onednn_available())):
        method = Bf16LinearMethod(batch_invariant)
        method.create_weights(layer, 64, 32, torch.bfloat16, torch.device("cpu"))
        layer.weight.data.copy_(_weight(32, 64, 4))
        method.process_weights_after_loading(layer)
        assert (layer.cpu_weight.packed is not None) == packed


@pytest.mark.parametrize("op", ["moe.bf16", "moe.fp8", "moe.w4afp8"])
def test_deterministic_mode_never_selects_the_packed_backends(op):
    assert backends.select_backend(op, "auto", "cpu", batch_invariant=True).name != "onednn"


def _experts(num_experts: int, hidden: int, inter: int):
    g = torch.Generator().manual_seed(5)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / 8).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) / 8).bfloat16()
    return w13, w2


# top-4 of 8 experts takes batched_expert_moe's all-experts path (the packed one), top-2 its loop over experts hit
@pytest.mark.parametrize("top_k", [2, 4])
@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("name", ["batched", "fp32", pytest.param("onednn", marks=needs_onednn)])
def test_bf16_moe_backends_match_the_reference(name, rows, top_k):
    w13, w2 = _experts(8, 64, 32)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(rows, 64, generator=g).bfloat16()
    topk_weights, topk_ids = torch.softmax(torch.randn(rows, 8, generator=g), -1).topk(top_k, dim=-1)
    ref = bf16_moe_ref(x, w13, w2, topk_ids, topk_weights, routed_scaling_factor=1.5)
    backend = backends.BACKENDS[("moe.bf16", name)]
    layer = torch.nn.Module()
    layer.w13_weight, layer.w2_weight = torch.nn.Parameter(w13, requires_grad=False), torch.nn.Parameter(w2, requires_grad=False)
    extras = prepare_backend(backend, layer, {"w13": "w13_weight", "w2": "w2_weight"})
    out = backend.run(x, layer.w13_weight, layer.w2_weight, topk_ids, topk_weights, routed_scaling_factor=1.5, **extras)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), **BF16_TOL)
