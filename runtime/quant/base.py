"""The quantization-method interface (SGLang style); runtime.quant.schemes lists the schemes by name.

A scheme (`QuantConfig`) hands each layer a method. A method creates the layer's parameters at their per-rank
shapes, tagging each with how it is sharded (`output_dim` / `input_dim`: the tensor dimension that tensor
parallelism splits when the layer is column- / row-parallel; None = replicated); the layer's weight loader uses
those tags to read only this rank's slice. After every tensor is loaded, `process_weights_after_loading`
converts them to the compute layout, and `apply` runs the layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn


if TYPE_CHECKING:
    from runtime.loader import CheckpointReader


def new_param(
    layer: nn.Module,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    *,
    output_dim: int | None = None,
    input_dim: int | None = None,
    expected_loads: int = 1,
    shard_multiple: dict[int, int] | None = None,
    per_expert_scalar: bool = False,
) -> nn.Parameter:
    """Register a parameter with its loading tags; the loader counts writes against expected_loads.

    shard_multiple {dim: m}: when split across ranks, the per-rank size along dim must be a multiple of m (a
    quantization block must not straddle two ranks). per_expert_scalar: one value per expert (input scales),
    NaN until loaded so that the loader can name the experts the checkpoint left out.
    """
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    if per_expert_scalar:
        param.data.fill_(float("nan"))
    param.output_dim = output_dim
    param.input_dim = input_dim
    param.expected_loads = expected_loads
    param.loads = 0
    param.shard_multiple = shard_multiple or {}
    param.per_expert_scalar = per_expert_scalar
    layer.register_parameter(name, param)
    return param


def replace_param(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a parameter's tensor after loading (new dtype or layout), dropping the old storage."""
    delattr(layer, name)
    layer.register_parameter(name, nn.Parameter(value, requires_grad=False))


def prepare_backend(backend, layer: nn.Module, params: dict[str, str], **static) -> dict:
    """Run a backend's one-time `prepare` on a layer's tensors (run-argument name -> parameter name) and static
    arguments. Returned entries named like a run argument replace that parameter; the others are extra run kwargs.
    """
    if backend.prepare is None:
        return {}
    prepared = backend.prepare(**{arg: getattr(layer, name) for arg, name in params.items()}, **static)
    extras = {}
    for key, value in prepared.items():
        if key in params:
            replace_param(layer, params[key], value)
        else:
            extras[key] = value
    return extras


class LinearMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """Register `weight` (and scales) for a [output_size, input_size] per-rank linear."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = x W^T (+ bias) in x.dtype."""

    @abstractmethod
    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """The weight as fp32 [out, in] (for weight absorption, calibration and tests)."""


class MoEMethod(ABC):
    """Routed experts of one layer on this rank: E local experts, hidden H, intermediate I per rank.

    Parameter names follow SGLang: w13_* hold gate rows [0, I) then up rows [I, 2I); w2_* the down projection.
    """

    @abstractmethod
    def create_weights(self, layer: nn.Module, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, device: torch.device) -> None: ...

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, routed_scaling_factor: float) -> torch.Tensor:
        """This rank's partial MoE output [M, H] in x.dtype (before any all-reduce); ids are global expert ids."""

    @abstractmethod
    def dequantized_expert(self, layer: nn.Module, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Local expert e as fp32 (w13 [2I, H], w2 [H, I])."""


class QuantConfig(ABC):
    """One quantization scheme: which method each linear / MoE layer of a model gets."""

    name: ClassVar[str]

    def __init__(self, moe_backend: str = "auto", linear_backend: str = "auto", batch_invariant: bool = False):
        self.moe_backend = moe_backend
        self.linear_backend = linear_backend
        self.batch_invariant = batch_invariant  # only batch-invariant backends (runtime.backends) are selected

    @classmethod
    @abstractmethod
    def from_checkpoint(cls, model_dir: Path, hf_config: dict, reader: "CheckpointReader", **options) -> "QuantConfig": ...

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod: ...

    @abstractmethod
    def moe_method(self, prefix: str) -> MoEMethod: ...


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU in fp32 on the GEMM outputs, cast back to their dtype."""
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


def routed_tokens(topk_ids: torch.Tensor, expert_offset: int, num_local: int):
    """For each local expert hit by the batch: (local index e, token rows, top-k slots). Non-local ids are skipped."""
    local = topk_ids.long() - expert_offset
    for e in torch.unique(local[(local >= 0) & (local < num_local)]).tolist():
        token_idx, slot = torch.nonzero(local == e, as_tuple=True)
        yield e, token_idx, slot


# A rank that holds at most this many experts per expert a token picks runs all of them on every token.
DENSE_EXPERTS_PER_PICK = 2


def batched_expert_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_local: int,
    expert_offset: int,
    routed_scaling_factor: float,
    experts,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Routed experts through `experts(rows, selection) -> [n, len(rows), H]`, which runs the local experts
    `selection` (a slice) on every given row; the top-k combine is fp32 in expert order, scaled once.

    A rank holding at most DENSE_EXPERTS_PER_PICK x top-k experts runs all of them on all tokens in one batched
    call and weights the unpicked ones 0 (one large GEMM per projection instead of a loop); wider layers loop
    over the experts the batch hits. The choice depends on the layer's shape only, never on the batch, so with
    runtime.batch_invariant each token is computed the same way whatever else is batched with it.
    """
    local = topk_ids.long() - expert_offset
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    if num_local <= DENSE_EXPERTS_PER_PICK * topk_ids.shape[1]:
        mine = (local >= 0) & (local < num_local)
        weights = torch.zeros(x.shape[0], num_local, dtype=torch.float32, device=x.device)
        weights.scatter_add_(1, torch.where(mine, local, 0), torch.where(mine, topk_weights.float(), 0.0))
        z = experts(x, slice(0, num_local))
        if x.device.type == "cpu":
            # One reduction instead of a loop of small ops; torch on CPU sums a leading dimension of up to 16 in
            # order (equal to the loop) and a longer one in fixed chunks, neither depending on the batch.
            out = (weights.t().unsqueeze(-1) * z.float()).sum(0)
        else:
            for e in range(num_local):
                out += weights[:, e : e + 1] * z[e].float()
    else:
        for e, token_idx, slot in routed_tokens(topk_ids, expert_offset, num_local):
            z = experts(x[token_idx], slice(e, e + 1))[0]
            out.index_add_(0, token_idx, topk_weights[token_idx, slot].float().unsqueeze(-1) * z.float())
    return (routed_scaling_factor * out).to(out_dtype)
