"""The compute backends of the quantized operations, keyed by operation and backend name.

Operations and the call each backend's `run` implements (the torch reference in runtime.quant.numerics defines
the semantics; faster backends must match it within the kernel-test tolerance):

- "moe.w4afp8": run(x, experts: numerics.W4AFp8MoEWeights, topk_ids, topk_weights, routed_scaling_factor=1.0,
  **prepared_extras) -> bf16 [M, H], as numerics.w4afp8_moe_ref (`experts` holds the packed weights, their
  group scales, the activation scales a1/a2 and the expert offset).
- "moe.fp8":  run(x, w13, w2, w13_scale, w2_scale, topk_ids, topk_weights, routed_scaling_factor=1.0,
  expert_offset=0, block=(128, 128)) -> [M, H] in x.dtype (FP8 block experts, dynamic 1x128 activations;
  w13_scale holds the gate blocks then the up blocks).
- "moe.bf16": run(x, w13, w2, topk_ids, topk_weights, routed_scaling_factor=1.0, expert_offset=0) -> [M, H].
- "linear.fp8_block": run(x, weight, weight_scale_inv, bias=None, block=(128, 128), out_dtype=...,
  **prepared_extras), as numerics.fp8_block_linear_ref.

`prepare` (optional) is called once after loading with the layer's weight tensors as keyword arguments (the
weight names of `run`, plus `block` for the FP8 operations) and returns a dict: entries under those weight
names replace the layer's tensors (e.g. scales re-laid out for a kernel), any other entries are passed to every
`run` call as extra keyword arguments.

`BACKENDS` lists every backend, written out: the plain-torch ones (runtime.quant.numerics and
runtime.quant.torch_backends) and the GPU kernels (runtime.kernels, which load on first call). Nothing
registers itself on import; `register_backend` adds one at run time (a kernel kept elsewhere, a test double).

`batch_invariant=True` declares that a backend computes each token's result the same way whatever else is in the
batch, given `runtime.batch_invariant`'s fixed-shape matmuls: its algorithm may depend on the layer's shapes but
not on the number of tokens or on which experts they pick. Deterministic serving only selects such backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from runtime import kernels
from runtime.errors import CheckpointError
from runtime.layers.cpu_dense import onednn_available
from runtime.quant import numerics as nx
from runtime.quant import torch_backends as tb

OPERATIONS = ("moe.w4afp8", "moe.fp8", "moe.bf16", "linear.fp8_block")


def anywhere(device: torch.device) -> bool:
    return True


def on_cpu(device: torch.device) -> bool:
    return device.type == "cpu"


def on_cpu_onednn(device: torch.device) -> bool:
    return on_cpu(device) and onednn_available()


@dataclass(frozen=True)
class Backend:
    op: str
    name: str
    run: Callable
    prepare: Callable[..., dict] | None = None
    available: Callable[[torch.device], bool] = anywhere  # whether it can run on a device
    priority: int = 0  # "auto" picks the available backend with the highest priority
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        if self.op not in OPERATIONS:
            raise ValueError(f"unknown operation {self.op!r}; known: {', '.join(OPERATIONS)}")
        if self.name == "auto":
            raise ValueError("'auto' is reserved for automatic selection")


BACKENDS: dict[tuple[str, str], Backend] = {(b.op, b.name): b for b in (
    Backend("moe.w4afp8", "torch", nx.w4afp8_moe_ref, batch_invariant=True),
    # The reference on int4 values unpacked once at load (fp32 copies), bit-identical results, for CPU speed.
    Backend("moe.w4afp8", "cached", tb.w4afp8_moe_cached, prepare=tb.unpack_w4afp8_experts, available=on_cpu,
            priority=10, batch_invariant=True),
    # Weights dequantized once (fp32), experts batched (runtime.quant.base.batched_expert_moe); equal to the
    # reference up to fp32 summation order.
    Backend("moe.w4afp8", "batched", tb.w4afp8_moe_batched, prepare=tb.dequantize_w4afp8_experts,
            available=on_cpu, priority=20, batch_invariant=True),
    # The same with every expert's gate/up weight packed for oneDNN (runtime.layers.cpu_dense), not batch-invariant.
    Backend("moe.w4afp8", "onednn", tb.w4afp8_moe_batched, prepare=tb.pack_w4afp8_experts, available=on_cpu_onednn,
            priority=30),
    Backend("moe.w4afp8", "cutlass", kernels.cutlass_w4afp8_moe, prepare=kernels.cutlass_w4afp8_prepare,
            available=kernels.cutlass_available, priority=20),
    Backend("moe.w4afp8", "triton", kernels.triton_w4afp8_moe, prepare=kernels.triton_w4afp8_prepare,
            available=kernels.triton_available, priority=10),
    Backend("moe.fp8", "torch", tb.fp8_moe_ref, batch_invariant=True),
    # The reference math on weights dequantized once at load (fp32 copies: 4 more bytes per weight), same results.
    Backend("moe.fp8", "cached", tb.fp8_moe_ref, prepare=tb.dequantize_fp8_experts, available=on_cpu, priority=10,
            batch_invariant=True),
    # Same weights, experts batched (runtime.quant.base.batched_expert_moe); equal to the reference up to fp32 order.
    Backend("moe.fp8", "batched", tb.fp8_moe_batched, prepare=tb.dequantize_fp8_experts, available=on_cpu,
            priority=20, batch_invariant=True),
    Backend("moe.fp8", "onednn", tb.fp8_moe_batched, prepare=tb.pack_fp8_experts, available=on_cpu_onednn,
            priority=30),
    Backend("moe.bf16", "torch", tb.bf16_moe_ref, batch_invariant=True),
    Backend("moe.bf16", "batched", tb.bf16_moe_batched, priority=20, batch_invariant=True),
    # CPU: weights upcast to fp32 once at load, experts batched; the reference's roundings, equal to it up to fp32
    # summation order.
    Backend("moe.bf16", "fp32", tb.bf16_moe_fp32, prepare=tb.upcast_bf16_experts, available=on_cpu, priority=30,
            batch_invariant=True),
    Backend("moe.bf16", "onednn", tb.bf16_moe_fp32, prepare=tb.pack_bf16_experts, available=on_cpu_onednn,
            priority=40),
    Backend("linear.fp8_block", "torch", nx.fp8_block_linear_ref, batch_invariant=True),
    Backend("linear.fp8_block", "cached", tb.fp8_linear_cached, prepare=tb.dequantize_fp8_linear, available=on_cpu,
            priority=10, batch_invariant=True),
    Backend("linear.fp8_block", "triton", kernels.triton_fp8_block_linear, available=kernels.triton_available,
            priority=10),
)}


def register_backend(
    op: str,
    name: str,
    run: Callable,
    *,
    prepare: Callable[..., dict] | None = None,
    available: Callable[[torch.device], bool] = anywhere,
    priority: int = 0,
    batch_invariant: bool = False,
) -> Backend:
    """Add (or replace) backend `name` for operation `op`. `available(device)` says whether it can run there."""
    backend = Backend(op, name, run, prepare, available, priority, batch_invariant)
    BACKENDS[(op, name)] = backend
    return backend


def backend_names(op: str) -> list[str]:
    return sorted(name for (o, name) in BACKENDS if o == op)


def select_backend(op: str, name: str, device: torch.device | str, batch_invariant: bool = False) -> Backend:
    """The backend called `name` for `op` ("auto": the highest-priority one available on `device`).

    batch_invariant: only backends declared batch-invariant qualify (deterministic serving).
    """
    device = torch.device(device)
    candidates = [b for (o, _), b in BACKENDS.items() if o == op and (b.batch_invariant or not batch_invariant)]
    if name == "auto":
        usable = [b for b in candidates if b.available(device)]
        if not usable:
            kind = "batch-invariant backend" if batch_invariant else "backend"
            raise CheckpointError(f"no {kind} for {op} can run on {device}")
        return max(usable, key=lambda b: b.priority)
    backend = BACKENDS.get((op, name))
    if backend is None:
        raise CheckpointError(f"backend {name!r} has no implementation of {op} (available: auto, {', '.join(backend_names(op))})")
    if batch_invariant and not backend.batch_invariant:
        usable = ", ".join(b.name for b in candidates)
        raise CheckpointError(f"backend {name!r} for {op} is not batch-invariant, as deterministic mode requires "
                              f"(batch-invariant: auto, {usable})")
    if not backend.available(device):
        raise CheckpointError(f"backend {name!r} for {op} cannot run on {device}")
    return backend
