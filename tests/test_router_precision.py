"""Router logits in SGLang's precision: model-dtype (bf16) logits, except DeepSeek's dsv3_router_gemm path (fp32
logits for <= 16 tokens at R1 shapes, not in deterministic mode), so near-ties route as SGLang routes them."""

import torch

from runtime.layers.moe import Router, grouped_sigmoid_topk


def router(experts: int, hidden: int, dtype=torch.bfloat16, **kwargs) -> Router:
    r = Router(experts, hidden, dtype, torch.device("cpu"), correction_bias=True, **kwargs)
    g = torch.Generator().manual_seed(0)
    r.weight.data.copy_(torch.randn(experts, hidden, generator=g).to(torch.bfloat16).float() / hidden**0.5)
    r.e_score_correction_bias.data.zero_()
    return r


def test_logits_dtype_follows_sglang():
    x = torch.randn(17, 7168, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    r1 = router(256, 7168, dsv3_router_gemm=True)
    fp32 = torch.nn.functional.linear(x.float(), r1.weight)
    assert r1(x[:16]).dtype == torch.float32 and torch.equal(r1(x[:16]), fp32[:16])  # dsv3_router_gemm
    assert r1(x).dtype == torch.bfloat16 and torch.equal(r1(x), fp32.to(torch.bfloat16))  # F.linear, 17 tokens
    assert r1(x[:16]).to(torch.bfloat16).ne(r1(x[:16])).any()  # the two paths really differ
    assert router(256, 7168, dsv3_router_gemm=False)(x[:1]).dtype == torch.bfloat16  # deterministic mode
    assert router(16, 256, dsv3_router_gemm=True)(x[:1, :256]).dtype == torch.bfloat16  # not an R1 shape
    assert router(16, 256, dtype=torch.float32)(x[:3, :256].float()).dtype == torch.float32  # fp32 model


def test_a_near_tie_routes_as_sglang_does():
    """fp32 logits 1 and 1 + 2^-10 for experts 0 and 1 round to the same bf16 value; expert 0's tiny correction
    bias then decides, as in SGLang's bf16 routing. In fp32, expert 1's larger logit wins."""
    r = router(8, 8)
    r.weight.data.zero_()
    r.weight.data[0, 0], r.weight.data[1, 0] = 1.0, 1.0 + 2**-10
    r.e_score_correction_bias.data[0] = 1e-6
    x = torch.zeros(20, 8, dtype=torch.bfloat16)
    x[:, 0] = 1.0

    def top1(logits):
        return grouped_sigmoid_topk(logits, r.e_score_correction_bias, 1, 1, 1, True)[1][:, 0]

    assert top1(r(x)).eq(0).all()
    assert top1(torch.nn.functional.linear(x.float(), r.weight)).eq(1).all()


def test_an_fp32_checkpoint_router_is_rounded_to_the_model_dtype():
    r = Router(4, 8, torch.bfloat16, torch.device("cpu"))
    w = torch.full((4, 8), 1.0 + 2**-12)
    r.weight.data.copy_(w)
    r.after_loading()
    assert torch.equal(r.weight, torch.ones(4, 8))
