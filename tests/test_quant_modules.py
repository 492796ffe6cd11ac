"""FP8-block linear and W4AFP8 / FP8 MoE modules against plain fp32 dequantize-then-matmul references computed
straight from the checkpoint tensors (tolerance of SGLang's kernel tests: rtol 1e-2, atol 0.1)."""

import json

import pytest
import torch
from quant_reference import FP8, TOL, Ckpt, ref_block_dequant, ref_dynamic_act, ref_unpack_int4, routing, w4afp8_reference
from safetensors import safe_open

from runtime.models import load_model
from runtime.tools.quantize import quantize_checkpoint
from runtime.tools.synthetic import write_synthetic_deepseek_fp8

@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    return write_synthetic_deepseek_fp8(tmp_path_factory.mktemp("r1fp8"), max_shard_bytes=1 << 20)


@pytest.fixture(scope="module", params=[128, 64])
def w4_dir(request, fp8_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"r1w4g{request.param}") / "ckpt"
    return quantize_checkpoint(fp8_dir, out, "w4afp8", group_size=request.param, calib_samples=2, calib_max_len=48)


@pytest.mark.parametrize("backend", ["torch", "cached"])
def test_fp8_block_linear_matches_dequantized_matmul(fp8_dir, backend):
    model, _ = load_model(fp8_dir, linear_backend=backend)
    ckpt = Ckpt(fp8_dir)
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 3
    for name, layer in (("model.layers.1.self_attn.q_a_proj", model.model.layers[1].self_attn.q_a_proj),
                        ("model.layers.0.mlp.down_proj", model.model.layers[0].mlp.down_proj)):
        inp = x if layer.weight.shape[1] == 256 else torch.cat([x, x], dim=1)
        w = ref_block_dequant(ckpt[f"{name}.weight"], ckpt[f"{name}.weight_scale_inv"])
        ref = (ref_dynamic_act(inp) @ w.t()).to(torch.bfloat16)
        out = layer(inp)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref.float(), **TOL)


# top-8 of 16 experts takes the batched backend's all-experts path, top-4 its loop over the experts hit
@pytest.mark.parametrize("top_k", [4, 8])
@pytest.mark.parametrize("backend", ["torch", "cached", "batched", "onednn"])
def test_fp8_moe_matches_dequantized_matmul(fp8_dir, backend, top_k):
    model, cfg = load_model(fp8_dir, moe_backend=backend)
    ckpt, moe = Ckpt(fp8_dir), model.model.layers[1].mlp.experts
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ids, weights = routing(6, 16, top_k)
    out = moe(x, ids, weights, 2.5)
    ref = torch.zeros(6, 256)
    for t in range(6):
        for k in range(top_k):
            p = f"model.layers.1.mlp.experts.{int(ids[t, k])}"
            w = {n: ref_block_dequant(ckpt[f"{p}.{n}_proj.weight"], ckpt[f"{p}.{n}_proj.weight_scale_inv"]) for n in ("gate", "up", "down")}
            xt = ref_dynamic_act(x[t : t + 1])
            g, u = (xt @ w["gate"].t()).bfloat16().float(), (xt @ w["up"].t()).bfloat16().float()
            act = (torch.nn.functional.silu(g) * u).bfloat16()
            ref[t] += 2.5 * weights[t, k] * (ref_dynamic_act(act) @ w["down"].t()).bfloat16().float()[0]
    torch.testing.assert_close(out.float(), ref.bfloat16().float(), **TOL)


@pytest.mark.parametrize("top_k", [4, 8])
@pytest.mark.parametrize("backend", ["torch", "cached", "batched", "onednn"])
def test_w4afp8_moe_matches_dequantized_matmul(w4_dir, backend, top_k):
    model, cfg = load_model(w4_dir, moe_backend=backend)
    moe = model.model.layers[2].mlp.experts
    x = (2 * torch.randn(9, 256, generator=torch.Generator().manual_seed(3))).to(torch.bfloat16)
    ids, weights = routing(9, 16, top_k, seed=3)
    out = moe(x, ids, weights, cfg.routed_scaling_factor)
    ref = w4afp8_reference(Ckpt(w4_dir), "model.layers.2.mlp.experts", 16, x, ids, weights, cfg.routed_scaling_factor)
    assert ref.abs().max() > 1  # a meaningful magnitude for atol 0.1
    torch.testing.assert_close(out.float(), ref.float(), **TOL)


def test_cached_backends_are_bit_identical_to_the_reference(w4_dir):
    ids = list(range(5, 45))
    from runtime.tools.standalone import prompt_logits

    ref_model, _ = load_model(w4_dir, moe_backend="torch", linear_backend="torch")
    fast_model, _ = load_model(w4_dir, moe_backend="cached", linear_backend="cached")
    assert torch.equal(prompt_logits(ref_model, ids), prompt_logits(fast_model, ids))


