"""Decode steps without an engine: B sequences with C cached tokens each, one new token each (benchmarks, tests)."""

from __future__ import annotations

import torch

from runtime.engine.model_runner import StepInput


def decode_step_input(batch: int, context: int, num_blocks: int, block_size: int, gen: torch.Generator,
                      vocab_size: int = 1000) -> StepInput:
    """Every sequence owns its blocks, handed out shuffled as the engine's allocator would after some traffic;
    new tokens are drawn from [0, vocab_size)."""
    blocks_per_seq = -(-(context + 1) // block_size)
    if batch * blocks_per_seq > num_blocks:
        raise ValueError(f"{batch} sequences of {context + 1} tokens need {batch * blocks_per_seq} blocks, "
                         f"the cache has {num_blocks}")
    order = torch.randperm(num_blocks, generator=gen)[: batch * blocks_per_seq]
    tables = order.view(batch, blocks_per_seq).long()
    pos = torch.full((batch,), context, dtype=torch.long)
    slots = tables[torch.arange(batch), pos // block_size] * block_size + pos % block_size
    empty = torch.empty(0, dtype=torch.long)
    return StepInput(input_ids=torch.randint(0, vocab_size, (batch,), generator=gen), positions=pos,
                     query_lens=[1] * batch, context_lens=[context + 1] * batch, block_tables=tables,
                     slot_mapping=slots, sample_rows=torch.arange(batch), prompt_rows=empty, prompt_targets=empty,
                     prompt_top_k=0)
