"""What the chat and completion endpoints share: server state, errors, stream plumbing, usage and logprobs."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from runtime.engine.async_engine import AsyncEngine, EngineDeadError
from runtime.engine.engine import RequestOutput
from runtime.engine.sequence import TokenLogprob
from runtime.server.reasoning import ReasoningFormat
from runtime.server.tokenizer import TokenTexts

# How often a non-streaming request checks whether its client is still there.
_DISCONNECT_POLL_S = 0.5


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: Any
    model_name: str
    max_model_len: int
    api_key: str | None = None
    reasoning: ReasoningFormat | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    token_texts: TokenTexts = field(init=False)

    def __post_init__(self) -> None:
        self.token_texts = TokenTexts(self.tokenizer)


class APIError(Exception):
    """An error answered as OpenAI-style JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 err_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, err_type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientDisconnected(Exception):
    pass


def check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{state.model_name}`.",
                       param="model", code="model_not_found")


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """An SSE response; if the engine dies mid-stream the client gets a final error event, not a cut connection."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except EngineDeadError as exc:
            yield sse(APIError(503, str(exc), err_type="service_unavailable").body())

    return StreamingResponse(guarded(), media_type="text/event-stream")


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as (choice index, output). Leaving early aborts the unfinished ones."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        except Exception as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item.finished:
                remaining -= 1
            yield index, item
    finally:
        for task in tasks:
            task.cancel()  # the cancelled stream's own cleanup aborts its request in the engine


async def collect(raw_request: Request, outputs: AsyncIterator[tuple[int, RequestOutput]]
                  ) -> list[tuple[int, RequestOutput]]:
    """All outputs of a non-streaming request; gives up (and so aborts) when the client goes away."""

    async def gather() -> list[tuple[int, RequestOutput]]:
        return [item async for item in outputs]

    task = asyncio.create_task(gather())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await raw_request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await outputs.aclose()


@dataclass
class Choice:
    """One choice accumulated over a request's outputs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.new_logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.finish_reason = out.finish_reason
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_output_tokens = out.num_output_tokens


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(texts: TokenTexts, token_ids: list[int], entries: list[TokenLogprob | None],
                        start_offset: int, tokens_as_ids: bool = False) -> dict[str, list]:
    """Legacy completions layout; an entry of None (the first prompt token) has no logprob.

    tokens_as_ids (vLLM's return_tokens_as_token_ids): tokens and alternatives named "token_id:N", so that ids
    whose texts coincide (byte fragments, ids past the tokenizer's vocabulary) stay apart; offsets stay textual."""
    name = (lambda t: f"token_id:{t}") if tokens_as_ids else texts.text
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = start_offset
    for token_id, entry in zip(token_ids, entries):
        tokens.append(name(token_id))
        offsets.append(offset)
        offset += len(texts.text(token_id))
        token_logprobs.append(None if entry is None else entry.logprob)
        top_logprobs.append(None if entry is None else {name(t): lp for t, lp in entry.top})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(texts: TokenTexts, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Chat layout: one entry per generated token with its text, bytes and top alternatives."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = texts.text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
