"""Our model families against transformers on the same tiny random weights (fp32): logits and greedy tokens."""

import pytest
import torch

from runtime.models import load_model
from runtime.tools.standalone import greedy_generate, prompt_logits
from runtime.tools.synthetic import write_tiny_hf_model

CASES = {
    "mixtral": ("MixtralForCausalLM", {}),
    "mixtral-sliding": ("MixtralForCausalLM", {"sliding_window": 24}),
    "qwen3moe": ("Qwen3MoeForCausalLM", {}),
    "deepseek-qlora-yarn": ("DeepseekV3ForCausalLM", {}),
    "deepseek-no-qlora": ("DeepseekV3ForCausalLM", {"q_lora_rank": None, "rope_scaling": None, "norm_topk_prob": False}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    path = write_tiny_hf_model(tmp_path_factory.mktemp(request.param), arch, **overrides)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def test_logits_match_transformers(tiny):
    path, hf = tiny
    model, _ = load_model(path, dtype="float32")
    ids = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(1)).tolist()  # beyond yarn's 32
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = prompt_logits(model, ids)
    assert ref.abs().max() > 0.5  # the weights really move the logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # chunked prefill through the paged cache gives the same rows
    torch.testing.assert_close(prompt_logits(model, ids, chunk_size=17), ref, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_match_transformers(tiny):
    path, hf = tiny
    model, _ = load_model(path, dtype="float32")
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24)[0, len(ids):].tolist()
    assert greedy_generate(model, ids, 24) == ref


def test_bfloat16_run_stays_close_to_fp32(tiny):
    path, hf = tiny
    model, _ = load_model(path, dtype="bfloat16")
    ids = list(range(3, 40))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = prompt_logits(model, ids)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    # bf16 can flip a near-tie expert choice at a few positions, so bound the mean error, not the max
    assert (ours - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_batched_and_mixed_steps_match_single_sequences(tiny):
    """Several sequences in one ForwardBatch (different lengths, a decode next to a prefill chunk, padded block
    tables) give each sequence the logits it gets alone."""
    from runtime.model_api import ForwardBatch
    from runtime.model_api import allocate_kv_caches
    from runtime.tools.standalone import prefill_batch

    path, _ = tiny
    model, _ = load_model(path, dtype="float32")
    seqs = [list(range(5, 25)), list(range(40, 43)), list(range(90, 127))]
    alone = [prompt_logits(model, s) for s in seqs]
    for hidden, ref in zip(prefill_batch(model, seqs, block_size=8), alone):
        torch.testing.assert_close(model.compute_logits(hidden), ref, rtol=1e-5, atol=1e-5)

    # sequence 0 decodes its last token while sequence 2 prefills its whole prompt, in scattered blocks
    bs = 8
    caches = allocate_kv_caches(model.kv_cache_spec(), 16, bs)
    table = torch.tensor([[3, 7, 1, 9, 12, -1, -1], [0, 2, 4, 5, 6, 8, 10]])

    def slots(b, positions):
        pos = torch.tensor(positions)
        return table[b, pos // bs] * bs + pos % bs

    def step(parts):  # parts: [(seq index, first position, tokens)]
        batch = ForwardBatch(
            input_ids=torch.tensor([t for _, _, toks in parts for t in toks]),
            positions=torch.tensor([p for _, first, toks in parts for p in range(first, first + len(toks))]),
            query_lens=[len(toks) for _, _, toks in parts],
            context_lens=[first + len(toks) for _, first, toks in parts],
            block_tables=table[[b for b, _, _ in parts]],
            slot_mapping=torch.cat([slots(b, range(first, first + len(toks))) for b, first, toks in parts]),
            kv_caches=caches, block_size=bs,
        )
        return model.compute_logits(model.forward(batch))

    step([(0, 0, seqs[0][:-1])])
    out = step([(0, 19, seqs[0][-1:]), (1, 0, seqs[2])])
    torch.testing.assert_close(out[0], alone[0][-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:], alone[2], rtol=1e-5, atol=1e-5)
