"""Token selection from a batch of logits, row by row independent of the other rows.

Each row uses its own sequence's torch.Generator (exponential-race sampling: argmax(p / E), E ~ Exp(1), picks i
with probability p_i), so a seeded request samples the same tokens whatever else is in the batch. Temperature,
top-k and top-p are row-wise tensor ops. Reported logprobs come from the raw model distribution (before
temperature and truncation), which is what teacher-forced scoring needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.engine.sampling_params import SamplingParams
from runtime.engine.sequence import TokenLogprob


@dataclass(frozen=True)
class SampleRequest:
    params: SamplingParams
    generator: torch.Generator


def _truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask everything outside each row's top-k, then outside the smallest set reaching top_p probability."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    outside = ranks[None, :] >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Mass strictly before each token; the most likely token always stays.
    outside |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, requests: list[SampleRequest]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Choose one token per row of `logits` [B, vocab] (fp32); returns token ids and, where asked, their logprobs."""
    vocab = logits.shape[-1]
    dev = logits.device
    greedy_tokens = logits.argmax(dim=-1)
    tokens = greedy_tokens.clone()
    random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=dev)
        params = [requests[i].params for i in random_rows]
        x = logits[rows] / torch.tensor([p.temperature for p in params], device=dev)[:, None]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=x.dtype)
        if bool((top_k < vocab).any() or (top_p < 1.0).any()):
            x = _truncate(x, top_k, top_p)
        probs = x.softmax(dim=-1)
        noise = torch.stack(
            [torch.empty(vocab, device=dev).exponential_(generator=requests[i].generator) for i in random_rows]
        )
        # A draw of exactly 0 would turn masked tokens into 0/0 = NaN.
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        tokens[rows] = (probs / noise).argmax(dim=-1)

    token_list = tokens.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(requests)
    wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if wanted:
        rows = torch.tensor(wanted, device=dev)
        lp = torch.log_softmax(logits[rows], dim=-1)
        k = max(requests[i].params.logprobs for i in wanted)
        top = lp.topk(k, dim=-1) if k else None
        chosen = lp.gather(1, tokens[rows][:, None])[:, 0].tolist()
        for j, i in enumerate(wanted):
            n = requests[i].params.logprobs
            alts = ()
            if n:
                alts = tuple(zip(top.indices[j, :n].tolist(), top.values[j, :n].tolist()))
            logprobs[i] = TokenLogprob(token_list[i], chosen[j], alts)
    return token_list, logprobs
