"""The engine without HTTP, on a tiny random Mixtral: paged KV cache, chunked prefill and batching against
transformers' own forward of the same checkpoint, continuous batching, admission control under a tiny KV budget,
seeded sampling, stop conditions, abort."""

from __future__ import annotations

import pytest
import torch

from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.model_runner import ModelRunner
from runtime.engine.sampling_params import InvalidRequestError, SamplingParams
from runtime.models import load_model
from runtime.testing.checkpoints import TransformersReference
from runtime.testing.scripted_lm import ScriptedLM

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float32")[0]


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return TransformersReference(tiny_model_dir)


def assert_greedy_under_reference(hf, prompt, generated, tol=1e-3):
    """Each generated token is the reference's arg-max at its position (up to float noise between near-ties)."""
    ref = hf.logprobs(prompt + generated)
    for j, token in enumerate(generated):
        row = ref[len(prompt) - 1 + j]
        assert row[token] >= row.max() - tol, f"token {j}"


def make_engine(model, tokenizer, num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=16,
                max_model_len=128):
    config = EngineConfig(max_model_len=max_model_len, num_blocks=num_blocks, block_size=block_size,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          vocab_size=len(tokenizer))
    runner = ModelRunner(model, num_blocks, block_size, torch.device("cpu"))
    return LLMEngine(runner, tokenizer, config, {tokenizer.eos_token_id})


def run_all(engine):
    """Step until idle; returns {request_id: (token ids, text, finish_reason, prompt_logprobs, logprobs)}."""
    results: dict[str, dict] = {}
    while engine.has_unfinished():
        for out in engine.step():
            r = results.setdefault(out.request_id, {"ids": [], "text": "", "logprobs": [], "prompt_logprobs": None})
            r["ids"] += out.new_token_ids
            r["text"] += out.new_text
            r["logprobs"] += out.new_logprobs
            if out.prompt_logprobs is not None:
                r["prompt_logprobs"] = out.prompt_logprobs
            r["finish_reason"] = out.finish_reason
    return results


PROMPTS = [
    "The quick brown fox jumps over the lazy dog and keeps running far away",
    "Hi",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12",
    "Paris is the capital of",
]


def test_greedy_with_chunked_prefill_and_batching_matches_transformers(model, tokenizer, hf):
    engine = make_engine(model, tokenizer, max_num_batched_tokens=7)  # prompts split into chunks of <= 7 tokens
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY))
    results = run_all(engine)
    for i, p in enumerate(prompts):
        assert len(results[str(i)]["ids"]) == 12 and results[str(i)]["finish_reason"] == "length"
        assert_greedy_under_reference(hf, p, results[str(i)]["ids"])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prompt_and_output_logprobs_match_a_full_sequence_forward(model, tokenizer, hf):
    engine = make_engine(model, tokenizer, max_num_batched_tokens=5)
    prompt = tokenizer.encode(PROMPTS[0])
    engine.add_request("a", prompt, SamplingParams(max_tokens=4, logprobs=3, prompt_logprobs=3, ignore_eos=True,
                                                   **GREEDY))
    engine.add_request("b", tokenizer.encode(PROMPTS[2]), SamplingParams(max_tokens=4, prompt_logprobs=1, **GREEDY))
    r = run_all(engine)["a"]
    full = prompt + r["ids"]
    ref = hf.logprobs(full)
    assert r["prompt_logprobs"][0] is None and len(r["prompt_logprobs"]) == len(prompt)
    for p in range(1, len(prompt)):
        entry = r["prompt_logprobs"][p]
        assert entry.token_id == prompt[p]
        assert entry.logprob == pytest.approx(ref[p - 1, prompt[p]].item(), abs=1e-3)
        top = ref[p - 1].topk(3)
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert [ref[p - 1, t].item() for t, _ in entry.top] == pytest.approx(top.values.tolist(), abs=1e-3)
    for j, entry in enumerate(r["logprobs"]):
        pos = len(prompt) - 1 + j
        assert entry.token_id == full[pos + 1]
        assert entry.logprob == pytest.approx(ref[pos].max().item(), abs=1e-3)  # greedy picks the top token
        assert entry.top[0][0] == entry.token_id


class RecordingRunner(ModelRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[list[int]] = []

    def execute(self, step):
        self.steps.append(list(step.query_lens))
        return super().execute(step)


def test_new_request_joins_the_running_batch(model, tokenizer):
    engine = make_engine(model, tokenizer, max_num_batched_tokens=64)
    engine.runner = RecordingRunner(model, 64, 4, torch.device("cpu"))
    engine.add_request("a", tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=20, ignore_eos=True, **GREEDY))
    for _ in range(3):
        engine.step()
    b_prompt = tokenizer.encode(PROMPTS[3])
    engine.add_request("b", b_prompt, SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY))
    outputs = engine.step()
    # One forward: a's decode token and b's whole prompt; both get a token from it.
    assert engine.runner.steps[-1] == [1, len(b_prompt)]
    assert sorted(o.request_id for o in outputs) == ["a", "b"]
    results = run_all(engine)
    assert results["b"]["finish_reason"] == "length" and results["a"]["finish_reason"] == "length"


