"""POST /v1/completions: text or token-id prompts, echo, prompt logprobs, streaming."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from runtime.engine.engine import RequestOutput
from runtime.engine.sampling_params import SamplingParams
from runtime.server.protocol import CompletionRequest
from runtime.server.serving import (Choice, ServerState, check_model, collect, completion_logprobs, event_stream,
                                    merge, new_request_id, sse, usage)


def _prepare(state: ServerState, body: CompletionRequest) -> tuple[list[str], list[list[int]], list[SamplingParams]]:
    """Prompt texts, prompt token ids (one per prompt) and sampling params (one per prompt x choice), all checked."""
    texts, prompts, params = [], [], []
    for prompt in body.prompt_list():
        ids = state.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        texts.append(prompt if isinstance(prompt, str) else state.tokenizer.decode(ids))
        prompts.append(ids)
        # Unset max_tokens means "up to the context limit"; never below 1, so a too-long prompt is named as such.
        max_tokens = body.max_tokens if body.max_tokens is not None else max(1, state.max_model_len - len(ids))
        for choice in range(body.n):
            p = body.sampling_params(max_tokens, body.logprobs, body.logprobs if body.echo else None, choice)
            state.engine.engine.check_request(ids, p)
            params.append(p)
    return texts, prompts, params


def _logprobs_block(state: ServerState, body: CompletionRequest, prompt_ids: list[int], c: Choice,
                    new_ids: list[int], new_entries: list, offset: int) -> dict[str, Any] | None:
    """Logprobs of `new_ids`, preceded by the prompt's when echoing and the choice has just got them."""
    if body.logprobs is None:
        return None
    ids, entries = list(new_ids), list(new_entries)
    if body.echo and c.prompt_logprobs is not None and len(c.token_ids) == len(new_ids):
        ids, entries = prompt_ids + ids, c.prompt_logprobs + entries
    return completion_logprobs(state.token_texts, ids, entries, offset, body.return_tokens_as_token_ids)


async def create_completion(state: ServerState, body: CompletionRequest, raw_request: Request):
    check_model(state, body.model)
    texts, prompts, params = _prepare(state, body)
    request_id = new_request_id("cmpl")
    n = body.n
    streams = [state.engine.generate(f"{request_id}-{i}", prompts[i // n], p) for i, p in enumerate(params)]
    created = int(time.time())
    head = {"id": request_id, "object": "text_completion", "created": created, "model": state.model_name}
    if body.stream:
        return event_stream(_stream(state, body, head, texts, prompts, merge(streams)))
    choices = [Choice() for _ in params]
    for index, out in await collect(raw_request, merge(streams)):
        choices[index].add(out)
    result = []
    for i, c in enumerate(choices):
        prompt_text = texts[i // n]
        result.append({
            "index": i,
            "text": (prompt_text if body.echo else "") + c.text,
            "logprobs": _logprobs_block(state, body, prompts[i // n], c, c.token_ids, c.logprobs, 0),
            "finish_reason": c.finish_reason,
        })
    completion_tokens = sum(c.num_output_tokens for c in choices)
    return JSONResponse({**head, "choices": result, "usage": usage(sum(map(len, prompts)), completion_tokens)})


async def _stream(state: ServerState, body: CompletionRequest, head: dict[str, Any], texts: list[str],
                  prompts: list[list[int]], outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    n = body.n
    choices = [Choice() for _ in range(len(prompts) * n)]
    offsets = [0] * len(choices)  # text_offset of the next streamed token, per choice
    async for index, out in outputs:
        c = choices[index]
        c.add(out)
        first = len(c.token_ids) == len(out.new_token_ids)
        text = (texts[index // n] if body.echo and first else "") + out.new_text
        logprobs = _logprobs_block(state, body, prompts[index // n], c, out.new_token_ids, out.new_logprobs,
                                   offsets[index])
        if logprobs is not None:
            offsets[index] += sum(map(len, logprobs["tokens"]))
        if text or out.finished or logprobs is not None:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}
            yield sse({**head, "choices": [choice]})
    if body.include_usage_chunk:
        completion_tokens = sum(c.num_output_tokens for c in choices)
        yield sse({**head, "choices": [], "usage": usage(sum(map(len, prompts)), completion_tokens)})
    yield sse("[DONE]")
