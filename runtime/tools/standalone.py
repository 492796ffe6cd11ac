"""Running one sequence through a model without the engine: full-prompt logits and greedy decoding over a
private paged KV cache (for tests, calibration and teacher-forced checks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from runtime.model_api import CausalLM, ForwardBatch, allocate_kv_caches


class SingleSequence:
    """One sequence whose tokens fill a private cache; blocks are handed out in reverse order so the block
    table is not the identity (the paging arithmetic is exercised)."""

    def __init__(self, model: CausalLM, capacity: int, block_size: int = 16, device: torch.device | str = "cpu"):
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        num_blocks = -(-capacity // block_size)
        self.kv_caches = allocate_kv_caches(model.kv_cache_spec(), num_blocks, block_size, device)
        self.block_table = torch.arange(num_blocks - 1, -1, -1, device=self.device)
        self.length = 0

    def step(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Append tokens (prefill chunk or one decode token); returns fp32 logits [len(token_ids), vocab]."""
        n = len(token_ids)
        positions = torch.arange(self.length, self.length + n, device=self.device)
        slots = self.block_table[positions // self.block_size] * self.block_size + positions % self.block_size
        batch = ForwardBatch(
            input_ids=torch.tensor(list(token_ids), dtype=torch.long, device=self.device),
            positions=positions,
            query_lens=[n],
            context_lens=[self.length + n],
            block_tables=self.block_table.unsqueeze(0),
            slot_mapping=slots,
            kv_caches=self.kv_caches,
            block_size=self.block_size,
        )
        self.length += n
        return self.model.compute_logits(self.model.forward(batch))


def prompt_logits(model: CausalLM, token_ids: Sequence[int], chunk_size: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 logits [T, vocab] at every prompt position (row i predicts token i+1), prefilled in chunks if asked."""
    seq = SingleSequence(model, len(token_ids), device=device)
    chunk = chunk_size or len(token_ids)
    return torch.cat([seq.step(token_ids[i : i + chunk]) for i in range(0, len(token_ids), chunk)])


def greedy_generate(model: CausalLM, token_ids: Sequence[int], max_new_tokens: int, device: torch.device | str = "cpu") -> list[int]:
    """Prefill then decode one token at a time, always taking the arg-max; returns the new tokens."""
    seq = SingleSequence(model, len(token_ids) + max_new_tokens, device=device)
    logits = seq.step(token_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        out.append(int(logits[-1].argmax()))
        if len(out) < max_new_tokens:
            logits = seq.step(out[-1:])
    return out


def prefill_batch(model: CausalLM, sequences: Sequence[Sequence[int]], block_size: int = 16, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Prefill several sequences in one forward, each in its own cache blocks; returns each sequence's hidden
    states [len, hidden] (final norm applied). One pass means each layer sees every token at once."""
    device = torch.device(device)
    blocks = [-(-len(s) // block_size) for s in sequences]
    caches = allocate_kv_caches(model.kv_cache_spec(), sum(blocks), block_size, device)
    table = torch.full((len(sequences), max(blocks)), -1, dtype=torch.long, device=device)
    first = 0
    slots, positions = [], []
    for b, (seq, n) in enumerate(zip(sequences, blocks)):
        table[b, :n] = torch.arange(first, first + n, device=device)
        pos = torch.arange(len(seq), device=device)
        positions.append(pos)
        slots.append(table[b, pos // block_size] * block_size + pos % block_size)
        first += n
    lengths = [len(s) for s in sequences]
    batch = ForwardBatch(
        input_ids=torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=device),
        positions=torch.cat(positions), query_lens=lengths, context_lens=lengths, block_tables=table,
        slot_mapping=torch.cat(slots), kv_caches=caches, block_size=block_size,
    )
    return list(model.forward(batch).split(lengths))
