"""Owns the model and its KV cache; runs one step described by a plain `StepInput`.

`ModelRunner.execute(step)` is the only call a step makes into the model. `StepInput` holds CPU tensors and
lists, nothing else, so that under tensor parallelism rank 0 can broadcast it and every rank runs the same call
on its own shard and cache (the logits come back gathered over the vocabulary; only rank 0 samples).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from runtime.batch_invariant import batch_invariant_mode
from runtime.engine.cuda_graphs import DecodeGraphs
from runtime.model_api import CausalLM, ForwardBatch, allocate_kv_caches

# Prompt-logprob rows turned into logits at once: bounds the [rows, vocab] fp32 temporary.
_PROMPT_LOGPROB_ROWS_PER_CHUNK = 256


@dataclass
class StepInput:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    query_lens: list[int]  # [B]
    context_lens: list[int]  # [B]
    block_tables: torch.Tensor  # [B, max_blocks] int64, -1 padded
    slot_mapping: torch.Tensor  # [T] int64
    sample_rows: torch.Tensor  # [S] rows of T whose logits are sampled from (last token of a finished prefill / decode)
    prompt_rows: torch.Tensor  # [P] rows of T scored for prompt logprobs
    prompt_targets: torch.Tensor  # [P] the prompt token that follows each of those rows
    prompt_top_k: int  # alternatives wanted per prompt row (max over the batch)


@dataclass
class StepOutput:
    logits: torch.Tensor  # [S, vocab] fp32 on the model's device, for sample_rows
    prompt_logprobs: torch.Tensor  # [P] logprob of each prompt target
    prompt_top_ids: torch.Tensor  # [P, prompt_top_k]
    prompt_top_logprobs: torch.Tensor  # [P, prompt_top_k]


class ModelRunner:
    """batch_invariant: run every step under runtime.batch_invariant's fixed-shape numerics and with per-sequence
    attention, so that each sequence's logits do not depend on the rest of the batch (deterministic serving).

    cuda_graph_batch: on a CUDA device, decode steps of up to this many sequences are replayed from CUDA graphs
    (runtime.engine.cuda_graphs) captured for contexts up to max_model_len; 0 (or a CPU, or batch_invariant):
    every step runs eagerly.
    """

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, device: torch.device,
                 batch_invariant: bool = False, cuda_graph_batch: int = 0, max_model_len: int | None = None):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.batch_invariant = batch_invariant
        graphs = cuda_graph_batch > 0 and device.type == "cuda" and not batch_invariant
        # Graphs pad batches with rows that need a cache block no sequence owns: one more than the engine uses.
        self.kv_caches = allocate_kv_caches(model.kv_cache_spec(), num_blocks + (1 if graphs else 0), block_size, device)
        self.decode_graphs = None
        if graphs:
            if max_model_len is None:
                raise ValueError("cuda_graph_batch needs max_model_len (the width of the captured block tables)")
            self.decode_graphs = DecodeGraphs(model, self.kv_caches, block_size, max_model_len, cuda_graph_batch,
                                              pad_block=num_blocks, device=device)
            self.decode_graphs.capture()

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        with batch_invariant_mode() if self.batch_invariant else nullcontext():
            return self._execute(step)

    def _execute(self, step: StepInput) -> StepOutput:
        dev = self.device
        bucket = None
        if self.decode_graphs is not None and self.decode_graphs.captured and not len(step.prompt_rows):
            bucket = self.decode_graphs.bucket(step.query_lens, step.block_tables.shape[1])
        if bucket is not None:
            hidden = self.decode_graphs.run(step.input_ids, step.positions, step.slot_mapping, step.context_lens,
                                            step.block_tables, bucket)
        else:
            batch = ForwardBatch(
                input_ids=step.input_ids.to(dev),
                positions=step.positions.to(dev),
                query_lens=step.query_lens,
                context_lens=step.context_lens,
                block_tables=step.block_tables.to(dev),
                slot_mapping=step.slot_mapping.to(dev),
                kv_caches=self.kv_caches,
                block_size=self.block_size,
                batch_invariant=self.batch_invariant,
            )
            hidden = self.model.forward(batch)
        logits = self.model.compute_logits(hidden[step.sample_rows.to(dev)]).float()
        return StepOutput(logits, *self._score_prompt_rows(hidden, step))

    def _score_prompt_rows(self, hidden: torch.Tensor, step: StepInput) -> tuple[torch.Tensor, ...]:
        chosen, top_ids, top_lps = [], [], []
        for start in range(0, len(step.prompt_rows), _PROMPT_LOGPROB_ROWS_PER_CHUNK):
            rows = step.prompt_rows[start : start + _PROMPT_LOGPROB_ROWS_PER_CHUNK].to(self.device)
            targets = step.prompt_targets[start : start + _PROMPT_LOGPROB_ROWS_PER_CHUNK].to(self.device)
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows]).float(), dim=-1)
            chosen.append(logprobs.gather(1, targets[:, None])[:, 0].cpu())
            top = logprobs.topk(step.prompt_top_k, dim=-1)
            top_ids.append(top.indices.cpu())
            top_lps.append(top.values.cpu())
        if not chosen:
            empty = torch.empty(0)
            return empty, torch.empty(0, step.prompt_top_k, dtype=torch.long), empty.view(0, step.prompt_top_k)
        return torch.cat(chosen), torch.cat(top_ids), torch.cat(top_lps)
