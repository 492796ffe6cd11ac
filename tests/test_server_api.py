"""The OpenAI API through the official `openai` client (streaming included), and every bad request answered with
the right status while the server keeps serving. Servers run in-process on 127.0.0.1 with tiny models."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from runtime.models import load_model
from runtime.server.options import EngineOptions
from runtime.server.tokenizer import render_chat
from runtime.testing.checkpoints import TransformersReference
from runtime.testing.local_server import local_server
from runtime.testing.scripted_lm import ScriptedLM

MAX_MODEL_LEN = 256
API_KEY = "test-key"
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if thinking %}<think>\n{% endif %}{% endif %}"
)
THINK_MESSAGES = [{"role": "user", "content": "What is six times seven?"}]
THINK_OUTPUT = "Six sevens: 42.\n</think>\n\nThe answer is 42."


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tokenizer):
    """(base url, transformers reference) of a server with a tiny random Mixtral in fp32, no API key."""
    model, _ = load_model(tiny_model_dir, dtype="float32")
    options = EngineOptions(max_model_len=MAX_MODEL_LEN, max_num_seqs=16, max_num_batched_tokens=64, kv_cache_gib=0.01)
    with local_server(model, tokenizer, "tiny", options) as url:
        yield url, TransformersReference(tiny_model_dir)


class SlowScriptedLM(ScriptedLM):
    """Takes a few milliseconds per step so that long generations are still running when a client leaves."""

    def forward(self, batch):
        time.sleep(0.002)
        return super().forward(batch)


@pytest.fixture(scope="module")
def scripted(tiny_model_dir):
    """Base URL of a server (API key, deepseek-r1 reasoning parser) whose model answers THINK_MESSAGES with
    THINK_OUTPUT when the template is asked to open the thinking block."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = THINK_TEMPLATE
    prompt = render_chat(tok, THINK_MESSAGES, True, {"thinking": True})
    filler = tok.encode(" filler")[0]
    script = [filler] * (len(prompt) - 1) + tok.encode(THINK_OUTPUT) + [tok.eos_token_id]
    model = SlowScriptedLM(len(tok), script, filler)
    options = EngineOptions(max_model_len=4096, max_num_seqs=8, kv_cache_gib=0.01)
    with local_server(model, tok, "scripted", options, api_key=API_KEY, reasoning_parser="deepseek-r1") as url:
        yield url


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def wait_idle(url: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while metric(url, "evalpipe_num_requests_running") + metric(url, "evalpipe_num_requests_waiting") > 0:
        assert time.monotonic() < deadline, "requests still running"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ conformance


def test_models_lists_the_served_model_with_its_context_length(tiny):
    url, _ = tiny
    models = client(url).models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].max_model_len == MAX_MODEL_LEN
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_chat_streaming_equals_non_streaming_and_reports_usage(tiny, tokenizer):
    url, _ = tiny
    c = client(url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    full = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    prompt_tokens = len(render_chat(tokenizer, messages, True, {}))
    assert full.usage.prompt_tokens == prompt_tokens and full.usage.completion_tokens == 12
    assert full.choices[0].finish_reason == "length" and full.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == prompt_tokens


def test_completion_echo_logprobs_match_a_direct_full_sequence_forward(tiny, tokenizer):
    url, reference = tiny
    prompt = "The teacher forced probe scores every prompt token of this sentence."
    r = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                       logprobs=3)
    ids = tokenizer.encode(prompt)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    generated = tokenizer.encode(r.choices[0].text[len(prompt):], add_special_tokens=False)
    ref = reference.logprobs(ids + generated[:1])
    for p in range(1, len(ids)):
        assert lp.token_logprobs[p] == pytest.approx(ref[p - 1, ids[p]].item(), abs=1e-3)
        top = ref[p - 1].topk(3)
        assert list(lp.top_logprobs[p].values()) == pytest.approx(top.values.tolist(), abs=1e-3)
        assert list(lp.top_logprobs[p])[0] == tokenizer.decode([top.indices[0].item()])
    # The generated token after the prompt is the greedy one, with the model's logprob.
    assert lp.token_logprobs[len(ids)] == pytest.approx(ref[len(ids) - 1].max().item(), abs=1e-3)
    assert lp.text_offset[1] == len(lp.tokens[0])


def test_completion_logprobs_can_name_tokens_by_id(tiny, tokenizer):
    """vLLM's return_tokens_as_token_ids: the same logprobs, tokens and alternatives named "token_id:N"."""
    url, _ = tiny
    kwargs = dict(model="tiny", prompt="Name the tokens by id", max_tokens=3, temperature=0, logprobs=2)
    plain = client(url).completions.create(**kwargs).choices[0]
    by_id = client(url).completions.create(**kwargs, extra_body={"return_tokens_as_token_ids": True}).choices[0]
    ids = [int(t.removeprefix("token_id:")) for t in by_id.logprobs.tokens]
    assert all(t.startswith("token_id:") for t in by_id.logprobs.tokens)
    assert tokenizer.decode(ids) == plain.text == by_id.text
    assert by_id.logprobs.token_logprobs == plain.logprobs.token_logprobs
    for named, texts in zip(by_id.logprobs.top_logprobs, plain.logprobs.top_logprobs):
        assert [tokenizer.decode([int(k.removeprefix("token_id:"))]) for k in named] == list(texts)
        assert list(named.values()) == list(texts.values())
    assert by_id.logprobs.text_offset == plain.logprobs.text_offset


