"""GPU kernels for the W4AFP8 / FP8 paths, listed in runtime.backends.BACKENDS:

- moe.w4afp8 "cutlass": SM90 grouped GEMM of csrc/w4afp8 (runtime.kernels.cutlass_moe), highest priority;
- moe.w4afp8 "triton": the same fused MoE in Triton (runtime.kernels.triton_moe);
- linear.fp8_block "triton": FP8 block linear with fused 1x128 activation quantization (runtime.kernels.fp8_gemm).

Importing this package needs neither a GPU nor Triton: the functions below load their kernel module on first
call, and `*_available(device)` tells the backend table whether a backend can run on a device.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


def triton_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def cutlass_available(device: torch.device) -> bool:
    from runtime.kernels import build

    return device.type == "cuda" and build.cuda_unavailable_reason(device) is None


@functools.cache
def _moe_backend(name: str):
    if name == "cutlass":
        from runtime.kernels.cutlass_moe import CutlassW4AFp8MoE

        return CutlassW4AFp8MoE()
    from runtime.kernels.triton_moe import TritonW4AFp8MoE

    return TritonW4AFp8MoE()


def cutlass_w4afp8_moe(*args, **kwargs):
    return _moe_backend("cutlass")(*args, **kwargs)


def cutlass_w4afp8_prepare(*, w13, w2, w13_scale, w2_scale) -> dict:
    return _moe_backend("cutlass").prepare(w13, w2, w13_scale, w2_scale)._asdict()


def triton_w4afp8_moe(*args, **kwargs):
    return _moe_backend("triton")(*args, **kwargs)


def triton_w4afp8_prepare(*, w13, w2, w13_scale, w2_scale) -> dict:
    return _moe_backend("triton").prepare(w13, w2, w13_scale, w2_scale)._asdict()


def triton_fp8_block_linear(*args, **kwargs):
    from runtime.kernels.fp8_gemm import fp8_block_linear

    return fp8_block_linear(*args, **kwargs)