def test_tiny_kv_budget_queues_and_preempts_but_every_request_finishes_correctly(model, tokenizer):
    # 12 blocks of 4 tokens = 48 cache slots for 6 requests of 1-15 prompt tokens + 16 output tokens each.
    engine = make_engine(model, tokenizer, num_blocks=12, max_num_batched_tokens=32, max_model_len=48)
    texts = [PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[0][:30], "ok", "1, 2, 3"]
    prompts = [tokenizer.encode(t) for t in texts]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=16, ignore_eos=True, **GREEDY))
    waited = False
    results: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        waited |= engine.num_waiting > 0 and engine.num_running > 0
        for out in engine.step():
            results[out.request_id] += out.new_token_ids
    assert waited
    assert engine.scheduler.num_preemptions > 0
    for i, p in enumerate(prompts):  # each request alone, with all the cache it wants
        alone = make_engine(model, tokenizer, max_model_len=48)
        alone.add_request("solo", p, SamplingParams(max_tokens=16, ignore_eos=True, **GREEDY))
        assert results[str(i)] == run_all(alone)["solo"]["ids"], f"request {i}"
    assert engine.block_manager.num_free_blocks == 12


def test_request_longer_than_the_context_is_refused_with_the_field_named(model, tokenizer):
    engine = make_engine(model, tokenizer, max_model_len=32)
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("x", list(range(20)), SamplingParams(max_tokens=13))
    assert err.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("y", [len(tokenizer) + 5], SamplingParams(max_tokens=1))
    assert err.value.param == "prompt"
    assert not engine.has_unfinished()


def test_max_model_len_beyond_cache_capacity_is_a_config_error():
    with pytest.raises(ValueError, match="KV cache capacity"):
        EngineConfig(max_model_len=100, num_blocks=4, block_size=16)


def test_seeded_sampling_is_reproducible_alone_and_in_a_busy_batch(model, tokenizer):
    prompt = tokenizer.encode(PROMPTS[1])
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = []
    for _ in range(2):
        engine = make_engine(model, tokenizer)
        engine.add_request("s", prompt, params)
        alone.append(run_all(engine)["s"]["ids"])
    busy = make_engine(model, tokenizer)
    busy.add_request("other0", tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=5, temperature=1.0))
    busy.add_request("s", prompt, params)
    busy.add_request("other1", tokenizer.encode(PROMPTS[2]), SamplingParams(max_tokens=15, temperature=1.0))
    in_batch = run_all(busy)["s"]["ids"]
    other_seed = make_engine(model, tokenizer)
    other_seed.add_request("s", prompt, SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50,
                                                       seed=99, ignore_eos=True))
    assert alone[0] == alone[1] == in_batch
    assert run_all(other_seed)["s"]["ids"] != alone[0]


def test_abort_frees_the_request_and_its_blocks(model, tokenizer):
    engine = make_engine(model, tokenizer)
    engine.add_request("a", tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("queued", tokenizer.encode(PROMPTS[1]), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort_request("a")
    engine.abort_request("queued")
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.metrics.finished_requests == {"abort": 2}


# ------------------------------------------------------------------------------ stop conditions (scripted model)


def scripted_engine(tokenizer, prompt, continuation_ids, default_token):
    script = [default_token] * (len(prompt) - 1) + list(continuation_ids)
    model = ScriptedLM(len(tokenizer), script, default_token)
    return make_engine(model, tokenizer, max_model_len=96)


@pytest.mark.parametrize("stop, expected_text", [(("STOP",), "Hello world, "), (("wor", "STOP"), "Hello "),
                                                  (("never",), "Hello world, STOP and more text")])
def test_stop_strings_cut_the_text_and_never_leak_into_deltas(tokenizer, stop, expected_text):
    prompt = tokenizer.encode("Say something:")
    continuation = tokenizer.encode("Hello world, STOP and more text")
    engine = scripted_engine(tokenizer, prompt, continuation, tokenizer.encode(" text")[0])
    engine.add_request("r", prompt, SamplingParams(max_tokens=len(continuation), stop=stop, **GREEDY))
    deltas = []
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.new_text)
            finish = out.finish_reason
    assert "".join(deltas) == expected_text
    assert finish == ("stop" if stop != ("never",) else "length")
    for i in range(len(deltas)):  # no prefix of the stream ever showed a stop string's first characters early
        assert not any(s in "".join(deltas[: i + 1]) for s in stop)


def test_eos_and_stop_token_ids_end_generation_without_their_text(tokenizer):
    prompt = tokenizer.encode("Count:")
    words = tokenizer.encode(" one two three")
    eos = tokenizer.eos_token_id
    engine = scripted_engine(tokenizer, prompt, [*words, eos, *words], words[0])
    engine.add_request("eos", prompt, SamplingParams(max_tokens=20, **GREEDY))
    engine.add_request("ignore", prompt, SamplingParams(max_tokens=len(words) + 2, ignore_eos=True, **GREEDY))
    engine.add_request("tok", prompt, SamplingParams(max_tokens=20, stop_token_ids=(words[1],), **GREEDY))
    r = run_all(engine)
    assert (r["eos"]["text"], r["eos"]["finish_reason"]) == (" one two three", "stop")
    assert r["eos"]["ids"][-1] == eos
    assert r["ignore"]["finish_reason"] == "length" and len(r["ignore"]["ids"]) == len(words) + 2
    assert (r["tok"]["text"], r["tok"]["finish_reason"]) == (" one", "stop")


def test_multibyte_characters_split_across_tokens_are_emitted_whole(tokenizer):
    prompt = tokenizer.encode("Greeting:")
    text = " 你好, wörld ✓"
    continuation = tokenizer.encode(text)
    engine = scripted_engine(tokenizer, prompt, continuation, continuation[0])
    engine.add_request("r", prompt, SamplingParams(max_tokens=len(continuation), **GREEDY))
    deltas = []
    while engine.has_unfinished():
        deltas += [o.new_text for o in engine.step()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
