"""The embedded demo model: SmolLM2-135M-Instruct split into a Mixtral MoE must compute the dense model."""

import pytest
import torch

from runtime.models import load_model
from runtime.tools.demo_model import VARIANTS, demo_model_path, locate_gguf, read_gguf_llama, split_dense_mlp
from runtime.tools.standalone import greedy_generate, prompt_logits


def test_split_mlp_with_uniform_router_equals_the_dense_mlp():
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g), torch.randn(16, 64, generator=g)
    x = torch.randn(5, 16, generator=g)
    silu = torch.nn.functional.silu
    dense = (silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    experts = split_dense_mlp(gate, up, down, 8)
    moe = sum((1 / 8) * ((silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()) for w1, w2, w3 in experts)
    torch.testing.assert_close(moe, dense, rtol=1e-5, atol=1e-5)
    assert all(w1.shape == (8, 16) and w2.shape == (16, 8) for w1, w2, _ in experts)


@pytest.fixture(scope="module")
def dense_reference():
    """transformers' own GGUF loader: the dense SmolLM2, fp32."""
    from transformers import AutoModelForCausalLM

    gguf = locate_gguf()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.mark.slow
def test_gguf_reader_matches_transformers(dense_reference):
    _, state = read_gguf_llama(locate_gguf())
    ref = dense_reference.state_dict()
    assert set(state) == {k for k in ref if k != "lm_head.weight"}  # tied LM head
    for name, tensor in state.items():
        assert torch.equal(tensor, ref[name]), name


@pytest.mark.slow
def test_demo_moe_matches_dense_smollm2(dense_reference):
    model, config = load_model(demo_model_path("bf16"), dtype="float32")
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (8, 8, 192)
    with torch.no_grad():  # the demo stores bf16 weights: compare with the dense model at the same weights
        for p in dense_reference.parameters():
            p.copy_(p.bfloat16().float())
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2]
    with torch.no_grad():
        ref = dense_reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(prompt_logits(model, ids), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_demo_variants_answer_like_the_dense_model(variant):
    from transformers import AutoTokenizer

    path = demo_model_path(variant)
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}],
                                   tokenize=False, add_generation_prompt=True)
    model, _ = load_model(path)
    answer = tok.decode(greedy_generate(model, tok(text, add_special_tokens=False)["input_ids"], 8))
    assert answer.startswith("The capital of France is Paris")
