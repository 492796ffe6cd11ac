"""A deterministic fake OpenAI-compatible server over real HTTP on 127.0.0.1 (tests, bench, quickstart).

Endpoints: GET /v1/models (with max_model_len), POST /v1/chat/completions (streaming or not), POST /v1/completions
(text, `echo`, deterministic top-k `logprobs`; a list of prompts gets one choice each), GET /health. Every answer is a pure function of (user message,
seed, attempt number), so two runs of the same plan get the same responses.

How it answers a chat request, first match wins:
1. `rules`: a regex on the user message picks a list of scripted replies; the n-th attempt of the same
   (message, seed) gets the n-th reply (the last one repeats). Replies can carry an HTTP error status, a delay,
   a stall after the first token, a dropped connection, reasoning_content, any finish_reason.
2. `answer_key` (user-message key -> gold): answers correctly with a per-question probability whose mean is
   `accuracy`, otherwise wrongly; `truncation_rate` and `no_answer_rate` carve out truncated and unanswered
   responses. Reasoning goes to `reasoning_content`, into `<think>` tags in the content, or nowhere.
3. Anything else gets a plausible but uninformed answer.

A /v1/completions request whose prompts are an answer-key question followed by each option's continuation (a
log-likelihood card) is answered by the same oracle: the option it picks gets the highest log-likelihood.

Run in-process with `FakeServer(behaviour)` (a context manager, serving from a thread), or as a process:
`python -m evalpipe.testing.fake_server --behaviour FILE.json [--port-file F]`. With `--answer-key-for CONFIG`
it builds the answer key from a run config's plan (used by scripts/quickstart.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Reasoning = Literal["field", "think_tags", "none"]


class Reply(BaseModel):
    """One scripted response."""

    model_config = ConfigDict(extra="forbid")

    content: str | None = ""
    reasoning: str | None = None
    finish_reason: str = "stop"
    status: int = 200
    message: str = "scripted failure"
    retry_after: float | None = None
    delay_s: float = 0.0
    stall_s: float = 0.0
    drop: bool = Field(default=False, description="close the connection after the first chunk (or before replying)")
    completion_tokens: int | None = None


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    match: str
    replies: list[Reply] = Field(min_length=1)


class AnswerKeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gold: str
    answer_type: Literal["math", "integer", "multiple_choice"]
    letters: str = ""
    question: str = Field(default="", description="question identity: its difficulty does not depend on the sample")
    continuation_keys: list[str] = Field(
        default_factory=list, description="log-likelihood cards: text_key(user message + continuation) per option")
    context_chars: int = Field(default=0, description="log-likelihood cards: length of the user message")


class Behaviour(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="fake-model", description="the one model served")
    max_model_len: int | None = 65536
    accuracy: float = Field(default=0.7, ge=0.0, le=1.0, description="mean chance of a correct oracle answer")
    truncation_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="share of answers cut at max_tokens")
    no_answer_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="share of answers with no final answer")
    reasoning: Reasoning = Field(default="field", description="where thinking goes: field, think_tags or none")
    reasoning_words: int = Field(default=24, ge=0, description="length of the reasoning in each answer")
    chunk_words: int = Field(default=8, ge=1, description="words per streamed chunk")
    latency_s: float = Field(default=0.0, ge=0.0, description="delay before every response")
    tokens_per_s: float = Field(default=0.0, ge=0.0, description="pace of streamed tokens; 0 streams at once")
    logprob_noise: float = Field(default=0.0, ge=0.0, description="shift of completion logprobs (another model)")
    rules: list[Rule] = Field(default_factory=list)
    answer_key: dict[str, AnswerKeyEntry] = Field(default_factory=dict)
    log_path: str | None = Field(default=None, description="append one JSON line per request received")


def text_key(text: str) -> str:
    """Key of a user message in `answer_key` and in the request log."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _unit(*parts: object) -> float:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _words(n: int, salt: str) -> str:
    vocab = ("so", "then", "we", "check", "the", "sum", "again", "carefully", "note", "that", "it", "holds")
    return " ".join(vocab[int(_unit(salt, i) * len(vocab))] for i in range(n))


def _count_tokens(text: str | None) -> int:
    return len(text.split()) if text else 0