def test_several_prompts_with_echo_are_scored_each_as_alone_for_loglikelihood_cards(tiny):
    # what a log-likelihood card sends: one prompt per option, echo, logprobs 1, max_tokens 1, in one request
    url, _ = tiny
    context = "Question: which colour is the sky?\nAnswer:"
    prompts = [context + option for option in (" blue", " a deep green", " red")]
    together = client(url).completions.create(model="tiny", prompt=prompts, max_tokens=1, temperature=0, echo=True,
                                              logprobs=1)
    assert [c.index for c in together.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, together.choices, strict=True):
        alone = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                               logprobs=1).choices[0]
        assert choice.text.startswith(prompt) and "".join(choice.logprobs.tokens[:-1]) == prompt
        assert choice.logprobs.token_logprobs == pytest.approx(alone.logprobs.token_logprobs, abs=1e-4)


def test_completion_streaming_with_echo_and_logprobs_equals_non_streaming(tiny):
    url, _ = tiny
    c = client(url)
    kwargs = dict(model="tiny", prompt="Stream me please", max_tokens=6, temperature=0, echo=True, logprobs=1)
    full = c.completions.create(**kwargs)
    chunks = list(c.completions.create(stream=True, **kwargs))
    assert "".join(ch.choices[0].text for ch in chunks) == full.choices[0].text
    streamed = [x for ch in chunks if ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    expected = full.choices[0].logprobs.token_logprobs
    assert streamed[0] is None and expected[0] is None
    assert streamed[1:] == pytest.approx(expected[1:])
    assert chunks[-1].choices[0].finish_reason == "length"


def test_token_id_prompts_batches_of_prompts_n_and_seed(tiny, tokenizer):
    url, _ = tiny
    c = client(url)
    ids = tokenizer.encode("Random continuation:")
    kwargs = dict(model="tiny", max_tokens=8, temperature=1.0, seed=11)
    one = c.completions.create(prompt=ids, n=3, **kwargs)
    again = c.completions.create(prompt=ids, n=3, **kwargs)
    assert [ch.index for ch in one.choices] == [0, 1, 2]
    assert [ch.text for ch in one.choices] == [ch.text for ch in again.choices]  # the seed fixes every choice
    assert len({ch.text for ch in one.choices}) > 1  # choices differ from each other
    batch = c.completions.create(prompt=["Alpha", "Beta"], n=2, **kwargs)
    assert [ch.index for ch in batch.choices] == [0, 1, 2, 3]
    assert batch.usage.prompt_tokens == len(tokenizer.encode("Alpha")) + len(tokenizer.encode("Beta"))
    assert batch.usage.completion_tokens == 4 * 8


def test_chat_logprobs_and_stop_parameter(tiny):
    url, _ = tiny
    c = client(url)
    messages = [{"role": "user", "content": "Say anything."}]
    free = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, logprobs=True,
                                     top_logprobs=2)
    content = free.choices[0].logprobs.content
    assert len(content) == 10 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy = top choice
    text = free.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_reasoning_split_with_chat_template_kwargs_whole_and_streamed(scripted):
    c = client(scripted, API_KEY)
    kwargs = dict(model="scripted", messages=THINK_MESSAGES, max_tokens=64, temperature=0,
                  extra_body={"chat_template_kwargs": {"thinking": True}})
    r = c.chat.completions.create(**kwargs)
    message = r.choices[0].message
    assert message.reasoning_content == "Six sevens: 42.\n"
    assert message.content == "\n\nThe answer is 42."
    assert r.choices[0].finish_reason == "stop"
    plain = c.chat.completions.create(**{**kwargs, "extra_body": {}})
    assert plain.usage.prompt_tokens < r.usage.prompt_tokens  # the kwarg reached the template
    reasoning, content = "", ""
    for ch in c.chat.completions.create(stream=True, **kwargs):
        delta = ch.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    assert (reasoning, content) == (message.reasoning_content, message.content)


def test_truncated_reasoning_has_no_content(scripted):
    r = client(scripted, API_KEY).chat.completions.create(
        model="scripted", messages=THINK_MESSAGES, max_tokens=3, temperature=0,
        extra_body={"chat_template_kwargs": {"thinking": True}})
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content is None and r.choices[0].message.reasoning_content


