"""The embedded demo model (SmolLM2-135M-Instruct as a Mixtral MoE) served end to end: a real chat model through
the chat template, the engine and the OpenAI API gives transformers' greedy answer; its W4AFP8 variant too."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from runtime.models import load_model
from runtime.server.options import EngineOptions
from runtime.server.tokenizer import render_chat
from runtime.testing.checkpoints import TransformersReference
from runtime.testing.local_server import local_server
from runtime.tools.demo_model import demo_model_path

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]


def ask_demo(variant: str, dtype: str):
    """The demo variant's greedy answer to QUESTION through the API; also returns its tokenizer."""
    path = demo_model_path(variant)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model, _ = load_model(path, dtype=dtype)
    with local_server(model, tokenizer, "demo", EngineOptions(max_model_len=1024, kv_cache_gib=0.1)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        return client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=24, temperature=0), tokenizer


def test_demo_chat_answer_is_transformers_greedy_answer():
    r, tokenizer = ask_demo("bf16", "float32")
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"  # the template's end-of-turn token ended it
    prompt = render_chat(tokenizer, QUESTION, True, {})
    answer = tokenizer.encode(r.choices[0].message.content, add_special_tokens=False) + [tokenizer.eos_token_id]
    ref = TransformersReference(demo_model_path("bf16")).logprobs(prompt + answer)
    for j, token in enumerate(answer):  # each token, and the stop, is transformers' top choice
        assert ref[len(prompt) - 1 + j].argmax().item() == token


def test_demo_w4afp8_variant_serves_the_same_answer():
    r, _ = ask_demo("w4afp8", "bfloat16")
    assert "Paris" in r.choices[0].message.content