def _user_text(messages: list[dict[str, Any]]) -> str:
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    last = users[-1] if users else ""
    return last if isinstance(last, str) else json.dumps(last)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


class FakeServer:
    def __init__(self, behaviour: Behaviour | dict[str, Any] | None = None, host: str = "127.0.0.1", port: int = 0):
        self.behaviour = behaviour if isinstance(behaviour, Behaviour) else Behaviour.model_validate(behaviour or {})
        self.host, self.port = host, port
        self.requests: list[dict[str, Any]] = []
        self._attempts: dict[tuple[str, Any], int] = {}
        self._rules = [(re.compile(r.match), r) for r in self.behaviour.rules]
        # text_key(context + continuation) -> (the question's key, its entry, option index)
        self._option_index = {ck: (key, entry, i) for key, entry in self.behaviour.answer_key.items()
                              for i, ck in enumerate(entry.continuation_keys)}
        self._log = open(self.behaviour.log_path, "a", encoding="utf-8") if self.behaviour.log_path else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def serve(self, ready: threading.Event | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._connection, self.host, self.port, limit=2**22)
        self.port = self._server.sockets[0].getsockname()[1]
        if ready:
            ready.set()
        async with self._server:
            with contextlib.suppress(asyncio.CancelledError):
                await self._server.serve_forever()

    def start(self) -> FakeServer:
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self.serve(ready)), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake server did not start")
        return self

    async def shutdown(self) -> None:
        if self._server:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()

    def stop(self) -> None:
        if self._loop and self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.shutdown(), self._loop).result(5)
        if self._thread:
            self._thread.join(10)
        if self._log:
            self._log.close()

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP -----------------------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        self._handlers.add(handler)
        try:
            while True:
                request_line = await reader.readline()
                if not request_line.strip():
                    break
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await self._read_body(reader, headers)
                if not await self._dispatch(method, path.split("?", 1)[0], body, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(handler)
            if not writer.transport.is_closing():
                writer.close()

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while (size := int((await reader.readline()).strip() or b"0", 16)) > 0:
                body += await reader.readexactly(size)
                await reader.readline()
            await reader.readline()
            return body
        return await reader.readexactly(int(headers.get("content-length", "0")))

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter, status: int, payload: Any, extra: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(payload).encode()
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Connection: keep-alive"]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()

    async def _send_error(self, writer: asyncio.StreamWriter, err: _HTTPError) -> None:
        extra = {"Retry-After": f"{err.retry_after:g}"} if err.retry_after is not None else None
        payload = {"error": {"message": err.message, "type": "fake_error", "code": err.status}}
        await self._send(writer, err.status, payload, extra)

    async def _dispatch(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close."""
        try:
            if path in ("/health", "/v1/health") and method == "GET":
                await self._send(writer, 200, {"status": "ok"})
            elif path == "/v1/models" and method == "GET":
                await self._send(writer, 200, self._models())
            elif path == "/v1/chat/completions" and method == "POST":
                return await self._chat(self._json(body), writer)
            elif path == "/v1/completions" and method == "POST":
                await self._send(writer, 200, self._completions(self._json(body)))
            else:
                raise _HTTPError(404, f"no route {method} {path}")
        except _HTTPError as err:
            await self._send_error(writer, err)
        return True

    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _HTTPError(400, f"request body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise _HTTPError(400, "request body must be a JSON object")
        return data

    def _models(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": self.behaviour.model, "object": "model", "owned_by": "evalpipe-fake"}
        if self.behaviour.max_model_len:
            entry["max_model_len"] = self.behaviour.max_model_len
        return {"object": "list", "data": [entry]}

    def _check_request(self, request: dict[str, Any], prompt_tokens: int) -> int:
        if request.get("model") != self.behaviour.model:
            raise _HTTPError(404, f"The model `{request.get('model')}` does not exist.")
        max_tokens = request.get("max_tokens") or request.get("max_completion_tokens") or 16
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise _HTTPError(400, "max_tokens must be a positive integer")
        limit = self.behaviour.max_model_len
        if limit and prompt_tokens + max_tokens > limit:
            raise _HTTPError(
                400, f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                f"{max_tokens} in the completion)."
            )
        return max_tokens

    # -- chat -----------------------------------------------------------------------------------------------

    async def _chat(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _HTTPError(400, "messages must be a non-empty list")
        user = _user_text(messages)
        seed = request.get("seed")
        key = text_key(user)
        attempt = self._attempts.get((key, seed), 0)
        self._attempts[(key, seed)] = attempt + 1
        self._record({"key": key, "seed": seed, "attempt": attempt, "max_tokens": request.get("max_tokens"),
                      "stream": bool(request.get("stream")), "t": time.time()})
        prompt_tokens = sum(_count_tokens(m.get("content") if isinstance(m, dict) else "") for m in messages)
        max_tokens = self._check_request(request, prompt_tokens)
        reply = self._reply(user, key, seed, attempt, max_tokens)
        delay = self.behaviour.latency_s + reply.delay_s
        if delay:
            await asyncio.sleep(delay)
        if reply.status != 200:
            raise _HTTPError(reply.status, reply.message, reply.retry_after)
        if reply.drop and not request.get("stream"):
            writer.transport.abort()
            return False
        completion = reply.completion_tokens
        if completion is None:
            completion = _count_tokens(reply.content) + _count_tokens(reply.reasoning)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion}
        if reply.reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": _count_tokens(reply.reasoning)}
        if request.get("stream"):
            include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
            return await self._stream(writer, reply, usage if include_usage else None)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.reasoning is not None:
            message["reasoning_content"] = reply.reasoning
        payload = {"id": f"chatcmpl-{key}", "object": "chat.completion", "created": int(time.time()),
                   "model": self.behaviour.model, "usage": usage,
                   "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}]}
        await self._send(writer, 200, payload)
        return True

    def _record(self, entry: dict[str, Any]) -> None:
        self.requests.append(entry)
        if self._log:
            self._log.write(json.dumps(entry) + "\n")
            self._log.flush()

    async def _stream(self, writer: asyncio.StreamWriter, reply: Reply, usage: dict[str, Any] | None) -> bool:
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n" \
               "Connection: keep-alive\r\n\r\n"
        writer.write(head.encode())
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.behaviour.model}

        def event(payload: Any) -> bytes:
            data = f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        def delta(d: dict[str, Any], finish: str | None = None) -> bytes:
            return event({**base, "choices": [{"index": 0, "delta": d, "finish_reason": finish}]})

        pieces: list[tuple[str, str]] = []
        n = self.behaviour.chunk_words
        for field, text in (("reasoning_content", reply.reasoning), ("content", reply.content)):
            words = text.split(" ") if text else []
            pieces += [(field, " ".join(words[i : i + n]) + (" " if i + n < len(words) else ""))
                       for i in range(0, len(words), n)]
        writer.write(delta({"role": "assistant", "content": ""}))
        pace = n / self.behaviour.tokens_per_s if self.behaviour.tokens_per_s else 0.0
        timed = pace or reply.stall_s or reply.drop  # otherwise the whole stream goes out in one write
        for i, (field, text) in enumerate(pieces):
            if timed:
                await writer.drain()
            if i == 1 and reply.drop:
                writer.transport.abort()
                return False
            if i == 1 and reply.stall_s:
                await asyncio.sleep(reply.stall_s)
            elif pace:
                await asyncio.sleep(pace)
            writer.write(delta({field: text}))
        if reply.drop:  # fewer than two pieces: drop before the end
            writer.transport.abort()
            return False
        writer.write(delta({}, reply.finish_reason))
        if usage is not None:
            writer.write(event({**base, "choices": [], "usage": usage}))
        writer.write(event("[DONE]") + b"0\r\n\r\n")
        await writer.drain()
        return True

    def _reply(self, user: str, key: str, seed: Any, attempt: int, max_tokens: int) -> Reply:
        for pattern, rule in self._rules:
            if pattern.search(user):
                return rule.replies[min(attempt, len(rule.replies) - 1)]
        entry = self.behaviour.answer_key.get(key)
        return self._oracle_reply(entry, key, seed, max_tokens)

    def _oracle_answer(self, entry: AnswerKeyEntry, key: str, seed: Any) -> str:
        # Per-question success probability p = v ** ((1 - a) / a) has mean a over questions (v uniform).
        a = min(max(self.behaviour.accuracy, 1e-9), 1.0)
        p_question = _unit("difficulty", entry.question or key) ** ((1 - a) / a)
        correct = _unit("correct", key, seed) < p_question
        return entry.gold if correct else self._wrong(entry, key, seed)

    def _oracle_reply(self, entry: AnswerKeyEntry | None, key: str, seed: Any, max_tokens: int) -> Reply:
        b = self.behaviour
        u = _unit("outcome", key, seed)
        thinking = _words(b.reasoning_words, f"{key}:{seed}")
        if u < b.truncation_rate:
            budget = max(1, min(max_tokens, 4096))
            ramble = _words(budget, f"{key}:{seed}:long")
            if b.reasoning == "field":
                return Reply(content=None, reasoning=ramble, finish_reason="length", completion_tokens=max_tokens)
            prefix = "<think>" if b.reasoning == "think_tags" else ""
            return Reply(content=prefix + ramble, finish_reason="length", completion_tokens=max_tokens)
        if u < b.truncation_rate + b.no_answer_rate:
            return self._wrap(thinking, "I am not sure how to finish this one.")
        if entry is None:
            guess = _unit("guess", key, seed)
            return self._wrap(thinking, f"The answer is \\boxed{{{int(guess * 1000)}}}.")
        answer = self._oracle_answer(entry, key, seed)
        if entry.answer_type == "multiple_choice":
            return self._wrap(thinking, f"Weighing the options.\nAnswer: {answer}")
        return self._wrap(thinking, f"So the final answer is $\\boxed{{{answer}}}$.")

    def _wrap(self, thinking: str, answer: str) -> Reply:
        if self.behaviour.reasoning == "field":
            return Reply(content=answer, reasoning=thinking)
        if self.behaviour.reasoning == "think_tags":
            return Reply(content=f"<think>{thinking}</think>\n{answer}")
        return Reply(content=answer)

    @staticmethod
    def _wrong(entry: AnswerKeyEntry, key: str, seed: Any) -> str:
        if entry.answer_type == "multiple_choice":
            others = [c for c in entry.letters if c != entry.gold] or ["Z"]
            return others[int(_unit("wrong", key, seed) * len(others))]
        if entry.answer_type == "integer":
            return str((int(entry.gold) + 1 + int(_unit("wrong", key, seed) * 98)) % 1000)
        return f"{entry.gold}+{1 + int(_unit('wrong', key, seed) * 9)}"

    # -- text completions -----------------------------------------------------------------------------------

    def _completions(self, request: dict[str, Any]) -> dict[str, Any]:
        prompt = request.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return self._scored_prompts(request, prompt)
        if not isinstance(prompt, str):
            raise _HTTPError(400, "prompt must be a string or a list of strings")
        prompt_tokens = _count_tokens(prompt)
        max_tokens = self._check_request(request, prompt_tokens)
        seed = request.get("seed")
        self._record({"key": text_key(prompt), "seed": seed, "endpoint": "completions", "t": time.time()})
        generated = _words(min(max_tokens, 64), f"{text_key(prompt)}:{seed}").split(" ")[:max_tokens]
        words = (prompt.split() if request.get("echo") else []) + generated
        tokens = [word if i == 0 else " " + word for i, word in enumerate(words)]  # concatenated: the text
        text = "".join(tokens)
        choice: dict[str, Any] = {"index": 0, "text": text,
                                  "finish_reason": "length" if len(generated) == max_tokens else "stop"}
        top_k = request.get("logprobs")
        if isinstance(top_k, int) and top_k >= 0:
            choice["logprobs"] = self._logprobs(tokens, top_k, self.behaviour.logprob_noise)
        return {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
                "model": self.behaviour.model, "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(generated),
                          "total_tokens": prompt_tokens + len(generated)}}

    def _scored_prompts(self, request: dict[str, Any], prompts: list[str]) -> dict[str, Any]:
        """Several prompts echoed with their logprobs, one choice each, plus one generated token. Tokens are
        whitespace-led words, so they concatenate to the prompt exactly and `text_offset` is faithful. The
        options of an answer-key question: the oracle's pick scores -0.1 per continuation token, the others less."""
        max_tokens = self._check_request(request, max(_count_tokens(p) for p in prompts))
        if not request.get("echo"):
            raise _HTTPError(400, "a list of prompts is served with echo only")
        top_k = request.get("logprobs")
        top_k = top_k if isinstance(top_k, int) and top_k >= 0 else 0
        choices = []
        for index, prompt in enumerate(prompts):
            self._record({"key": text_key(prompt), "seed": request.get("seed"), "endpoint": "completions",
                          "t": time.time()})
            tokens = re.findall(r"\s*\S+", prompt) + [" so"][:max_tokens]
            logprobs = self._logprobs(tokens, top_k, self.behaviour.logprob_noise)
            found = self._option_index.get(text_key(prompt))
            if found:
                key, entry, option = found
                picked = entry.letters.index(self._oracle_answer(entry, key, None))
                for i, offset in enumerate(logprobs["text_offset"][:-1]):
                    if offset >= entry.context_chars:
                        logprobs["token_logprobs"][i] = -0.1 if option == picked else -3.0 - _unit("lp", key, i)
            choices.append({"index": index, "text": "".join(tokens), "logprobs": logprobs, "finish_reason": "length"})
        prompt_tokens = sum(_count_tokens(p) for p in prompts)
        return {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
                "model": self.behaviour.model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(prompts),
                          "total_tokens": prompt_tokens + len(prompts)}}

    @staticmethod
    def _logprobs(tokens: list[str], top_k: int, noise: float) -> dict[str, Any]:
        """A token's logprob is a function of (position, token); its alternatives trail it. `noise` shifts every
        value by up to +-noise (deterministically), as a slightly different model would."""
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []

        def shifted(value: float, *salt: object) -> float:
            return min(0.0, value + noise * (2 * _unit("noise", *salt) - 1)) if noise else value

        for i, token in enumerate(tokens):
            if i == 0:
                token_logprobs.append(None)
                top.append(None)
                continue
            lp = shifted(-0.2 - 1.5 * _unit("lp", i, token), i, token)
            token_logprobs.append(lp)
            alternatives = {token: lp}
            for j in range(max(0, top_k - 1)):
                alternatives[f"{token}~{j}"] = shifted(-2.0 - j, i, token, j)
            top.append(dict(list(alternatives.items())[: max(top_k, 1)]))
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def answer_key_for_plans(plans: list[Any]) -> dict[str, AnswerKeyEntry]:
    """Answer key of every request of some task plans (evalpipe.task_plan.TaskPlan), for oracle answers."""
    key: dict[str, AnswerKeyEntry] = {}
    for plan in plans:
        for r in plan.requests:
            user = next(m["content"] for m in reversed(r.messages) if m["role"] == "user")
            key[text_key(user)] = AnswerKeyEntry(
                gold=r.gold, answer_type=plan.card.scoring.answer_type, letters=r.letters,
                question=f"{r.task}/{r.question_id}", context_chars=len(user),
                continuation_keys=[text_key(user + c) for c in r.continuations])
    return key


def _main() -> None:
    parser = argparse.ArgumentParser(description="Deterministic fake OpenAI server on 127.0.0.1 (testing only).")
    parser.add_argument("--behaviour", help="JSON file with a Behaviour")
    parser.add_argument("--answer-key-for", help="run config whose plan's answers the server should know")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", help="write the chosen port here once listening")
    knobs = ("model", "accuracy", "truncation_rate", "no_answer_rate", "tokens_per_s", "latency_s", "reasoning",
             "reasoning_words", "chunk_words", "logprob_noise")
    for name in knobs:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, help=Behaviour.model_fields[name].description)
    args = parser.parse_args()
    data = json.loads(Path(args.behaviour).read_text()) if args.behaviour else {}
    data.update({k: getattr(args, k) for k in knobs if getattr(args, k) is not None})
    behaviour = Behaviour.model_validate(data)
    if args.answer_key_for:
        from evalpipe.runner import plan_from_config

        _, plans = plan_from_config(args.answer_key_for)
        key = answer_key_for_plans(plans)
        behaviour = behaviour.model_copy(update={"answer_key": {**key, **behaviour.answer_key}})
    server = FakeServer(behaviour, port=args.port)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, main_task.cancel)
        ready = threading.Event()
        serving = asyncio.create_task(server.serve(ready))
        while not ready.is_set():
            await asyncio.sleep(0.01)
        if args.port_file:
            Path(args.port_file).write_text(str(server.port))
        print(f"fake OpenAI server listening on {server.base_url}", flush=True)
        try:
            await serving
        except asyncio.CancelledError:
            serving.cancel()

    with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    _main()
