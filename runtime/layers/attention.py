"""Attention over the engine's paged KV cache (runtime.model_api describes the layout).

Each layer writes the new tokens' cache entries at `slot_mapping`, then every sequence attends from its new
tokens to all of its cached tokens, causally. Single-token (decode) sequences are attended together in one call,
their cached tokens gathered into a padded batch; prompt chunks, and every sequence when the batch must be
batch-invariant, are attended one sequence at a time. MLA is the single-key-head case with a wider key than value.
"""

from __future__ import annotations

import functools
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
class DecodeGroup:
    """Sequences with one new token each, attended in one call over their whole cache blocks (padded batch)."""

    rows: torch.Tensor  # [B] batch row of each sequence's new token
    blocks: torch.Tensor  # [B, max_blocks] cache blocks of each sequence, padded with block 0
    block_size: int
    mask: torch.Tensor  # [B, 1, 1, max_blocks * block_size] True = may attend (own tokens, inside the window)
    context_lens: torch.Tensor  # [B] tokens in each sequence's cache, the new one included
    every_row: bool = False  # rows is 0..B-1 and the batch has no other rows (a pure decode step)

    @functools.cached_property
    def slot_table(self) -> torch.Tensor:
        """[B, max_blocks * block_size] cache slot of each position of every sequence's blocks; computed once per
        step (a paged decode kernel of every layer reads it)."""
        offsets = torch.arange(self.block_size, device=self.blocks.device)
        return (self.blocks[:, :, None] * self.block_size + offsets).flatten(1)


@dataclass
class AttentionMetadata:
    spans: list[SequenceSpan]  # sequences attended one at a time
    decode: DecodeGroup | None
    slot_mapping: torch.Tensor

    @classmethod
    def from_batch(cls, batch: ForwardBatch, sliding_window: int | None = None) -> "AttentionMetadata":
        if batch.decode_context_lens is not None:
            return cls._for_captured_decode(batch, sliding_window)
        bs = batch.block_size
        device = batch.block_tables.device
        starts = [0]
        for q_len in batch.query_lens[:-1]:
            starts.append(starts[-1] + q_len)
        decoding = [] if batch.batch_invariant else [b for b, q_len in enumerate(batch.query_lens) if q_len == 1]
        spans = []
        for b in sorted(set(range(len(batch.query_lens))) - set(decoding)):
            q_len, ctx = batch.query_lens[b], batch.context_lens[b]
            pos = torch.arange(ctx, device=device)
            slots = batch.block_tables[b, pos // bs] * bs + pos % bs
            mask = None
            if q_len > 1 or (sliding_window is not None and ctx > sliding_window):
                q_pos = torch.arange(ctx - q_len, ctx, device=device)[:, None]
                mask = pos[None, :] <= q_pos
                if sliding_window is not None:
                    mask &= pos[None, :] > q_pos - sliding_window
            spans.append(SequenceSpan(starts[b], q_len, slots, mask))
        decode = None
        if decoding:
            idx = torch.tensor(decoding, device=device)
            ctx = torch.tensor([batch.context_lens[b] for b in decoding], device=device)
            num_blocks = -(-int(ctx.max()) // bs)
            blocks = batch.block_tables[idx, :num_blocks]
            pos = torch.arange(num_blocks * bs, device=device)
            valid = pos[None, :] < ctx[:, None]
            if sliding_window is not None:
                valid &= pos[None, :] >= ctx[:, None] - sliding_window
            decode = DecodeGroup(torch.tensor([starts[b] for b in decoding], device=device),
                                 blocks.clamp(min=0), bs, valid[:, None, None, :], ctx,
                                 every_row=len(decoding) == len(batch.query_lens))
        return cls(spans, decode, batch.slot_mapping)

    @classmethod
    def _for_captured_decode(cls, batch: ForwardBatch, sliding_window: int | None) -> "AttentionMetadata":
        """Every sequence one decode row, over all of block_tables' columns: fixed shapes, no host read-back."""
        bs, ctx = batch.block_size, batch.decode_context_lens
        device = batch.block_tables.device
        pos = torch.arange(batch.block_tables.shape[1] * bs, device=device)
        valid = pos[None, :] < ctx[:, None]
        if sliding_window is not None:
            valid &= pos[None, :] >= ctx[:, None] - sliding_window
        rows = torch.arange(ctx.shape[0], device=device)
        decode = DecodeGroup(rows, batch.block_tables.clamp(min=0), bs, valid[:, None, None, :], ctx, every_row=True)
        return cls([], decode, batch.slot_mapping)


def _decode_keys_values(k_cache: torch.Tensor, v_cache: torch.Tensor, kv_cache: torch.Tensor | None, d: DecodeGroup,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decoding sequence's cached keys and values, [B, kv_heads, max_blocks * block_size, dk | dv]."""
    if kv_cache is not None:
        # One contiguous copy per block holds both its keys and values, converted once (no strided gathers).
        b, n = d.blocks.shape
        kv = kv_cache.view(-1, d.block_size * kv_cache[0].numel()).index_select(0, d.blocks.flatten()).to(dtype)
        kv = kv.view(b, n * d.block_size, *kv_cache.shape[1:])
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    k = k_cache.unflatten(0, (-1, d.block_size))[d.blocks].flatten(1, 2).transpose(1, 2).to(dtype)
    v = v_cache.unflatten(0, (-1, d.block_size))[d.blocks].flatten(1, 2).transpose(1, 2).to(dtype)
    return k, v


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    kv_cache: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, heads, dk]; k_cache [slots, kv_heads, dk], v_cache [slots, kv_heads, dv] (views of the layer's cache);
    kv_cache: the contiguous [slots, 2, kv_heads, d] tensor they are views of, when they are (GQA's layout).

    Returns [T, heads, dv]. Softmax and accumulation are fp32 inside scaled_dot_product_attention (its 4-D
    inputs take the fused CPU kernel).
    """
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    gqa = k_cache.shape[1] != q.shape[1]
    if meta.decode is not None:
        d = meta.decode
        # Whole blocks gather faster than single slots. On a CPU, fp32 operands take a 2x faster kernel for one
        # query row, with the same math (bf16 inputs are accumulated in fp32 anyway).
        dtype = torch.float32 if q.device.type == "cpu" else q.dtype
        k, v = _decode_keys_values(k_cache, v_cache, kv_cache, d, dtype)
        o = F.scaled_dot_product_attention(q[d.rows].unsqueeze(2).to(dtype), k, v, attn_mask=d.mask, scale=scale,
                                           enable_gqa=gqa)
        out[d.rows] = o.squeeze(2).to(out.dtype)
    for span in meta.spans:
        rows = slice(span.start, span.start + span.length)
        k = k_cache[span.slots].transpose(0, 1).unsqueeze(0)
        v = v_cache[span.slots].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0), k, v, attn_mask=span.mask, scale=scale, enable_gqa=gqa
        )
        out[rows] = o[0].transpose(0, 1)
    return out
