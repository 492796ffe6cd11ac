"""The batch-invariance scenario: 16 target requests, each run alone, then the same 16 inside a busy, changing
batch (48 other requests joining a few per step, prompts prefilled in chunks next to decodes). With deterministic
mode every target's tokens and logprobs must come out bit-identical; without it they differ.

    alone, busy = alone_and_busy(model, tokenizer, vocab, sampled=False, deterministic=True, device="cpu")
"""

from __future__ import annotations

import random
from typing import Any

import torch

from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.model_runner import ModelRunner
from runtime.engine.sampling_params import SamplingParams

MAX_MODEL_LEN = 160
CHUNK = 32  # max_num_batched_tokens: longer prompts are prefilled over several steps
NUM_TARGETS = 16
NUM_OTHERS = 48

Results = dict[str, tuple[list[int], list[float]]]  # request id -> (tokens, logprobs of those tokens)


class TokenIdText:
    """A stand-in tokenizer for checkpoints without one: token ids written as text (" 17 4 9")."""

    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)


def make_engine(model, tokenizer: Any, deterministic: bool, device: torch.device | str = "cpu") -> LLMEngine:
    blocks = 48
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, num_blocks=blocks, block_size=16, max_num_seqs=24,
                          max_num_batched_tokens=CHUNK, deterministic=deterministic)
    runner = ModelRunner(model, blocks, 16, torch.device(device), batch_invariant=deterministic)
    return LLMEngine(runner, tokenizer, config, {tokenizer.eos_token_id} - {None})


def targets(vocab: int, sampled: bool) -> list[tuple[str, list[int], SamplingParams]]:
    rng = random.Random(1)
    out = []
    for i in range(NUM_TARGETS):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.choice([1, 5, 17, 40, 75]))]
        params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=2, temperature=0.8 if sampled else 0.0,
                                top_p=0.95, seed=1000 + i)
        out.append((f"t{i}", prompt, params))
    return out


def others(vocab: int) -> list[tuple[str, list[int], SamplingParams]]:
    rng = random.Random(3)
    return [(f"o{j}", [rng.randrange(3, vocab) for _ in range(rng.randint(1, 90))],
             SamplingParams(max_tokens=rng.randint(1, 24), ignore_eos=True, temperature=rng.choice([0.0, 1.0])))
            for j in range(NUM_OTHERS)]


def run(engine: LLMEngine, requests, extra=()) -> Results:
    """Add the requests (shuffled with `extra`, three per step) and step until all finish."""
    pending = list(requests) + list(extra)
    random.Random(2).shuffle(pending)
    results: Results = {}
    while pending or engine.has_unfinished():
        for _ in range(3):
            if pending:
                engine.add_request(*pending.pop())
        for out in engine.step():
            tokens, logprobs = results.setdefault(out.request_id, ([], []))
            tokens += out.new_token_ids
            logprobs += [lp.logprob for lp in out.new_logprobs]
    return results


def alone_and_busy(model, tokenizer: Any, vocab: int, sampled: bool, deterministic: bool,
                   device: torch.device | str = "cpu") -> tuple[Results, Results]:
    """(each target run in an engine of its own, the targets' results from the busy engine)."""
    alone: Results = {}
    for request in targets(vocab, sampled):
        alone.update(run(make_engine(model, tokenizer, deterministic, device), [request]))
    busy = run(make_engine(model, tokenizer, deterministic, device), targets(vocab, sampled), others(vocab))
    return alone, {k: v for k, v in busy.items() if k.startswith("t")}
