"""Decode steps as the CUDA-graph runner feeds them (runtime.engine.cuda_graphs): batches padded to a bucket over
static buffers, attention metadata from device context lengths. On CPU the padded static batch runs eagerly (the
capture itself needs a GPU: tests/test_runtime_gpu.py), so the padding, the staging of inputs and the fixed-shape
metadata are checked against the engine's eager step here."""

from __future__ import annotations

import pytest
import torch

from runtime.engine.cuda_graphs import DecodeGraphs, batch_buckets
from runtime.engine.model_runner import ModelRunner
from runtime.models import load_model
from runtime.tools.synthetic import write_tiny_hf_model
from runtime.testing.decode_steps import decode_step_input

BLOCK = 4
NUM_BLOCKS = 48


def test_buckets_cover_every_batch_up_to_the_largest():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(1) == [1]


@pytest.fixture(scope="module", params=["MixtralForCausalLM", "DeepseekV3ForCausalLM"])
def model(request, tmp_path_factory):
    path = write_tiny_hf_model(tmp_path_factory.mktemp(request.param), request.param)
    return load_model(path, dtype="float32")[0]


def test_cpu_runner_stays_eager(model):
    runner = ModelRunner(model, NUM_BLOCKS, BLOCK, torch.device("cpu"), cuda_graph_batch=8, max_model_len=64)
    assert runner.decode_graphs is None
    assert runner.kv_caches[0].shape[0] == NUM_BLOCKS * BLOCK  # no padding block either


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_padded_static_decode_matches_eager_step(model, batch):
    """Bucket 1, 4 and 8 (3 and 5 padded): the same logits as the eager step, and padding rows write nothing
    outside the padding block."""
    runner = ModelRunner(model, NUM_BLOCKS, BLOCK, torch.device("cpu"))
    gen = torch.Generator().manual_seed(batch)
    for cache in runner.kv_caches:
        cache.copy_(torch.randn(cache.shape, generator=gen))
    step = decode_step_input(batch, 9, NUM_BLOCKS - 1, BLOCK, gen, model.config.vocab_size)  # the last block is kept for padding
    eager = runner.execute(step).logits

    graphs = DecodeGraphs(model, runner.kv_caches, BLOCK, max_model_len=32, max_batch=8, pad_block=NUM_BLOCKS - 1,
                          device=torch.device("cpu"))
    bucket = graphs.bucket(step.query_lens, step.block_tables.shape[1])
    assert bucket == {1: 1, 3: 4, 5: 8}[batch]
    before = [cache[: (NUM_BLOCKS - 1) * BLOCK].clone() for cache in runner.kv_caches]
    with torch.inference_mode():
        hidden = graphs.run(step.input_ids, step.positions, step.slot_mapping, step.context_lens, step.block_tables,
                            bucket)
        logits = model.compute_logits(hidden[:batch])
    assert hidden.shape[0] == bucket
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4)
    for old, cache in zip(before, runner.kv_caches):  # the step's own slots were rewritten with the same values
        torch.testing.assert_close(cache[: (NUM_BLOCKS - 1) * BLOCK], old)


def test_steps_the_graphs_cannot_take_run_eagerly(model):
    graphs = DecodeGraphs(model, [], BLOCK, max_model_len=32, max_batch=8, pad_block=0, device=torch.device("cpu"))
    assert graphs.bucket([1] * 9, 2) is None  # above the largest bucket
    assert graphs.bucket([1, 5], 2) is None  # a prompt chunk
    assert graphs.bucket([1], 9) is None  # wider than max_model_len's blocks
    assert graphs.bucket([1] * 8, 8) == 8


def test_enforce_eager_reaches_the_engine_options(tmp_path):
    from types import SimpleNamespace

    from runtime.server.launch import ServeOptions

    options = ServeOptions.from_json(ServeOptions(model_dir=tmp_path, enforce_eager=True).to_json())
    assert options.enforce_eager  # rank processes receive the options as JSON
    assert options.engine_options(SimpleNamespace(max_position_embeddings=64)).enforce_eager
    assert not ServeOptions(model_dir=tmp_path).engine_options(SimpleNamespace(max_position_embeddings=64)).enforce_eager
