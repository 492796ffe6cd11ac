"""POST /v1/chat/completions: the tokenizer's chat template, optional reasoning split, streaming."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from runtime.engine.engine import RequestOutput
from runtime.server.protocol import ChatCompletionRequest
from runtime.server.reasoning import ReasoningStream, split_reasoning
from runtime.server.serving import (APIError, Choice, ServerState, chat_logprobs, check_model, collect,
                                    event_stream, merge, new_request_id, sse, usage)
from runtime.server.tokenizer import render_chat

log = logging.getLogger(__name__)


def _prompt_ids(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    messages = [m.for_template() for m in body.messages]
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    try:
        return render_chat(state.tokenizer, messages, body.add_generation_prompt, body.chat_template_kwargs or {})
    except Exception as exc:  # jinja raises many kinds; all mean these messages cannot be rendered
        log.info("chat template rejected a request: %s", exc)
        raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages") from exc


def _message(state: ServerState, text: str) -> dict[str, Any]:
    if state.reasoning is None:
        return {"role": "assistant", "content": text}
    reasoning, content = split_reasoning(state.reasoning, text)
    return {"role": "assistant", "content": content, "reasoning_content": reasoning}


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, raw_request: Request):
    check_model(state, body.model)
    prompt = _prompt_ids(state, body)
    max_tokens = body.requested_max_tokens
    if max_tokens is None:
        max_tokens = max(1, state.max_model_len - len(prompt))
    num_logprobs = body.num_logprobs
    params = [body.sampling_params(max_tokens, num_logprobs, None, choice) for choice in range(body.n)]
    for p in params:
        state.engine.engine.check_request(prompt, p)
    request_id = new_request_id("chatcmpl")
    streams = [state.engine.generate(f"{request_id}-{i}", prompt, p) for i, p in enumerate(params)]
    head = {"id": request_id, "created": int(time.time()), "model": state.model_name}
    if body.stream:
        return event_stream(_stream(state, body, head, len(prompt), merge(streams)))
    choices = [Choice() for _ in params]
    for index, out in await collect(raw_request, merge(streams)):
        choices[index].add(out)
    result = [{
        "index": i,
        "message": _message(state, c.text),
        "logprobs": {"content": chat_logprobs(state.token_texts, c.logprobs)} if num_logprobs is not None else None,
        "finish_reason": c.finish_reason,
    } for i, c in enumerate(choices)]
    return JSONResponse({**head, "object": "chat.completion", "choices": result,
                         "usage": usage(len(prompt), sum(c.num_output_tokens for c in choices))})


async def _stream(state: ServerState, body: ChatCompletionRequest, head: dict[str, Any], num_prompt_tokens: int,
                  outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish_reason: str | None = None) -> str:
        return sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]})

    for i in range(body.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    splitters = [ReasoningStream(state.reasoning) if state.reasoning else None for _ in range(body.n)]
    completion_tokens = [0] * body.n
    async for index, out in outputs:
        completion_tokens[index] = out.num_output_tokens
        delta: dict[str, Any] = {}
        splitter = splitters[index]
        if splitter is None:
            if out.new_text:
                delta["content"] = out.new_text
        else:
            reasoning, content = splitter.feed(out.new_text, final=out.finished)
            if reasoning:
                delta["reasoning_content"] = reasoning
            if content:
                delta["content"] = content
        logprobs = None
        if body.logprobs:
            logprobs = {"content": chat_logprobs(state.token_texts, out.new_logprobs)}
        if delta or logprobs:
            yield chunk(index, delta, logprobs)
        if out.finished:
            yield chunk(index, {}, None, out.finish_reason)
    if body.include_usage_chunk:
        yield sse({**head, "choices": [], "usage": usage(num_prompt_tokens, sum(completion_tokens))})
    yield sse("[DONE]")
