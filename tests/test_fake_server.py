"""The fake server is a fair stand-in: deterministic, survives bad requests, speaks the endpoints we use."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from evalpipe.testing.fake_server import FakeServer, text_key
from orch_helpers import REPO, needs_shared_data


def chat(client: httpx.Client, text: str, seed: int = 1, **extra: object) -> httpx.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": text}], "max_tokens": 32, "seed": seed}
    return client.post("/chat/completions", json={**body, **extra})


def test_bad_requests_get_4xx_and_the_server_keeps_serving() -> None:
    with FakeServer() as server, httpx.Client(base_url=server.base_url) as client:
        assert client.post("/chat/completions", content=b"{not json").status_code == 400
        assert client.post("/chat/completions", json=[1, 2]).status_code == 400
        assert client.post("/chat/completions", json={"model": "fake-model", "messages": []}).status_code == 400
        assert chat(client, "hi", max_tokens=-3).status_code == 400
        assert chat(client, "hi", model="nope").status_code == 404
        assert client.get("/no/such/route").status_code == 404
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(b"GARBAGE\r\n\r\n")
        ok = chat(client, "still there?")
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "stop"
        models = client.get("/models").json()["data"]
        assert models[0]["id"] == "fake-model" and models[0]["max_model_len"] == 65536


def test_answers_are_a_function_of_message_and_seed() -> None:
    with FakeServer({"accuracy": 0.5}) as a, FakeServer({"accuracy": 0.5}) as b, \
            httpx.Client(base_url=a.base_url) as ca, httpx.Client(base_url=b.base_url) as cb:
        first = [chat(ca, f"q{i}", seed=s).json()["choices"] for i in range(5) for s in (1, 2)]
        second = [chat(cb, f"q{i}", seed=s).json()["choices"] for i in range(5) for s in (1, 2)]
    assert first == second
    assert [r["key"] for r in a.requests] == [text_key(f"q{i}") for i in range(5) for _ in (1, 2)]


def test_streaming_sends_reasoning_then_content_then_usage() -> None:
    with FakeServer({"reasoning_words": 20, "chunk_words": 4}) as server, httpx.Client(base_url=server.base_url) as c:
        lines = chat(c, "stream me", stream=True, stream_options={"include_usage": True}).text.splitlines()
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert lines[-2] == "data: [DONE]" or lines[-1] == "data: [DONE]"
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert len(reasoning.split()) == 20 and "\\boxed" in content
    assert events[-1]["usage"]["completion_tokens"] == 20 + len(content.split())


def test_text_completions_echo_prompt_logprobs() -> None:
    with FakeServer() as server, httpx.Client(base_url=server.base_url) as client:
        body = {"model": "fake-model", "prompt": "the cat sat", "max_tokens": 3, "echo": True, "logprobs": 2}
        one = client.post("/completions", json=body).json()["choices"][0]
        two = client.post("/completions", json=body).json()["choices"][0]
    assert one == two and one["text"].startswith("the cat sat")
    lp = one["logprobs"]
    assert lp["tokens"][:3] == ["the", " cat", " sat"] and len(lp["tokens"]) == 6
    assert "".join(lp["tokens"]) == one["text"] and lp["text_offset"][:3] == [0, 3, 7]
    assert lp["token_logprobs"][0] is None and all(x <= 0 for x in lp["token_logprobs"][1:])
    assert all(len(top) == 2 for top in lp["top_logprobs"][1:])


@needs_shared_data
def test_smoke_config_runs_end_to_end_against_the_fake_server(tmp_path: Path) -> None:
    from evalpipe.runner import plan_from_config
    from evalpipe.testing.fake_server import Behaviour, answer_key_for_plans

    config = REPO / "configs" / "smoke.yaml"
    _, plans = plan_from_config(str(config))
    behaviour = Behaviour(answer_key=answer_key_for_plans(plans), accuracy=0.7, truncation_rate=0.06,
                          no_answer_rate=0.03, tokens_per_s=300)
    with FakeServer(behaviour) as server:
        env = {**os.environ, "EVALPIPE_OUTPUT_DIR": str(tmp_path), "EVALPIPE_BASE_URL": server.base_url}
        done = subprocess.run([sys.executable, "-m", "evalpipe", "run", str(config), "--no-progress"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "smoke"
    summary = json.loads((run_dir / "candidate" / "summary.json").read_text())
    assert set(summary["tasks"]) == {"aime24", "math500", "gpqa_diamond", "mmlu"}
    assert all(0.3 < t["accuracy"] < 0.95 for t in summary["tasks"].values())
    assert any(t["truncation_rate"] > 0 for t in summary["tasks"].values())