def test_client_disconnect_aborts_streaming_and_blocking_requests(scripted):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "scripted", "prompt": "go", "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    aborted_before = metric(scripted, "evalpipe_requests_total")
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{scripted}/v1/completions", json={**body, "stream": True}, headers=headers) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
        # Leaving the block closed the connection mid-stream.
        wait_idle(scripted)
        with pytest.raises(httpx.ReadTimeout):
            http.post(f"{scripted}/v1/completions", json=body, headers=headers, timeout=0.5)
        wait_idle(scripted)
    text = httpx.get(f"{scripted}/metrics").text
    assert metric(scripted, "evalpipe_requests_total") == aborted_before + 2
    assert re.search(r'^evalpipe_requests_total\{finish_reason="abort"\} 2', text, re.M)
    assert metric(scripted, "evalpipe_kv_cache_usage_ratio") == 0


def test_metrics_count_what_was_served(tiny):
    url, _ = tiny
    wait_idle(url)
    before = {n: metric(url, n) for n in ("evalpipe_generation_tokens_total", "evalpipe_prompt_tokens_total",
                                          "evalpipe_time_to_first_token_seconds_count", "evalpipe_requests_total")}
    r = client(url).completions.create(model="tiny", prompt=["one", "two three"], max_tokens=5, temperature=0)
    after = {n: metric(url, n) for n in before}
    assert after["evalpipe_generation_tokens_total"] - before["evalpipe_generation_tokens_total"] == 10
    assert after["evalpipe_prompt_tokens_total"] - before["evalpipe_prompt_tokens_total"] == r.usage.prompt_tokens
    ttft = "evalpipe_time_to_first_token_seconds_count"
    assert after[ttft] - before[ttft] == 2
    assert after["evalpipe_requests_total"] - before["evalpipe_requests_total"] == 2
    text = httpx.get(f"{url}/metrics").text
    assert "# TYPE evalpipe_inter_token_latency_seconds histogram" in text
    assert 'evalpipe_inter_token_latency_seconds_bucket{le="+Inf"}' in text


# ------------------------------------------------------------------------------------------------ bad requests

LONG = MAX_MODEL_LEN  # tokens: a prompt of this many ids leaves no room for output

BAD_REQUESTS = [
    # (path, raw body or JSON, status, param)
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": [1] * LONG, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [10**9], "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [], "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": {"a": 1}}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [], "max_tokens": 1}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"content": "no role"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": -1},
     400, "temperature"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "top_logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("/v1/chat/completions", "[1, 2", 400, None),
    ("/v1/embeddings", {"model": "tiny", "input": "x"}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS,
                         ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(tiny, path, body, status, param):
    url, _ = tiny
    content = body if isinstance(body, str) else json.dumps(body)
    resp = httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param
    ok = client(url).completions.create(model="tiny", prompt="still alive?", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"


def test_streaming_request_with_bad_parameters_fails_before_the_stream_starts(tiny):
    url, _ = tiny
    with pytest.raises(openai.BadRequestError) as err:
        client(url).completions.create(model="tiny", prompt="x", max_tokens=0, stream=True)
    assert err.value.status_code == 400


@pytest.mark.parametrize("headers, status", [({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                             ({"Authorization": API_KEY}, 401),
                                             ({"Authorization": f"Bearer {API_KEY}"}, 200)])
def test_api_key_is_required_when_configured(scripted, headers, status):
    for method, path, body in (("GET", "/v1/models", None),
                               ("POST", "/v1/completions", {"model": "scripted", "prompt": "x", "max_tokens": 1})):
        resp = httpx.request(method, f"{scripted}{path}", json=body, headers=headers)
        assert resp.status_code == status, resp.text
        if status == 401:
            assert resp.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{scripted}/health").status_code == 200  # health stays open for probes


def test_rejections_are_counted_by_status(tiny):
    url, _ = tiny
    before = metric(url, 'evalpipe_rejected_requests_total{status="400"}')
    resp = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0})
    assert resp.status_code == 400
    assert metric(url, 'evalpipe_rejected_requests_total{status="400"}') == before + 1


class BrokenLM(ScriptedLM):
    """Fails on its fourth step, as a crashed kernel or a lost rank would."""

    calls = 0

    def forward(self, batch):
        self.calls += 1
        if self.calls == 4:
            raise RuntimeError("simulated device failure")
        return super().forward(batch)


def test_a_dead_engine_fails_fast_with_503_and_bad_health(tokenizer):
    model = BrokenLM(len(tokenizer), [], default_token=tokenizer.encode(" a")[0])
    body = {"model": "m", "prompt": "go", "max_tokens": 20, "ignore_eos": True}
    with local_server(model, tokenizer, "m", EngineOptions(max_model_len=128, kv_cache_gib=0.001)) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as resp:
            events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
        assert "choices" in events[0]  # tokens flowed before the failure ...
        assert events[-1]["error"]["type"] == "service_unavailable"  # ... then the stream ended with the error
        assert "simulated device failure" in events[-1]["error"]["message"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "simulated device failure" in health.json()["error"]
        later = httpx.post(f"{url}/v1/completions", json=body)
        assert later.status_code == 503 and later.json()["error"]["type"] == "service_unavailable"
