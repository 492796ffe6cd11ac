"""Token selection from a batch of logits, row by row independent of the other rows.

Each row draws from its own sequence's torch.Generator (one uniform number per token, inverse CDF), so a seeded
request samples the same tokens whatever else is in the batch. Temperature, top-k and top-p are row-wise tensor
ops. Reported logprobs come from the raw model distribution (before temperature and truncation), which is what
teacher-forced scoring needs.
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


def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row by inverse CDF: a single uniform draw from each row's own generator."""
    cdf = probs.cumsum(dim=-1)
    u = torch.stack([torch.rand((), device=probs.device, generator=g) for g in generators])
    # right=True lands on a token with cdf[i-1] <= v < cdf[i], i.e. one of positive probability ...
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)
    # ... unless rounding put v at the very total: then take the row's most likely token (a measure-zero case).
    missed = probs.gather(1, picked[:, None])[:, 0] == 0
    if bool(missed.any()):
        picked = torch.where(missed, probs.argmax(dim=-1), picked)
    return picked


def sample(logits: torch.Tensor, requests: list[SampleRequest]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Choose one token per row of `logits` [B, vocab] (fp32); returns token ids and, where asked, their logprobs."""
    vocab = logits.shape[-1]
    dev = logits.device
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=dev)
        params = [requests[i].params for i in random_rows]
        x = logits[rows] / torch.tensor([p.temperature for p in params], device=dev)[:, None]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=x.dtype)
        if bool((top_k < vocab).any() or (top_p < 1.0).any()):
            x = _truncate(x, top_k, top_p)
        tokens[rows] = _draw(x.softmax(dim=-1), [requests[i].generator for i in random_rows])
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
