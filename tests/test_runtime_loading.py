"""Loading contract: config validation, quantization detection, strict tensor matching, backend registry, CLI errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from evalpipe.cli import app
from runtime import backends
from runtime.errors import CheckpointError
from runtime.models import load_model
from runtime.parallel import ParallelContext
from runtime.quant import numerics as nx
from runtime.quantize import quantize_checkpoint
from runtime.standalone import prompt_logits
from runtime.synthetic import write_synthetic_deepseek_fp8, write_tiny_hf_model


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return write_tiny_hf_model(tmp_path_factory.mktemp("mixtral"), "MixtralForCausalLM", max_shard_size="10MB")  # one file, no index


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    root = tmp_path_factory.mktemp("w4")
    fp8 = write_synthetic_deepseek_fp8(root / "fp8", max_shard_bytes=1 << 20)
    return quantize_checkpoint(fp8, root / "w4", "w4afp8", calib_samples=1, calib_max_len=16)


def edited_copy(src, dst, edit_config=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        for f in dst.glob("*.safetensors"):
            tensors = load_file(f)
            edit_tensors(tensors)
            save_file(tensors, f)
    return dst


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(architectures=["GPT2LMHeadModel"]), "architectures[0] 'GPT2LMHeadModel' is not supported"),
    (lambda c: c.pop("num_key_value_heads"), "num_key_value_heads: Field required"),
    (lambda c: c.update(hidden_size=-4), "hidden_size: Input should be greater than 0"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope_parameters: Value error, rope type yarn needs original_max_position_embeddings"),
    (lambda c: c.update(quantization_config={"quant_method": "awq"}), "quantization_config.quant_method 'awq' is not supported"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act: Input should be 'silu'"),
])
def test_bad_config_is_reported_by_field(mixtral, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_model(edited_copy(mixtral, tmp_path / "m", edit_config=edit))


def test_missing_and_unexpected_tensors_are_named(mixtral, tmp_path):
    drop = edited_copy(mixtral, tmp_path / "drop", edit_tensors=lambda t: t.pop("model.layers.1.self_attn.o_proj.weight", None))
    with pytest.raises(CheckpointError, match=r"tensors missing for model\.layers\.1\.self_attn\.o_proj\.weight \(0/1 loaded\)"):
        load_model(drop)

    def add_extra(t):
        if "lm_head.weight" in t:
            t["model.layers.0.self_attn.q_proj.weight_scale_inv"] = torch.ones(1, 1)

    extra = edited_copy(mixtral, tmp_path / "extra", edit_tensors=add_extra)
    with pytest.raises(CheckpointError, match=r"tensors not used by GqaMoeForCausalLM: model\.layers\.0\.self_attn\.q_proj\.weight_scale_inv"):
        load_model(extra)


def test_quantization_must_match_the_checkpoint(mixtral, w4):
    with pytest.raises(CheckpointError, match="quantization 'fp8' requested, but .* holds a bf16 checkpoint"):
        load_model(mixtral, quantization="fp8")
    with pytest.raises(CheckpointError, match="holds a w4afp8 checkpoint"):
        load_model(w4, quantization="bf16")
    model, _ = load_model(w4, quantization="w4afp8")
    assert model.quant.name == "w4afp8"


def test_wrong_dtype_and_unsplittable_shapes_are_errors(mixtral, w4, tmp_path):
    def to_bf16(t):
        for k in [k for k in t if k.endswith("experts.0.down_proj.weight")]:
            t[k] = t[k].to(torch.bfloat16)

    bad = edited_copy(w4, tmp_path / "bad", edit_tensors=to_bf16)
    with pytest.raises(CheckpointError, match=r"experts\.0\.down_proj\.weight: dtype torch.bfloat16 where the layer expects torch.int8"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="num_attention_heads=4 is not divisible by the tensor-parallel size 3"):
        load_model(mixtral, parallel=ParallelContext(0, 3))


def test_backend_selection_and_prepare(w4, monkeypatch):
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    calls = []

    def prepare(w13, w2, w13_scale, w2_scale):
        calls.append(w13.shape)
        align = 4 if w13_scale.shape[2] % 4 == 0 else 1  # SGLang's kernel layout (numerics.interleave_scales)
        return {"w13_scale": nx.interleave_scales(w13_scale), "align": align}

    def run(x, w13, w2, w13_scale, w2_scale, a1, a2, topk_ids, topk_weights, routed_scaling_factor=1.0, expert_offset=0, align=None):
        e, kga, na = w13_scale.shape  # undo the kernel layout and defer to the reference
        plain = w13_scale.reshape(e, kga, na // align, align).permute(0, 2, 1, 3).reshape(e, na // align, kga * align)
        return nx.w4afp8_moe_ref(x, w13, w2, plain, w2_scale, a1, a2, topk_ids, topk_weights, routed_scaling_factor, expert_offset)

    backends.register_backend("moe.w4afp8", "fake", run, prepare=prepare, priority=50)
    ids = list(range(3, 30))
    fake, _ = load_model(w4)  # "auto" picks the highest-priority available backend
    assert len(calls) == 2 and fake.model.layers[1].mlp.experts.quant_method.backend.name == "fake"
    ref, _ = load_model(w4, moe_backend="torch")
    assert torch.equal(prompt_logits(fake, ids), prompt_logits(ref, ids))
    backends.register_backend("moe.w4afp8", "gpu-only", run, available=lambda d: d.type == "cuda")
    with pytest.raises(CheckpointError, match="backend 'gpu-only' for moe.w4afp8 cannot run on cpu"):
        load_model(w4, moe_backend="gpu-only")
    with pytest.raises(CheckpointError, match=r"backend 'nope' has no implementation of moe\.w4afp8 \(available: auto, .*\bfake\b.*\bgpu-only\b.*\btorch\b"):
        load_model(w4, moe_backend="nope")


def test_cli_reports_user_mistakes_in_one_line(mixtral, w4, tmp_path):
    runner = CliRunner()
    cases = [
        (["quantize", str(tmp_path / "missing"), str(tmp_path / "o1"), "--scheme", "fp8"], "is not a directory"),
        (["quantize", str(w4), str(tmp_path / "o2"), "--scheme", "fp8"], "holds a w4afp8 checkpoint; --scheme fp8 needs bf16 input"),
        (["quantize", str(mixtral), str(tmp_path / "o3"), "--scheme", "w4afp8", "--group-size", "128"], "hidden_size=64 is not a multiple of --group-size 128"),
        (["model", "build", "gpt-oss"], "unknown model 'gpt-oss'"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o3.partial").exists()
    ok = runner.invoke(app, ["quantize", str(mixtral), str(tmp_path / "fp8"), "--scheme", "fp8"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
