"""Registry of compute backends for the quantized operations, keyed by operation and backend name.

Operations and the call each backend's `run` implements (the torch reference in runtime.quant.numerics defines
the semantics; faster backends must match it within the kernel-test tolerance):

- "moe.w4afp8": run(x, w13, w2, w13_scale, w2_scale, a1, a2, topk_ids, topk_weights,
  routed_scaling_factor=1.0, expert_offset=0, **prepared_extras) -> bf16 [M, H], as numerics.w4afp8_moe_ref.
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

Kernel packages register on import; `runtime.kernels`, if present, is imported before the first selection so
its backends are known without the caller importing it.

`batch_invariant=True` declares that a backend computes each token's result the same way whatever else is in the
batch, given `runtime.batch_invariant`'s fixed-shape matmuls: its algorithm may depend on the layer's shapes but
not on the number of tokens or on which experts they pick. Deterministic serving only selects such backends.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from runtime.errors import CheckpointError

OPERATIONS = ("moe.w4afp8", "moe.fp8", "moe.bf16", "linear.fp8_block")


@dataclass(frozen=True)
class Backend:
    op: str
    name: str
    run: Callable
    prepare: Callable[..., dict] | None
    available: Callable[[torch.device], bool]
    priority: int  # "auto" picks the available backend with the highest priority
    batch_invariant: bool


_REGISTRY: dict[tuple[str, str], Backend] = {}
_plugins_imported = False


def register_backend(
    op: str,
    name: str,
    run: Callable,
    *,
    prepare: Callable[..., dict] | None = None,
    available: Callable[[torch.device], bool] | None = None,
    priority: int = 0,
    batch_invariant: bool = False,
) -> Backend:
    """Add (or replace) backend `name` for operation `op`. `available(device)` says whether it can run there."""
    if op not in OPERATIONS:
        raise ValueError(f"unknown operation {op!r}; known: {', '.join(OPERATIONS)}")
    if name == "auto":
        raise ValueError("'auto' is reserved for automatic selection")
    backend = Backend(op, name, run, prepare, available or (lambda device: True), priority, batch_invariant)
    _REGISTRY[(op, name)] = backend
    return backend


def _import_plugins() -> None:
    global _plugins_imported
    if not _plugins_imported:
        _plugins_imported = True
        if importlib.util.find_spec("runtime.kernels") is not None:
            importlib.import_module("runtime.kernels")


def on_cpu(device: torch.device) -> bool:
    return device.type == "cpu"


def backend_names(op: str) -> list[str]:
    _import_plugins()
    return sorted(name for (o, name) in _REGISTRY if o == op)


def select_backend(op: str, name: str, device: torch.device | str, batch_invariant: bool = False) -> Backend:
    """The backend called `name` for `op` ("auto": the highest-priority one available on `device`).

    batch_invariant: only backends declared batch-invariant qualify (deterministic serving).
    """
    _import_plugins()
    device = torch.device(device)
    candidates = [b for (o, _), b in _REGISTRY.items() if o == op and (b.batch_invariant or not batch_invariant)]
    if name == "auto":
        usable = [b for b in candidates if b.available(device)]
        if not usable:
            kind = "batch-invariant backend" if batch_invariant else "backend"
            raise CheckpointError(f"no {kind} for {op} can run on {device}")
        return max(usable, key=lambda b: b.priority)
    backend = _REGISTRY.get((op, name))
    if backend is None:
        raise CheckpointError(f"backend {name!r} has no implementation of {op} (available: auto, {', '.join(backend_names(op))})")
    if batch_invariant and not backend.batch_invariant:
        usable = ", ".join(b.name for b in candidates)
        raise CheckpointError(f"backend {name!r} for {op} is not batch-invariant, as deterministic mode requires "
                              f"(batch-invariant: auto, {usable})")
    if not backend.available(device):
        raise CheckpointError(f"backend {name!r} for {op} cannot run on {device}")
    return backend
