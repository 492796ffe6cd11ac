"""The server under load, on 127.0.0.1 with a tiny model and a KV cache far smaller than the load needs:
256 concurrent streaming requests of mixed lengths, clients that leave mid-stream, and malformed and oversized
requests mixed in. Everything well-formed completes, every bad request gets its 400, the KV cache empties
afterwards and /metrics adds up to what the clients saw."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import httpx
import pytest

from runtime.models import load_model
from runtime.server.options import EngineOptions
from runtime.testing.local_server import local_server

MAX_MODEL_LEN = 512
STREAMS = 256
LEAVERS = 16
FIRST_TOKEN_LEAVE_MAX_TOKENS = 400  # leavers ask for more than they can get before they go


def metrics(url: str) -> dict[str, float]:
    """Prometheus samples by name (labelled samples summed), plus 'name{label}' entries for labelled ones."""
    out: dict[str, float] = {}
    for name, labels, value in re.findall(r"^(\w+)(\{[^}]*\})? (\S+)$", httpx.get(f"{url}/metrics").text, re.M):
        out[name] = out.get(name, 0.0) + float(value)
        if labels:
            out[name + labels] = float(value)
    return out


async def stream_completion(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 1.0, "seed": len(prompt)}
    chunks, usage, finish = 0, None, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                chunks += 1
                finish = choice.get("finish_reason") or finish
    return {"prompt": len(prompt), "max_tokens": max_tokens, "usage": usage, "finish": finish, "chunks": chunks}


async def leave_after_first_token(client: httpx.AsyncClient, url: str, prompt: list[int]) -> int:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": FIRST_TOKEN_LEAVE_MAX_TOKENS - len(prompt),
            "ignore_eos": True, "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                return len(prompt)  # closing the stream here disconnects
    raise AssertionError("the stream ended before its first token")


BAD = [
    ("{not json", "malformed"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "many"}), "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": [1, 2], "max_tokens": MAX_MODEL_LEN}), "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": [7] * MAX_MODEL_LEN, "max_tokens": 1}), "prompt"),
    (json.dumps({"model": "tiny", "prompt": [7] * 300_000, "max_tokens": 1}), "prompt"),  # ~2 MB body
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": -1}), "temperature"),
]


async def send_bad(client: httpx.AsyncClient, url: str, content: str) -> tuple[int, dict]:
    resp = await client.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"})
    return resp.status_code, resp.json()


async def load(url: str):
    rng = random.Random(0)
    streams = [([rng.randrange(3, 250) for _ in range(rng.choice([1, rng.randint(2, 40), rng.randint(41, 300)]))],
                rng.randint(1, 40)) for _ in range(STREAMS)]
    leavers = [[rng.randrange(3, 250) for _ in range(rng.randint(1, 60))] for _ in range(LEAVERS)]
    bad = [BAD[i % len(BAD)][0] for i in range(4 * len(BAD))]
    limits = httpx.Limits(max_connections=STREAMS + LEAVERS + len(bad))
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        jobs = ([stream_completion(client, url, p, n) for p, n in streams]
                + [leave_after_first_token(client, url, p) for p in leavers]
                + [send_bad(client, url, b) for b in bad])
        order = list(range(len(jobs)))
        rng.shuffle(order)
        results = await asyncio.gather(*(jobs[i] for i in order))
    by_job = [None] * len(jobs)
    for i, result in zip(order, results):
        by_job[i] = result
    return streams, by_job[:STREAMS], by_job[STREAMS : STREAMS + LEAVERS], by_job[STREAMS + LEAVERS :]


@pytest.mark.slow
def test_concurrent_streams_leavers_and_bad_requests(tiny_model_dir, tokenizer):
    model, _ = load_model(tiny_model_dir, dtype="bfloat16")
    # 1 MiB of KV cache: 4096 token slots for a load that would need ~30k at once, so requests queue and preempt
    options = EngineOptions(max_model_len=MAX_MODEL_LEN, max_num_seqs=64, max_num_batched_tokens=512,
                            kv_cache_gib=1 / 1024)
    with local_server(model, tokenizer, "tiny", options) as url:
        start = time.monotonic()
        streams, done, left, bad = asyncio.run(load(url))
        elapsed = time.monotonic() - start
        for (prompt, max_tokens), result in zip(streams, done):
            assert result["finish"] == "length" and 1 <= result["chunks"] <= max_tokens  # held-back text merges
            assert result["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": max_tokens,
                                       "total_tokens": len(prompt) + max_tokens}
        for status, body in bad:
            assert status == 400 and body["error"]["message"]
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        deadline = time.monotonic() + 10  # the leavers' aborts land at the next step boundary
        while (m := metrics(url))["evalpipe_num_requests_running"] + m["evalpipe_num_requests_waiting"] > 0:
            assert time.monotonic() < deadline, m
            time.sleep(0.05)
        assert m["evalpipe_kv_cache_usage_ratio"] == 0.0  # every block back
        assert m["evalpipe_num_preemptions_total"] > 0  # the cache really ran out
        assert m['evalpipe_requests_total{finish_reason="length"}'] == STREAMS
        assert m['evalpipe_requests_total{finish_reason="abort"}'] == LEAVERS
        assert m['evalpipe_rejected_requests_total{status="400"}'] == len(bad)
        served = sum(n for _, n in streams)
        # the leavers generated at least their first token and at most what they asked for
        assert served + LEAVERS <= m["evalpipe_generation_tokens_total"] <= served + LEAVERS * FIRST_TOKEN_LEAVE_MAX_TOKENS
        assert m["evalpipe_prompt_tokens_total"] == sum(len(p) for p, _ in streams) + sum(left)
        assert m["evalpipe_time_to_first_token_seconds_count"] == STREAMS + LEAVERS
        assert m["evalpipe_e2e_request_latency_seconds_count"] == STREAMS + LEAVERS
    print(f"{STREAMS} streams + {LEAVERS} leavers + {len(bad)} bad requests in {elapsed:.1f}s")
