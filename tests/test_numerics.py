"""The reference numerics themselves: packing, quantizers and the W4AFP8 GEMM against a plain fp32 matmul."""

import torch

from runtime.quant import numerics as nx


def test_int4_pack_layout_low_nibble_first():
    q = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    packed = nx.pack_int4(q)
    # byte0 = (hi=-2 -> 0xE) << 4 | (lo=1) = 0xE1 ; byte1 = (hi=-8 -> 0x8) << 4 | 7 = 0x87
    assert packed.view(torch.uint8).tolist() == [[0xE1, 0x87]]
    assert torch.equal(nx.unpack_int4(packed), q)


def test_int4_round_trip_all_values():
    q = torch.randint(-8, 8, (16, 256), dtype=torch.int8)
    assert torch.equal(nx.unpack_int4(nx.pack_int4(q)), q)


def test_w4_groupwise_quantizer_matches_definition():
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    w[0, :128] = 0.0  # an all-zero group
    packed, scale = nx.quantize_w4_groupwise(w, 128)
    assert packed.shape == (8, 128) and scale.shape == (8, 2)
    wb = w.bfloat16().float()
    assert torch.allclose(scale[1, 0], wb[1, :128].abs().max() / 7)
    q = nx.unpack_int4(packed)
    assert q.min() >= -7 and q.max() <= 7  # symmetric: -8 is never produced
    assert scale[0, 0] == 0 and (q[0, :128] == 0).all()
    err = (nx.dequantize_w4_groupwise(packed, scale) - wb).abs()
    assert (err <= scale.repeat_interleave(128, 1) / 2 + 1e-6).all()


def test_fp8_block_round_trip_and_shapes():
    torch.manual_seed(0)
    w = torch.randn(300, 200)
    q, s = nx.quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    rel = (nx.dequantize_fp8_block(q, s) - w).abs().max() / w.abs().max()
    assert rel < 0.07  # e4m3 has 3 mantissa bits


def test_static_quant_clamps_instead_of_overflowing():
    x = torch.tensor([1000.0, -1000.0, 1.0])
    q = nx.quantize_fp8_static(x, torch.tensor(1.0))
    assert q.float().tolist() == [448.0, -448.0, 1.0]


def test_w4afp8_gemm_matches_fp32_dequant_matmul():
    torch.manual_seed(0)
    m, n, k = 5, 64, 512
    packed, scale = nx.quantize_w4_groupwise(torch.randn(n, k) * 0.02, 128)
    scale_bf16 = scale.bfloat16()
    a = torch.randn(m, k)
    a1 = a.abs().max() / 448
    aq = nx.quantize_fp8_static(a, a1)
    got = nx.w4afp8_gemm_ref(aq, packed, scale_bf16, a1)
    want = (aq.float() @ nx.dequantize_w4_groupwise(packed, scale_bf16.float()).t() * a1).bfloat16()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0.1)


def test_moe_ref_skips_other_ranks_experts_and_applies_scaling_once():
    torch.manual_seed(0)
    e, h, inter, m = 4, 128, 128, 6
    w13 = torch.stack([nx.quantize_w4_groupwise(torch.randn(2 * inter, h) * 0.05)[0] for _ in range(e)])
    s13 = torch.stack([nx.quantize_w4_groupwise(torch.randn(2 * inter, h) * 0.05)[1] for _ in range(e)])
    w2 = torch.stack([nx.quantize_w4_groupwise(torch.randn(h, inter) * 0.05)[0] for _ in range(e)])
    s2 = torch.stack([nx.quantize_w4_groupwise(torch.randn(h, inter) * 0.05)[1] for _ in range(e)])
    x = torch.randn(m, h)
    ids = torch.randint(0, e, (m, 2))
    wts = torch.rand(m, 2)
    experts = nx.W4AFp8MoEWeights(w13, w2, s13, s2, 0.01, 0.01)
    full = nx.w4afp8_moe_ref(x, experts, ids, wts, routed_scaling_factor=2.5)
    half1 = nx.w4afp8_moe_ref(x, nx.W4AFp8MoEWeights(w13[:2], w2[:2], s13[:2], s2[:2], 0.01, 0.01, expert_offset=0), ids, wts, 2.5)
    half2 = nx.w4afp8_moe_ref(x, nx.W4AFp8MoEWeights(w13[2:], w2[2:], s13[2:], s2[2:], 0.01, 0.01, expert_offset=2), ids, wts, 2.5)
    torch.testing.assert_close(half1.float() + half2.float(), full.float(), rtol=1e-2, atol=1e-2)
    unscaled = nx.w4afp8_moe_ref(x, experts, ids, wts, routed_scaling_factor=1.0)
    torch.testing.assert_close(full.float(), 2.5 * unscaled.float(), rtol=1e-2, atol=1e-2)
