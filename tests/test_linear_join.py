"""layers/linear.join_output_features: two linears over the same input joined into one (the GPU decode path
joins MLA's q_a/kv_a and the MLPs' gate/up with it), on CPU with the torch FP8 block backend."""

import copy

import pytest
import torch

from runtime.layers.linear import Linear, join_output_features
from runtime.parallel import SINGLE
from runtime.quant.fp8 import Fp8Config
from runtime.quant.numerics import quantize_fp8_block


def _fp8_linear(n: int, k: int, seed: int, bias: bool = False, mode: str = "replicated") -> Linear:
    gen = torch.Generator().manual_seed(seed)
    layer = Linear(k, n, quant=Fp8Config(linear_backend="torch"), prefix=f"l{seed}", parallel=SINGLE, mode=mode,
                   dtype=torch.bfloat16, device=torch.device("cpu"), bias=bias)
    w, ws = quantize_fp8_block(torch.randn(n, k, generator=gen) / k**0.5)
    ws *= 1 + torch.rand(ws.shape, generator=gen)  # block scales that differ: a misplaced scale row shows
    layer.weight.data.copy_(w)
    layer.weight_scale_inv.data.copy_(ws)
    if bias:
        layer.bias.data.copy_(torch.randn(n, generator=gen).to(torch.bfloat16))
    return layer


def _ready(layer: Linear) -> Linear:
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("bias", [False, True])
def test_joined_linear_computes_both_outputs(bias):
    first, second = _fp8_linear(256, 384, 1, bias), _fp8_linear(200, 384, 2, bias)  # second ends in a ragged block
    x = (torch.randn(5, 384, generator=torch.Generator().manual_seed(3)) * 3).to(torch.bfloat16)
    ref = torch.cat((_ready(copy.deepcopy(first))(x), _ready(copy.deepcopy(second))(x)), dim=-1)
    assert join_output_features(first, second)
    assert first.weight.shape == (456, 384) and first.weight_scale_inv.shape == (4, 3)
    out = _ready(first)(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=8e-3, atol=1e-5)  # summation order only
    assert (out == ref).float().mean() > 0.99


def test_join_refuses_what_it_cannot_join():
    ragged = _fp8_linear(200, 384, 1)  # its last scale row covers 72 rows: the second's rows would share it
    assert not join_output_features(ragged, _fp8_linear(128, 384, 2))
    assert ragged.weight.shape == (200, 384)  # unchanged
    assert not join_output_features(_fp8_linear(128, 384, 1, bias=True), _fp8_linear(128, 384, 2))
    assert not join_output_features(_fp8_linear(128, 384, 1), _fp8_linear(128, 256, 2))  # other input size
    assert not join_output_features(_fp8_linear(128, 384, 1, mode="row"), _fp8_linear(128, 384, 2, mode="row"))
