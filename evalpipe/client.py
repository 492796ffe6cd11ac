"""Talking to an OpenAI-compatible endpoint: one `AsyncOpenAI` client per replica, streaming with a stall
timeout inside a total timeout, bounded retries with exponential backoff and jitter, least-in-flight routing.

Retried: HTTP 429 and 5xx, connection failures, streams that stall or break. Not retried: any other 4xx (the
server's message is kept) and the total timeout. A replica that fails `replica_failure_limit` times in a row is
set aside for `replica_cooldown` seconds (doubling while it keeps failing) and the others carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import openai

from evalpipe.config import ClientConfig

log = logging.getLogger(__name__)


@dataclass
class Completion:
    content: str | None = None
    reasoning: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None


@dataclass
class Outcome:
    """What sending one request produced, after retries."""

    completion: Completion | None
    error: str | None
    attempts: int
    latency_s: float
    replica: str | None
    fatal_status: int | None = None  # HTTP status of a non-retried 4xx
    body: dict[str, Any] | None = None  # the parsed answer of a call other than a chat completion


@dataclass
class GenerationParams:
    model: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Replica:
    url: str
    client: openai.AsyncOpenAI
    in_flight: int = 0
    consecutive_failures: int = 0
    set_aside_until: float = 0.0
    cooldown: float = 0.0
    sent: int = 0


def _status_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message:
            return f"HTTP {exc.status_code}: {message}"
    return f"HTTP {exc.status_code}: {exc.message}"


def _retry_after(exc: openai.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after") if exc.response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _reasoning_of(message: dict[str, Any]) -> str | None:
    """`reasoning_content` (DeepSeek, vLLM, SGLang) or `reasoning` (newer vLLM, OpenRouter)."""
    for name in ("reasoning_content", "reasoning"):
        value = message.get(name)
        if isinstance(value, str):
            return value
    return None


def _usage_into(completion: Completion, usage: dict[str, Any]) -> None:
    completion.prompt_tokens = usage.get("prompt_tokens")
    completion.completion_tokens = usage.get("completion_tokens")
    details = usage.get("completion_tokens_details") or {}
    completion.reasoning_tokens = details.get("reasoning_tokens")


def _from_message(body: dict[str, Any]) -> Completion:
    """A non-streamed chat completion body."""
    choices = body.get("choices") or []
    if not choices:
        raise _Retryable("response has no choices")
    message = choices[0].get("message") or {}
    completion = Completion(content=message.get("content"), reasoning=_reasoning_of(message),
                            finish_reason=choices[0].get("finish_reason"))
    _usage_into(completion, body.get("usage") or {})
    return completion


class EndpointPool:
    def __init__(self, urls: list[str], api_key: str | None, settings: ClientConfig):
        self.settings = settings
        timeout = openai.Timeout(None, connect=settings.connect_timeout)
        self.replicas = [
            Replica(url=u, client=openai.AsyncOpenAI(base_url=u, api_key=api_key or "EMPTY", max_retries=0,
                                                     timeout=timeout))
            for u in urls
        ]

    async def aclose(self) -> None:
        for replica in self.replicas:
            await replica.client.close()

    # -- routing --------------------------------------------------------------------------------------------

    def pick(self) -> Replica:
        now = time.monotonic()
        healthy = [r for r in self.replicas if r.set_aside_until <= now]
        if healthy:
            return min(healthy, key=lambda r: (r.in_flight, r.sent))
        return min(self.replicas, key=lambda r: r.set_aside_until)

    def _failed(self, replica: Replica) -> None:
        replica.consecutive_failures += 1
        if len(self.replicas) > 1 and replica.consecutive_failures >= self.settings.replica_failure_limit:
            replica.cooldown = min(max(replica.cooldown * 2, self.settings.replica_cooldown), 600.0)
            replica.set_aside_until = time.monotonic() + replica.cooldown
            replica.consecutive_failures = 0
            log.warning("replica %s set aside for %.0f s after repeated failures", replica.url, replica.cooldown)

    @staticmethod
    def _succeeded(replica: Replica) -> None:
        if replica.cooldown:
            log.info("replica %s is answering again", replica.url)
        replica.consecutive_failures = 0
        replica.cooldown = 0.0

    # -- requests -------------------------------------------------------------------------------------------

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with equal jitter; a server's Retry-After is honoured up to backoff_max."""
        s = self.settings
        ceiling = min(s.backoff_max, s.backoff_initial * 2 ** (attempt - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, s.backoff_max))
        return delay

    async def complete(self, messages: list[dict[str, str]], params: GenerationParams) -> Outcome:
        """One chat completion, with retries; never raises for transport or server failures."""
        return await self._with_retries(lambda replica, deadline: self._chat(replica, messages, params, deadline))

    async def prompt_logprobs(self, model: str, prompt: str | list[int] | list[str], top_k: int) -> Outcome:
        """Teacher-forced scoring of `prompt` (text, token ids, or several texts in one request): /v1/completions
        with echo, top-k logprobs and one generated token. On success `Outcome.body` is the parsed response (one
        choice with `logprobs` per prompt, in order)."""
        return await self._with_retries(lambda replica, deadline: self._echo(replica, model, prompt, top_k, deadline))

    async def _with_retries(self, attempt_once: Callable[[Replica, float], Awaitable[Any]]) -> Outcome:
        start = time.monotonic()
        max_attempts = self.settings.max_retries + 1
        for attempt in range(1, max_attempts + 1):
            replica = self.pick()
            replica.in_flight += 1
            replica.sent += 1
            try:
                deadline = asyncio.get_running_loop().time() + self.settings.total_timeout
                with self._translated_errors(deadline):
                    result = await attempt_once(replica, deadline)
            except _Retryable as exc:
                error = exc
            except _Fatal as exc:
                return Outcome(None, str(exc), attempt, time.monotonic() - start, replica.url, exc.status)
            else:
                self._succeeded(replica)
                completion, body = (result, None) if isinstance(result, Completion) else (None, result)
                return Outcome(completion, None, attempt, time.monotonic() - start, replica.url, body=body)
            finally:
                replica.in_flight -= 1
            self._failed(replica)
            if attempt < max_attempts:
                log.debug("retrying after: %s (attempt %d)", error, attempt)
                await asyncio.sleep(self.backoff(attempt, error.retry_after))
        return Outcome(None, f"{error} (gave up after {max_attempts} attempts)", max_attempts,
                       time.monotonic() - start, replica.url)

    @contextlib.contextmanager
    def _translated_errors(self, deadline: float) -> Iterator[None]:
        """Sort an attempt's failure into retryable (429, 5xx, connection, stall) or fatal (other 4xx, total
        timeout)."""
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            yield
        except TimeoutError:
            if loop.time() >= deadline - 1e-3:
                raise _Fatal(f"total timeout: no complete answer within {s.total_timeout:g} s") from None
            raise _Retryable(f"stalled: no token for {s.stall_timeout:g} s") from None
        except openai.RateLimitError as exc:
            raise _Retryable(_status_message(exc), _retry_after(exc)) from None
        except openai.APIStatusError as exc:
            if exc.status_code >= 500:
                raise _Retryable(_status_message(exc), _retry_after(exc)) from None
            raise _Fatal(_status_message(exc), exc.status_code) from None
        except openai.APIConnectionError as exc:
            raise _Retryable(f"connection error: {exc.__cause__ or exc}") from None
        except (OSError, EOFError, ValueError) as exc:  # ValueError: a body that is not JSON
            raise _Retryable(f"bad or broken response: {type(exc).__name__}: {exc}") from None
        except (_Retryable, _Fatal):
            raise
        except Exception as exc:  # noqa: BLE001 - transport errors of the HTTP library (broken chunked stream...)
            if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2", "h11", "anyio"):
                raise _Retryable(f"connection error: {type(exc).__name__}: {exc}") from None
            raise

    async def _chat(self, replica: Replica, messages: list[dict[str, str]], p: GenerationParams,
                    deadline: float) -> Completion:
        s = self.settings
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = dict(model=p.model, messages=messages, max_tokens=p.max_tokens,
                                      temperature=p.temperature, top_p=p.top_p)
        if p.seed is not None:
            kwargs["seed"] = p.seed
        completions = replica.client.chat.completions
        # Responses are read raw and parsed with json: building SDK objects for every streamed token costs
        # more CPU than the rest of the pipeline (see bench/orchestrator_overhead.py).
        if not s.stream:
            async with asyncio.timeout_at(deadline):
                raw = await completions.with_raw_response.create(**kwargs)
                return _from_message(raw.http_response.json())
        # One timer for the stream: re-armed at every line to min(now + stall_timeout, deadline).
        async with asyncio.timeout_at(min(loop.time() + s.stall_timeout, deadline)) as timer:
            async with completions.with_streaming_response.create(
                **kwargs, stream=True, stream_options={"include_usage": True}
            ) as response:
                return await self._read_stream(response, timer, deadline)

    @staticmethod
    async def _echo(replica: Replica, model: str, prompt: str | list[int] | list[str], top_k: int,
                    deadline: float) -> dict[str, Any]:
        # max_tokens 1, not 0: vLLM, SGLang and lm-eval's local-completions all serve echo with one token.
        async with asyncio.timeout_at(deadline):
            raw = await replica.client.completions.with_raw_response.create(
                model=model, prompt=prompt, max_tokens=1, temperature=0.0, echo=True, logprobs=top_k)
            body = raw.http_response.json()
        expected = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) else 1
        choices = sorted(body.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != expected:
            raise _Fatal(f"the server answered {len(choices)} choices for {expected} prompts")
        for choice in choices:
            logprobs = choice.get("logprobs")
            if not isinstance(logprobs, dict) or not isinstance(logprobs.get("token_logprobs"), list):
                raise _Fatal("the server returned no prompt logprobs for echo=true, logprobs=k (it cannot be probed)")
        body["choices"] = choices
        return body

    async def _read_stream(self, response: Any, timer: asyncio.Timeout, deadline: float) -> Completion:
        loop = asyncio.get_running_loop()
        stall = self.settings.stall_timeout
        completion = Completion()
        content: list[str] = []
        reasoning: list[str] = []
        async for line in response.iter_lines():
            timer.reschedule(min(loop.time() + stall, deadline))
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":  # keep reading to the end of the body so the connection can be reused
                continue
            chunk = json.loads(data)
            if chunk.get("error"):
                raise _Retryable(f"error event in the stream: {chunk['error']}")
            if chunk.get("usage"):
                _usage_into(completion, chunk["usage"])
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    content.append(delta["content"])
                piece = _reasoning_of(delta)
                if piece:
                    reasoning.append(piece)
                if choice.get("finish_reason"):
                    completion.finish_reason = choice["finish_reason"]
        if completion.finish_reason is None:
            raise _Retryable("stream ended without a finish_reason")
        completion.content = "".join(content)
        completion.reasoning = "".join(reasoning) if reasoning else None
        return completion

    async def list_models(self, replica: Replica) -> list[dict[str, Any]]:
        """GET /v1/models on one replica: each model's raw entry (id, max_model_len, ...)."""
        page = await asyncio.wait_for(replica.client.models.list(), self.settings.connect_timeout + 30)
        return [m.model_dump() for m in page.data]
