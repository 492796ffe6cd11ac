"""A CausalLM whose next token depends only on the position: it says exactly what a test tells it to.

`script[p]` is the token predicted after position p (logit `peak`, every other token 0); past the script it
predicts `default_token`. Tests use it to drive stop strings, stop tokens and reasoning markers deterministically
through the real engine and server.
"""

from __future__ import annotations

import torch

from runtime.model_api import ForwardBatch, KVCacheSpec


class ScriptedLM:
    def __init__(self, vocab_size: int, script: list[int], default_token: int, peak: float = 10.0):
        self.vocab_size = vocab_size
        self.table = torch.tensor([*script, default_token], dtype=torch.long)
        self.peak = peak

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(num_layers=1, token_shape=(1,), dtype=torch.float32)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        batch.kv_caches[0][batch.slot_mapping] = 0.0  # nothing to remember, but honour the cache contract
        return batch.positions.float()[:, None]  # the "hidden state" is the position

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = hidden[:, 0].long().clamp(max=len(self.table) - 1)
        logits = torch.zeros(len(positions), self.vocab_size)
        logits[torch.arange(len(positions)), self.table[positions]] = self.peak
        return logits
