"""The client against the fake server over real loopback HTTP: retries, timeouts, streaming, replicas."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from evalpipe.client import EndpointPool, GenerationParams
from evalpipe.config import ClientConfig
from evalpipe.testing.fake_server import FakeServer

FAST = dict(backoff_initial=0.01, backoff_max=0.05)
PARAMS = GenerationParams(model="fake-model", max_tokens=64, temperature=0.6, top_p=0.95, seed=1234)
LONG = " ".join(f"w{i}" for i in range(40))


def ask(urls: list[str], text: str, **settings: object):
    async def go():
        pool = EndpointPool(urls, None, ClientConfig(**{**FAST, **settings}))
        try:
            return await pool.complete([{"role": "user", "content": text}], PARAMS)
        finally:
            await pool.aclose()

    return asyncio.run(go())


RULES = [
    {"match": "rate", "replies": [{"status": 429, "retry_after": 0.3}, {"status": 503}, {"content": "fine",
                                  "reasoning": "thought about it"}]},
    {"match": "refuse", "replies": [{"status": 400, "message": "max_tokens is too large"}]},
    {"match": "broken", "replies": [{"status": 500}]},
    {"match": "drop", "replies": [{"content": LONG, "drop": True}, {"content": "after drop"}]},
    {"match": "stall", "replies": [{"content": LONG, "stall_s": 3}, {"content": "after stall"}]},
    {"match": "slow", "replies": [{"content": "late", "delay_s": 2}]},
]


@pytest.fixture(scope="module")
def server():
    with FakeServer({"rules": RULES}) as srv:
        yield srv


@pytest.mark.parametrize("stream", [True, False])
def test_retries_429_and_5xx_with_backoff_honouring_retry_after(server: FakeServer, stream: bool) -> None:
    started = time.monotonic()
    out = ask([server.base_url], f"rate {stream}", stream=stream)
    assert out.error is None and out.attempts == 3
    assert out.completion.content == "fine" and out.completion.reasoning == "thought about it"
    assert out.completion.finish_reason == "stop" and out.completion.completion_tokens == 4
    assert out.completion.reasoning_tokens == 3
    assert time.monotonic() - started >= 0.05  # Retry-After (0.3 s) is capped by backoff_max (0.05 s)


@pytest.mark.parametrize("stream", [True, False])
def test_other_4xx_is_not_retried_and_keeps_the_server_message(server: FakeServer, stream: bool) -> None:
    out = ask([server.base_url], f"refuse {stream}", stream=stream)
    assert out.completion is None and out.attempts == 1 and out.fatal_status == 400
    assert out.error == "HTTP 400: max_tokens is too large"


def test_gives_up_after_bounded_retries(server: FakeServer) -> None:
    out = ask([server.base_url], "broken", max_retries=3)
    assert out.completion is None and out.attempts == 4 and "gave up after 4 attempts" in out.error


@pytest.mark.parametrize("stream", [True, False])
def test_dropped_connection_is_retried(server: FakeServer, stream: bool) -> None:
    out = ask([server.base_url], f"drop {stream}", stream=stream)
    assert out.attempts == 2 and out.completion.content == "after drop"


def test_stalled_stream_is_abandoned_and_retried(server: FakeServer) -> None:
    started = time.monotonic()
    out = ask([server.base_url], "stall", stall_timeout=0.5)
    assert out.attempts == 2 and out.completion.content == "after stall"
    assert time.monotonic() - started < 2.5


def test_total_timeout_is_an_error_without_retry(server: FakeServer) -> None:
    out = ask([server.base_url], "slow", total_timeout=0.4, stall_timeout=10)
    assert out.completion is None and out.attempts == 1 and "total timeout" in out.error


def test_seed_and_sampling_reach_the_server(server: FakeServer) -> None:
    before = len(server.requests)
    out = ask([server.base_url], "anything at all")
    assert out.error is None and out.completion.reasoning  # oracle answers carry reasoning_content
    sent = server.requests[before:]
    assert [r["seed"] for r in sent] == [1234] and sent[0]["stream"] is True and sent[0]["max_tokens"] == 64


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_replicas_share_load_and_a_dead_one_is_set_aside() -> None:
    async def go(urls: list[str], n: int) -> list:
        pool = EndpointPool(urls, None, ClientConfig(**FAST, replica_failure_limit=2, replica_cooldown=60))
        try:
            sem = asyncio.Semaphore(8)

            async def one(i: int):
                async with sem:
                    return await pool.complete([{"role": "user", "content": f"question {i}"}], PARAMS)

            return await asyncio.gather(*(one(i) for i in range(n))), {r.url: r.sent for r in pool.replicas}
        finally:
            await pool.aclose()

    with FakeServer({"latency_s": 0.02}) as a, FakeServer({"latency_s": 0.02}) as b:
        outs, sent = asyncio.run(go([a.base_url, b.base_url], 40))
        assert all(o.error is None for o in outs)
        assert len(a.requests) + len(b.requests) == 40 and min(len(a.requests), len(b.requests)) >= 12
        dead = f"http://127.0.0.1:{_closed_port()}/v1"
        outs, sent = asyncio.run(go([dead, a.base_url], 40))
        assert all(o.error is None for o in outs)
        assert sent[dead] <= 10  # set aside after consecutive failures; the other replica carried the run
        assert any(o.attempts > 1 for o in outs)


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    pool = EndpointPool(["http://127.0.0.1:9/v1"], None, ClientConfig(backoff_initial=1.0, backoff_max=8.0))
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 8.0)]:
        delays = [pool.backoff(attempt, None) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling and len(set(delays)) > 100
    assert pool.backoff(1, 5.0) >= 5.0 and pool.backoff(1, 100.0) <= 8.0
