"""The embedded demo model (SmolLM2-135M-Instruct as a Mixtral MoE) served end to end: a real chat model through
the chat template, the engine and the OpenAI API gives transformers' greedy answer; its W4AFP8 variant too."""

from __future__ import annotations

import openai
import pytest
import torch
from transformers import AutoTokenizer

from runtime.demo_model import demo_model_path
from runtime.models import load_model
from runtime.server.app import create_app
from runtime.server.launch import EngineOptions, build_engine, build_state
from runtime.server.tokenizer import eos_token_ids, render_chat
from runtime.testing.checkpoints import TransformersReference
from runtime.testing.server_thread import serve_in_thread

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]


def serve_demo(variant: str, dtype: str):
    path = demo_model_path(variant)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model, config = load_model(path, dtype=dtype)
    options = EngineOptions(max_model_len=1024, max_num_seqs=4, kv_cache_gib=0.1)
    engine = build_engine(model, tokenizer, eos_token_ids(path, tokenizer), options, torch.device("cpu"),
                          config.vocab_size)
    return path, tokenizer, build_state(engine, "demo")


def test_demo_chat_answer_is_transformers_greedy_answer():
    path, tokenizer, state = serve_demo("bf16", "float32")
    with serve_in_thread(create_app(state)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=24, temperature=0)
    state.engine.shutdown()
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"  # the template's end-of-turn token ended it
    prompt = render_chat(tokenizer, QUESTION, True, {})
    answer = tokenizer.encode(r.choices[0].message.content, add_special_tokens=False)
    ref = TransformersReference(path).logprobs(prompt + answer + [tokenizer.eos_token_id])
    for j, token in enumerate(answer + [tokenizer.eos_token_id]):  # each token, and the stop, is transformers' top
        assert ref[len(prompt) - 1 + j].argmax().item() == token


def test_demo_w4afp8_variant_serves_the_same_answer():
    _, _, state = serve_demo("w4afp8", "bfloat16")
    with serve_in_thread(create_app(state)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=24, temperature=0)
    state.engine.shutdown()
    assert "Paris" in r.choices[0].message.content
