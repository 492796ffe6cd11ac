"""The synchronous engine: requests in, one `step()` at a time, text deltas out.

Not thread-safe; `AsyncEngine` drives it from a single thread. A step schedules chunks (scheduler), runs them
(model runner, one call on a plain StepInput), samples the sequences whose prompts are fully cached (sampler),
and turns the new tokens into `RequestOutput` deltas (detokenizer, stop conditions, metrics).
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from runtime.batch_invariant import batch_invariant_mode
from runtime.engine.block_manager import BlockManager
from runtime.engine.detokenizer import TextStream
from runtime.engine.metrics import EngineMetrics
from runtime.engine.model_runner import ModelRunner, StepInput, StepOutput
from runtime.engine.sampler import SampleRequest, sample
from runtime.engine.sampling_params import InvalidRequestError, SamplingParams
from runtime.engine.scheduler import ScheduledChunk, Scheduler
from runtime.engine.sequence import Sequence, TokenLogprob


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # tokens per step: bounds prefill chunk size and activation memory
    vocab_size: int | None = None  # when set, prompt and stop token ids are checked against it
    # Batch-invariant scheduling and sampling (the runner must compute batch-invariantly too; see Scheduler).
    deterministic: bool = False

    def __post_init__(self) -> None:
        if self.max_model_len > self.num_blocks * self.block_size:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the KV cache capacity of "
                f"{self.num_blocks * self.block_size} tokens; lower it or give the cache more memory"
            )


@dataclass
class RequestOutput:
    """What one step produced for one request (deltas; `prompt_logprobs` only with the first token)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob | None] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_output_tokens: int


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Any, config: EngineConfig, eos_token_ids: set[int]):
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(config.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.deterministic)
        self.metrics = EngineMetrics()
        self._seqs: dict[str, Sequence] = {}
        self._texts: dict[str, TextStream] = {}

    # ------------------------------------------------------------------------------------------ requests

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError if the request can never be served; pure, safe from any thread."""
        n = len(prompt_token_ids)
        limit = self.config.max_model_len
        if n == 0:
            raise InvalidRequestError("prompt", "the prompt is empty")
        vocab = self.config.vocab_size
        if vocab is not None:
            if any(not 0 <= t < vocab for t in prompt_token_ids):
                raise InvalidRequestError("prompt", f"token ids must be in [0, {vocab})")
            if any(not 0 <= t < vocab for t in params.stop_token_ids):
                raise InvalidRequestError("stop_token_ids", f"token ids must be in [0, {vocab})")
        if n >= limit:
            raise InvalidRequestError("prompt", f"the prompt has {n} tokens; this model's max_model_len is {limit}")
        if n + params.max_tokens > limit:
            raise InvalidRequestError(
                "max_tokens",
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} exceeds "
                f"max_model_len {limit}",
            )

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self._seqs:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.check_request(prompt_token_ids, params)
        generator = torch.Generator(device=self.runner.device)
        generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        seq = Sequence(request_id, list(prompt_token_ids), params, generator,
                       arrival_time if arrival_time is not None else time.monotonic())
        self._seqs[request_id] = seq
        self._texts[request_id] = TextStream(self.tokenizer, seq.prompt_token_ids, params.skip_special_tokens,
                                             params.stop)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._finish(seq, "abort", time.monotonic())

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def render_metrics(self) -> str:
        return self.metrics.render(self.num_running, self.num_waiting, self.block_manager.usage,
                                   self.scheduler.num_preemptions)

    # ------------------------------------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        to_sample = [c.seq for c in chunks if c.completes_sequence]
        step_input, prompt_owners = self._build_step(chunks)
        out = self.runner.execute(step_input)
        for c in chunks:
            c.seq.num_computed_tokens += c.num_new_tokens
        self._record_prompt_logprobs(out, prompt_owners)
        with batch_invariant_mode() if self.config.deterministic else nullcontext():
            tokens, logprobs = sample(out.logits, [SampleRequest(s.params, s.generator) for s in to_sample])
        now = time.monotonic()
        return [self._append_token(seq, tok, lp, now) for seq, tok, lp in zip(to_sample, tokens, logprobs)]

    def _build_step(self, chunks: list[ScheduledChunk]) -> tuple[StepInput, list[tuple[Sequence, int]]]:
        bs = self.config.block_size
        ids: list[int] = []
        slots: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: list[int] = []
        prompt_targets: list[int] = []
        prompt_owners: list[tuple[Sequence, int]] = []  # (sequence, number of its prompt rows), in row order
        prompt_top_k = 0
        row = 0
        for c in chunks:
            seq, n = c.seq, c.num_new_tokens
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            if c.completes_sequence:
                sample_rows.append(row + n - 1)
            if seq.params.prompt_logprobs is not None:
                # Row at position p scores prompt token p + 1; skip positions already scored before a preemption.
                first, last = max(start, len(seq.prompt_logprobs) - 1), min(end, seq.num_prompt_tokens - 1)
                if last > first:
                    prompt_rows += [row + p - start for p in range(first, last)]
                    prompt_targets += seq.token_ids[first + 1 : last + 1]
                    prompt_owners.append((seq, last - first))
                    prompt_top_k = max(prompt_top_k, seq.params.prompt_logprobs)
            row += n
        width = max(len(c.seq.block_table) for c in chunks)
        tables = torch.full((len(chunks), width), -1, dtype=torch.long)
        for b, c in enumerate(chunks):
            tables[b, : len(c.seq.block_table)] = torch.tensor(c.seq.block_table, dtype=torch.long)
        step = StepInput(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            query_lens=[c.num_new_tokens for c in chunks],
            context_lens=[c.seq.num_computed_tokens + c.num_new_tokens for c in chunks],
            block_tables=tables,
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            sample_rows=torch.tensor(sample_rows, dtype=torch.long),
            prompt_rows=torch.tensor(prompt_rows, dtype=torch.long),
            prompt_targets=torch.tensor(prompt_targets, dtype=torch.long),
            prompt_top_k=prompt_top_k,
        )
        return step, prompt_owners

    @staticmethod
    def _record_prompt_logprobs(out: StepOutput, owners: list[tuple[Sequence, int]]) -> None:
        i = 0
        for seq, count in owners:
            k = seq.params.prompt_logprobs
            chosen = out.prompt_logprobs[i : i + count].tolist()
            top_ids = out.prompt_top_ids[i : i + count, :k].tolist()
            top_lps = out.prompt_top_logprobs[i : i + count, :k].tolist()
            targets = seq.token_ids[len(seq.prompt_logprobs) : len(seq.prompt_logprobs) + count]
            for t, lp, ids, lps in zip(targets, chosen, top_ids, top_lps):
                seq.prompt_logprobs.append(TokenLogprob(t, lp, tuple(zip(ids, lps))))
            i += count

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None, now: float) -> RequestOutput:
        first = seq.first_token_time is None
        self.metrics.on_token(seq.arrival_time, seq.last_token_time, seq.num_prompt_tokens, now)
        if first:
            seq.first_token_time = now
        seq.last_token_time = now
        seq.token_ids.append(token)
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        params = seq.params
        text = self._texts[seq.request_id]
        reason = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            reason = "stop"  # the stop token itself is not part of the text
        elif text.push(token):
            reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.config.max_model_len:
            reason = "length"
        if reason is not None:
            self._finish(seq, reason, now)
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[token],
            new_text=text.take_delta(finished=reason is not None),
            new_logprobs=[logprob] if logprob is not None else [],
            prompt_logprobs=seq.prompt_logprobs if first and params.prompt_logprobs is not None else None,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
        )

    def _finish(self, seq: Sequence, reason: str, now: float) -> None:
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        self.metrics.on_finish(reason, seq.arrival_time, now)
        del self._seqs[seq.request_id]
        del self._texts[seq.request_id]
