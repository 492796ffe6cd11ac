"""Token embedding and LM head split along the vocabulary (the last rank's slice padded with zero rows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.errors import CheckpointError
from runtime.layers.cpu_dense import CpuDenseWeight, wants_fp32_compute
from runtime.loader import CheckpointTensor, copy_into
from runtime.parallel import ParallelContext
from runtime.quant.base import new_param


def load_vocab_rows(param: nn.Parameter, src: CheckpointTensor, vocab_size: int, start: int, stop: int) -> None:
    """Copy vocabulary rows [start, stop) of a [vocab, hidden] tensor; padding rows stay zero."""
    if src.shape[0] != vocab_size:
        raise CheckpointError(f"tensor {src.name}: {src.shape[0]} rows, but config.json vocab_size is {vocab_size}")
    param.data.zero_()
    copy_into(param, param.data[: stop - start], src.read_range(0, start, stop), src.name)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, parallel: ParallelContext, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.vocab_size = vocab_size
        self.parallel = parallel
        self.rows = -(-vocab_size // parallel.world_size)
        self.start = parallel.rank * self.rows
        self.stop = max(min(self.start + self.rows, vocab_size), self.start)
        new_param(self, "weight", (self.rows, hidden), dtype, device, output_dim=0)

    def weight_loader(self, param: nn.Parameter, src: CheckpointTensor) -> None:
        load_vocab_rows(param, src, self.vocab_size, self.start, self.stop)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.stop)
        local = torch.where(mine, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.parallel.all_reduce(out)


class ParallelLMHead(nn.Module):
    """fp32 logits over the full vocabulary (products rounded to the weight dtype first); shares the embedding's
    weight when the model ties them."""

    def __init__(self, embedding: VocabParallelEmbedding, tied: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.vocab_size = embedding.vocab_size
        self.parallel = embedding.parallel
        self.start, self.stop = embedding.start, embedding.stop
        if tied:
            self.weight = embedding.weight
        else:
            new_param(self, "weight", tuple(embedding.weight.shape), dtype, device, output_dim=0)
        self.cpu_weight: CpuDenseWeight | None = None

    def prepare_cpu_compute(self, fast: bool) -> None:
        """After loading: a half-precision head on CPU computes from fp32 copies (runtime.layers.cpu_dense), oneDNN-packed
        when `fast` (not in deterministic mode). It is the widest GEMM of a small model's decode step."""
        if wants_fp32_compute(self.weight):
            self.cpu_weight = CpuDenseWeight(self.weight, fast=fast)

    def weight_loader(self, param: nn.Parameter, src: CheckpointTensor) -> None:
        load_vocab_rows(param, src, self.vocab_size, self.start, self.stop)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.cpu_weight is not None:
            logits = self.cpu_weight.linear(hidden.to(self.weight.dtype)).float()
        else:
            logits = F.linear(hidden, self.weight).float()
        return self.parallel.all_gather(logits, dim=-1)[..., : self.vocab_size]
