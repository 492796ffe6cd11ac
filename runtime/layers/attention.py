"""Attention over the engine's paged KV cache, one sequence at a time (runtime.model_api describes the layout).

Each layer writes the new tokens' cache entries at `slot_mapping`, then every sequence attends from its new
tokens to all of its cached tokens, causally. MLA is the single-key-head case with a wider key than value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.model_api import ForwardBatch


@dataclass
class SequenceSpan:
    start: int  # first row of this sequence's new tokens in the batch
    length: int  # new tokens
    slots: torch.Tensor  # [context] cache slot of every token of the sequence, in position order
    mask: torch.Tensor | None  # [length, context] True = may attend; None = every cached token (single new token, no window)


@dataclass
class AttentionMetadata:
    spans: list[SequenceSpan]
    slot_mapping: torch.Tensor

    @classmethod
    def from_batch(cls, batch: ForwardBatch, sliding_window: int | None = None) -> "AttentionMetadata":
        spans, start, bs = [], 0, batch.block_size
        device = batch.block_tables.device
        for b, (q_len, ctx) in enumerate(zip(batch.query_lens, batch.context_lens)):
            pos = torch.arange(ctx, device=device)
            slots = batch.block_tables[b, pos // bs] * bs + pos % bs
            mask = None
            if q_len > 1 or (sliding_window is not None and ctx > sliding_window):
                q_pos = torch.arange(ctx - q_len, ctx, device=device)[:, None]
                mask = pos[None, :] <= q_pos
                if sliding_window is not None:
                    mask &= pos[None, :] > q_pos - sliding_window
            spans.append(SequenceSpan(start, q_len, slots, mask))
            start += q_len
        return cls(spans, batch.slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, heads, dk]; k_cache [slots, kv_heads, dk], v_cache [slots, kv_heads, dv] (views of the layer's cache).

    Returns [T, heads, dv]. Softmax and accumulation are fp32 inside scaled_dot_product_attention.
    """
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    for span in meta.spans:
        rows = slice(span.start, span.start + span.length)
        k = k_cache[span.slots].transpose(0, 1)
        v = v_cache[span.slots].transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1), k, v, attn_mask=span.mask, scale=scale, enable_gqa=k.shape[0] != q.shape[1]
        )
        out[rows] = o.transpose(0, 1)
    return out
