"""GPU kernels for the W4AFP8 / FP8 paths, registered with runtime.backends on import:

- moe.w4afp8 "cutlass": SM90 grouped GEMM of csrc/w4afp8 (runtime.kernels.cutlass_moe), highest priority;
- moe.w4afp8 "triton": the same fused MoE in Triton (runtime.kernels.triton_moe);
- linear.fp8_block "triton": FP8 block linear with fused 1x128 activation quantization (runtime.kernels.fp8_gemm).

Importing this package needs neither a GPU nor Triton: kernel modules load on first use, and `available(device)`
tells the registry whether a backend can run on a device.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from runtime.backends import register_backend

PRIORITY_CUTLASS = 20
PRIORITY_TRITON = 10


def _triton_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def _cutlass_available(device: torch.device) -> bool:
    from runtime.kernels import build

    return device.type == "cuda" and build.cuda_unavailable_reason(device) is None


@functools.cache
def _moe_backend(name: str):
    if name == "cutlass":
        from runtime.kernels.cutlass_moe import CutlassW4AFp8MoE

        return CutlassW4AFp8MoE()
    from runtime.kernels.triton_moe import TritonW4AFp8MoE

    return TritonW4AFp8MoE()


def _register_moe(name: str, priority: int, available) -> None:
    def run(*args, **kwargs):
        return _moe_backend(name)(*args, **kwargs)

    def prepare(*, w13, w2, w13_scale, w2_scale) -> dict:
        return _moe_backend(name).prepare(w13, w2, w13_scale, w2_scale)._asdict()

    register_backend("moe.w4afp8", name, run, prepare=prepare, available=available, priority=priority)


def _fp8_block_linear(*args, **kwargs):
    from runtime.kernels.fp8_gemm import fp8_block_linear

    return fp8_block_linear(*args, **kwargs)


_register_moe("cutlass", PRIORITY_CUTLASS, _cutlass_available)
_register_moe("triton", PRIORITY_TRITON, _triton_available)
register_backend("linear.fp8_block", "triton", _fp8_block_linear, available=_triton_available, priority=PRIORITY_TRITON)
