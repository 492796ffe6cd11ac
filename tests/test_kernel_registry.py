"""The kernel backends are listed in runtime.backends: names, availability on CPU, and prepare() results."""

from __future__ import annotations

import pytest
import torch

from runtime import backends
from runtime.errors import CheckpointError
from runtime.kernels.moe_shapes import MoEShape, random_experts


def test_kernel_backends_are_registered():
    assert {"cutlass", "triton", "torch"} <= set(backends.backend_names("moe.w4afp8"))
    assert "triton" in backends.backend_names("linear.fp8_block")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks CPU selection")
def test_cpu_selects_the_reference_and_refuses_gpu_backends():
    # "auto" on a CPU picks one of the torch implementations (the reference, pre-unpacked, experts batched, packed).
    assert backends.select_backend("moe.w4afp8", "auto", "cpu").name in {"torch", "cached", "batched", "onednn"}
    with pytest.raises(CheckpointError, match="cutlass"):
        backends.select_backend("moe.w4afp8", "cutlass", "cpu")


@pytest.mark.parametrize("name", ["cutlass", "triton"])
def test_prepare_returns_replacement_tensors_by_run_argument_name(name):
    if name == "triton":
        pytest.importorskip("triton", reason="Triton is not installed (pip install triton==3.6.0 to run this)")
    shape = MoEShape("t", 2, 2, 2, 128, 64, 64)
    w13, w2, s13, s2 = random_experts(shape, "cpu", torch.Generator().manual_seed(0))
    backend = backends.BACKENDS[("moe.w4afp8", name)]
    prepared = backend.prepare(w13=w13, w2=w2, w13_scale=s13.to(torch.bfloat16), w2_scale=s2.to(torch.bfloat16))
    assert set(prepared) == {"w13", "w2", "w13_scale", "w2_scale"}
    assert all(t.dtype != torch.float32 for t in prepared.values())  # scales are served as bf16
    if name == "cutlass":
        assert prepared["w13"].shape == (2, 2, 2, 128, 16) and prepared["w13_scale"].shape == (2, 2, 128)
