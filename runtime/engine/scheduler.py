"""Continuous batching under a KV-cache budget.

Every step serves running sequences first (oldest first: a decode token, or the next chunk of a long prompt), then
admits waiting requests FIFO while the token budget, the sequence limit and free cache blocks allow. A new request
therefore joins the running batch at the next step. When a running sequence cannot get a block for its next
token, the newest running sequence is preempted: its blocks are freed and it goes back to the head of the queue
to be recomputed later. The oldest sequence is never preempted for a younger one, and the engine caps
max_model_len at the cache capacity, so every admitted request can finish: memory pressure makes requests wait,
never fail.

Deterministic mode makes a request's computation independent of the others (with batch-invariant numerics):
prompts are cut at fixed multiples of max_num_batched_tokens (a chunk that does not fit this step's remaining
prompt budget waits for a later step instead of being split), decode tokens run outside that budget, and a
request is admitted only once blocks for its whole length (prompt + max_tokens) are free, so nothing is ever
preempted and recomputed with different chunk boundaries.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from runtime.engine.block_manager import BlockManager
from runtime.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_new_tokens` tokens of `seq`, starting at position seq.num_computed_tokens, run in this step."""

    seq: Sequence
    num_new_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """After this chunk every token of the sequence is cached, so the step yields its next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 deterministic: bool = False):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.deterministic = deterministic
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and give its blocks back."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> list[ScheduledChunk]:
        if self.deterministic:
            return self._schedule_fixed_chunks()
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            need = self.block_manager.blocks_needed(seq, seq.num_computed_tokens + n)
            while not self.block_manager.can_allocate(need) and self.running[-1] is not seq:
                self._preempt(self.running.pop())
                preempted = True
            if not self.block_manager.can_allocate(need):  # `seq` is the newest left: it gives way itself
                self._preempt(self.running.pop())
                preempted = True
                break
            self.block_manager.allocate(seq, seq.num_computed_tokens + n)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
            i += 1
        # After a preemption the cache is full: admitting now would only preempt again.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(self.block_manager.blocks_needed(seq, seq.num_computed_tokens + n)):
                break
            chunks.append(self._admit(seq.num_computed_tokens + n, n))
            budget -= n
        return chunks

    def _fixed_chunk(self, seq: Sequence) -> int:
        """Tokens of `seq` to run next: one decode token, or the prompt up to the next multiple of the budget."""
        if seq.num_computed_tokens >= seq.num_prompt_tokens:
            return seq.num_uncomputed_tokens
        step = self.max_num_batched_tokens
        return min(seq.num_prompt_tokens, (seq.num_computed_tokens // step + 1) * step) - seq.num_computed_tokens

    def _schedule_fixed_chunks(self) -> list[ScheduledChunk]:
        prompt_budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        for seq in self.running:
            n = self._fixed_chunk(seq)
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                if n > prompt_budget:
                    continue
                prompt_budget -= n
            chunks.append(ScheduledChunk(seq, n))
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = self._fixed_chunk(seq)
            whole = self.block_manager.blocks_needed(seq, seq.num_prompt_tokens + seq.params.max_tokens)
            if n > prompt_budget or not self.block_manager.can_allocate(whole):
                break
            chunks.append(self._admit(seq.num_prompt_tokens + seq.params.max_tokens, n))
            prompt_budget -= n
        return chunks

    def _admit(self, reserved_tokens: int, n: int) -> ScheduledChunk:
        """Move the first waiting sequence to running with cache blocks for `reserved_tokens`; run `n` tokens."""
        seq = self.waiting.popleft()
        self.block_manager.allocate(seq, reserved_tokens)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return ScheduledChunk(seq, n)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
