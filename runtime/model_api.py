"""The contract between the engine (scheduler, KV cache, sampler) and a model implementation.

Data flows one way: the engine builds a `ForwardBatch` for one step, the model fills the KV cache slots of the
new tokens and returns hidden states, the engine asks for logits of the rows it needs and samples.

KV cache: the model declares what one token needs per layer (`KVCacheSpec`); the engine allocates, per layer,
one tensor of shape [num_slots, *token_shape] (num_slots = num_blocks * block_size) and passes the list in every
batch. A sequence's tokens live in the blocks listed in its block-table row; token position p of sequence b sits
in slot block_tables[b, p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    token_shape: tuple[int, ...]  # per layer, per token: GQA (2, kv_heads, head_dim); MLA (kv_lora_rank + rope_dim,)
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        n = 1
        for d in self.token_shape:
            n *= d
        return self.num_layers * n * torch.empty((), dtype=self.dtype).element_size()


def allocate_kv_caches(spec: KVCacheSpec, num_blocks: int, block_size: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    return [torch.zeros(num_blocks * block_size, *spec.token_shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]


@dataclass
class ForwardBatch:
    """One engine step over B sequences; the T new tokens of all sequences are concatenated in order."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute position of each new token in its sequence
    query_lens: list[int]  # [B] new tokens per sequence (prefill chunk length, or 1 in decode)
    context_lens: list[int]  # [B] tokens of each sequence in the cache after this step (old + new)
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with -1
    slot_mapping: torch.Tensor  # [T] int64, cache slot that each new token's K/V is written to
    kv_caches: list[torch.Tensor]  # one per layer, [num_slots, *KVCacheSpec.token_shape]
    block_size: int
    # True: each sequence's results must not depend on the other sequences of the batch (per-sequence attention).
    batch_invariant: bool = False
    # Set by the CUDA-graph decode runner (runtime.engine.cuda_graphs) alone: every sequence has one new token, and
    # these are their context lengths [B] on the device. Attention metadata is then built by device ops of fixed
    # shape (block_tables' width), with nothing read back to the host, so that the step can be captured.
    decode_context_lens: torch.Tensor | None = None


class CausalLM(Protocol):
    """What every model family implements (DeepseekV3ForCausalLM, the GQA MoE family, ...)."""

    def kv_cache_spec(self) -> KVCacheSpec: ...

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run the new tokens, writing their K/V into the cache; returns hidden states [T, hidden] (final norm applied)."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, vocab] over the full vocabulary (gathered across tensor-parallel ranks) for N rows."""
        ...