def test_w4afp8_checkpoint_format(fp8_dir, w4_dir):
    src, out = Ckpt(fp8_dir), Ckpt(w4_dir)
    g = 256 // out["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"].shape[1]
    config = json.loads((w4_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert json.loads((w4_dir / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "MIXED_PRECISION"
    index = json.loads((w4_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.2.mlp.experts.15.w2.input_scale"] == "act_scales.safetensors"
    with safe_open(str(w4_dir / "act_scales.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 2 * 16 * 3  # layers 1 and 2, 16 experts, w1/w2/w3
    for layer in (1, 2):
        for e in (0, 9):
            p = f"model.layers.{layer}.mlp.experts.{e}"
            assert torch.equal(out[f"{p}.w1.input_scale"], out[f"{p}.w3.input_scale"])
            assert out[f"{p}.w2.input_scale"].shape == (1,) and out[f"{p}.w2.input_scale"].item() > 0
            for proj, (n, k) in (("gate_proj", (256, 256)), ("down_proj", (256, 256))):
                q, s = out[f"{p}.{proj}.weight"], out[f"{p}.{proj}.weight_scale_inv"]
                assert q.dtype == torch.int8 and q.shape == (n, k // 2) and s.dtype == torch.float32 and s.shape == (n, k // g)
                w = ref_block_dequant(src[f"{p}.{proj}.weight"], src[f"{p}.{proj}.weight_scale_inv"]).bfloat16().float()
                assert torch.equal(s, w.view(n, k // g, g).abs().amax(-1) / 7)
                err = (ref_unpack_int4(q) * s.repeat_interleave(g, 1) - w).abs()
                assert (err <= s.repeat_interleave(g, 1) / 2 * (1 + 1e-6)).all()
    # everything that is not a served routed expert is the FP8 release, bit for bit (the whole MTP layer 3 too)
    for name in ("model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight_scale_inv",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.3.eh_proj.weight", "model.layers.2.mlp.gate.e_score_correction_bias",
                 "model.layers.3.mlp.experts.5.up_proj.weight", "model.layers.3.mlp.experts.5.up_proj.weight_scale_inv"):
        assert torch.equal(src[name].view(torch.uint8), out[name].view(torch.uint8)) if src[name].dtype == FP8 else torch.equal(src[name], out[name])


def test_w4afp8_load_detects_group_size_and_expert_parallel_scales(w4_dir):
    from runtime.parallel import ParallelContext

    ckpt = Ckpt(w4_dir)
    prefix = "model.layers.1.mlp.experts"
    bf = lambda v: v.to(torch.bfloat16).float().item()  # noqa: E731
    per_expert = [max(bf(ckpt[f"{prefix}.{e}.w1.input_scale"]), bf(ckpt[f"{prefix}.{e}.w3.input_scale"])) for e in range(16)]
    model, _ = load_model(w4_dir)
    g = 256 // ckpt[f"{prefix}.0.gate_proj.weight_scale_inv"].shape[1]
    assert model.quant.group_size == g
    assert model.model.layers[1].mlp.experts.w13_input_scale.item() == max(per_expert)
    for rank in (0, 1):
        ep, _ = load_model(w4_dir, parallel=ParallelContext(rank=rank, world_size=2, moe_parallel="ep"))
        moe = ep.model.layers[1].mlp.experts
        assert (moe.expert_offset, moe.num_local) == (8 * rank, 8)
        assert moe.w13_input_scale.item() == max(per_expert[8 * rank : 8 * rank + 8])


def test_fp8_quantizer_from_bf16_round_trips(tmp_path):
    from runtime.tools.standalone import prompt_logits
    from runtime.tools.synthetic import write_tiny_hf_model

    bf16_dir = write_tiny_hf_model(tmp_path / "bf16", "MixtralForCausalLM", hidden_size=128, intermediate_size=256, init_std=0.04)
    out = quantize_checkpoint(bf16_dir, tmp_path / "fp8", "fp8")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    ckpt, orig = Ckpt(out), Ckpt(bf16_dir)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.block_sparse_moe.experts.3.w2"):
        w, s = ckpt[f"{name}.weight"], ckpt[f"{name}.weight_scale_inv"]
        assert w.dtype == FP8 and s.shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
        ref = orig[f"{name}.weight"].bfloat16().float()
        assert ((ref_block_dequant(w, s) - ref).abs() <= ref.abs() / 16 + s.max() * 2**-9).all()
    for name in ("model.layers.0.block_sparse_moe.gate.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(ckpt[name], orig[name]) and f"{name}_scale_inv" not in ckpt.reader
    ids = list(range(3, 40))
    ref_model, _ = load_model(bf16_dir, dtype="float32")
    fp8_model, _ = load_model(out, dtype="float32")
    a, b = prompt_logits(ref_model, ids), prompt_logits(fp8_model, ids)
    # tiny random MoEs are chaotic (1% weight noise moves these logits by ~2.5%); FP8 measured 7%, garbage ~100%
    assert (a - b).abs().mean() < 0.15 * a.abs().mean()
