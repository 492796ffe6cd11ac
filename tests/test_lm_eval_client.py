"""lm-eval 0.4.13 as an independent OpenAI-API client: `local-completions` loglikelihood (echo + prompt logprobs,
checked against a cache-free forward of the same tokens) and `local-chat-completions` generation.

lm-eval lives in its own environment (scripts/setup_extra.sh lmeval, run by scripts/test.sh, which exports
EVALPIPE_LMEVAL_PYTHON); without it this module is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess

import openai
import pytest
import yaml

from runtime.models import load_model
from runtime.server.options import EngineOptions
from runtime.testing.checkpoints import TransformersReference
from runtime.testing.local_server import local_server

LMEVAL_PYTHON = os.environ.get("EVALPIPE_LMEVAL_PYTHON", "")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not LMEVAL_PYTHON or not os.path.exists(LMEVAL_PYTHON),
                       reason="lm-eval environment absent: run scripts/setup_extra.sh lmeval (scripts/test.sh does) "
                              "and set EVALPIPE_LMEVAL_PYTHON to its python"),
]

MC_DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "a large city in Europe"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "five"], "answer": 0},
]
GEN_DOCS = [{"question": "What is 2 + 2?", "answer": "4"}, {"question": "Name a colour.", "answer": "blue"}]


def write_task(work, name: str, docs: list[dict], **fields) -> None:
    """A local lm-eval task: its docs as JSONL and a task YAML reading them."""
    data = work / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    card = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}", **fields}
    (work / f"{name}.yaml").write_text(yaml.safe_dump(card))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, tokenizer):
    work = tmp_path_factory.mktemp("lmeval")
    write_task(work, "evalpipe_smoke_mc", MC_DOCS, output_type="multiple_choice", doc_to_choice="{{choices}}",
               metric_list=[{"metric": "acc"}])
    write_task(work, "evalpipe_smoke_gen", GEN_DOCS, output_type="generate_until",
               generation_kwargs={"until": [], "max_gen_toks": 8, "do_sample": False, "temperature": 0.0},
               metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])
    model, _ = load_model(tiny_model_dir, dtype="float32")
    with local_server(model, tokenizer, "tiny", EngineOptions(max_model_len=512, kv_cache_gib=0.01)) as url:
        yield url, work, TransformersReference(tiny_model_dir)


def run_lm_eval(work, model_type: str, model_args: str, task: str, *extra: str) -> list[dict]:
    out = work / f"out-{task}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [LMEVAL_PYTHON, "-m", "lm_eval", "run", "--model", model_type, "--model_args", model_args,
           "--include_path", str(work), "--tasks", task, "--output_path", str(out), "--log_samples", *extra]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples,) = out.glob(f"*/samples_{task}_*.jsonl")
    return [json.loads(line) for line in samples.read_text().splitlines()]


def test_local_completions_loglikelihoods_equal_transformers_forward(setup, tiny_model_dir, tokenizer):
    url, work, reference = setup
    samples = run_lm_eval(work, "local-completions",
                          f"model=tiny,base_url={url}/v1/completions,num_concurrent=2,max_retries=1,"
                          f"tokenizer_backend=huggingface,tokenizer={tiny_model_dir}", "evalpipe_smoke_mc")
    assert len(samples) == len(MC_DOCS)
    checked = 0
    for sample in samples:
        for args, ((loglik, is_greedy),) in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = args["arg_0"], args["arg_1"]
            # lm-eval's own split: context tokens, then the rest of the tokenized whole string.
            ctx = tokenizer.encode(context)
            whole = tokenizer.encode(context + continuation)
            ref = reference.logprobs(whole)
            positions = range(len(ctx), len(whole))
            expected = sum(ref[p - 1, whole[p]].item() for p in positions)
            assert float(loglik) == pytest.approx(expected, abs=1e-3)
            assert (is_greedy == "True") == all(ref[p - 1].argmax().item() == whole[p] for p in positions)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in MC_DOCS)


def test_local_chat_completions_generates_for_every_doc(setup):
    url, work, _ = setup
    samples = run_lm_eval(work, "local-chat-completions",
                          f"model=tiny,base_url={url}/v1/chat/completions,num_concurrent=2,max_retries=1",
                          "evalpipe_smoke_gen", "--apply_chat_template")
    assert len(samples) == len(GEN_DOCS)
    direct = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    for sample in samples:
        (text,) = sample["filtered_resps"]
        messages = [{"role": "user", "content": sample["doc"]["question"]}]
        expected = direct.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        assert text == expected.choices[0].message.content  # lm-eval's request meant the same greedy generation
