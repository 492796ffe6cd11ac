"""Loading contract: config validation, quantization detection, strict tensor matching, backend registry, CLI errors."""

import json
import logging
import re
import shutil
import subprocess
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from typer.testing import CliRunner

from evalpipe.cli import app
from evalpipe.testing.serve_process import CLI
from runtime import backends
from runtime.errors import CheckpointError
from runtime.loader import CheckpointReader
from runtime.models import load_model
from runtime.parallel import ParallelContext
from runtime.quant import numerics as nx
from runtime.tools.quantize import quantize_checkpoint
from runtime.tools.standalone import prompt_logits
from runtime.tools.synthetic import copy_tokenizer_files, write_synthetic_deepseek_fp8, write_tiny_hf_model


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
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    calls = []

    def prepare(w13, w2, w13_scale, w2_scale):
        calls.append(w13.shape)
        align = 4 if w13_scale.shape[2] % 4 == 0 else 1  # SGLang's kernel layout (numerics.interleave_scales)
        return {"w13_scale": nx.interleave_scales(w13_scale), "align": align}

    def run(x, experts, topk_ids, topk_weights, routed_scaling_factor=1.0, align=None):
        e, kga, na = experts.w13_scale.shape  # undo the kernel layout and defer to the reference
        plain = experts.w13_scale.reshape(e, kga, na // align, align).permute(0, 2, 1, 3).reshape(e, na // align, kga * align)
        return nx.w4afp8_moe_ref(x, replace(experts, w13_scale=plain), topk_ids, topk_weights, routed_scaling_factor)

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


def trtllm_layout(src, dst, parts: int, drop=()) -> int:
    """Rewrite the w4afp8 checkpoint `src` the way NVIDIA's quantize_mixed_precision_moe.py lays out its output:
    layer L in model-{L // ceil(n/parts):05d}-of-{parts:05d}.safetensors (non-layer tensors in file 0), activation
    scales in act_scales.safetensors, and every tensor of layers >= num_hidden_layers (the MTP layer) listed in
    the index but written nowhere; with parts=1 their file is never created. `drop`: tensors left out of the files
    but kept in the index. Returns the number of index entries without data."""
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    part = -(-n // parts)
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    files: dict[str, dict] = {}
    new_map, absent = {}, 0
    for file in sorted(set(weight_map.values())):
        for name, tensor in load_file(src / file).items():
            layer = re.match(r"model\.layers\.(\d+)\.", name)
            layer = int(layer[1]) if layer else 0
            target = file if file == "act_scales.safetensors" else f"model-{layer // part:05d}-of-{parts:05d}.safetensors"
            new_map[name] = target
            if layer < n and name not in drop:
                files.setdefault(target, {})[name] = tensor
            else:
                absent += 1
    dst.mkdir()
    for file, tensors in files.items():
        save_file(tensors, dst / file)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": new_map}))
    for extra in ("config.json", "hf_quant_config.json"):
        shutil.copy(src / extra, dst / extra)
    return absent


@pytest.mark.parametrize("parts", [1, 2])
def test_trtllm_indexes_load_like_sglang(w4, tmp_path, caplog, parts):
    # parts=1: the MTP layer's entries name model-00001-of-00001.safetensors, never written; parts=2: they name
    # model-00001-of-00002.safetensors, which exists but holds only layer 2.
    absent = trtllm_layout(w4, tmp_path / "trt", parts)
    assert absent > 20
    missing_file = tmp_path / "trt" / f"model-00001-of-{parts:05d}.safetensors"
    assert missing_file.exists() == (parts == 2)
    with caplog.at_level(logging.WARNING, logger="runtime.loader"):
        model, _ = load_model(tmp_path / "trt")
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "runtime.loader"]
    assert f"skipped {absent} index entries" in warning
    assert ("missing files: model-00001-of-00001.safetensors" in warning) == (parts == 1)
    reference, _ = load_model(w4)
    ids = list(range(5, 40))
    assert torch.equal(prompt_logits(model, ids), prompt_logits(reference, ids))


def test_a_missing_tensor_of_a_served_layer_is_named_with_its_file(w4, tmp_path, tiny_model_dir):
    trtllm_layout(w4, tmp_path / "trt", 2, drop={"model.layers.2.self_attn.o_proj.weight"})
    with pytest.raises(CheckpointError, match=r"lists tensor model\.layers\.2\.self_attn\.o_proj\.weight in "
                                              r"model-00001-of-00002\.safetensors, which does not hold it$"):
        load_model(tmp_path / "trt")
    reader = CheckpointReader(tmp_path / "trt")  # direct reads raise the same error, never a SafetensorError
    with pytest.raises(CheckpointError, match="which does not hold it"):
        reader.get("model.layers.2.self_attn.o_proj.weight")

    no_scales = trtllm_layout(w4, tmp_path / "no-act", 2)
    assert no_scales
    (tmp_path / "no-act" / "act_scales.safetensors").unlink()  # the index still names it
    copy_tokenizer_files(tiny_model_dir, tmp_path / "no-act")  # serve loads the tokenizer first
    proc = subprocess.run([*CLI, "--model", str(tmp_path / "no-act")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert re.search(r"lists tensor model\.layers\.1\.mlp\.experts\.0\.w1\.input_scale in act_scales\.safetensors, "
                     r"which does not exist \(and \d+ more tensors the model needs\)", proc.stderr), proc.stderr


def test_an_expert_without_input_scale_is_refused_by_name(w4, tmp_path):
    """SGLang would leave its scale at 1.0, which then becomes the whole layer's static FP8 scale."""
    gone = "model.layers.2.mlp.experts.5.w3.input_scale"
    copy = edited_copy(w4, tmp_path / "m", edit_tensors=lambda t: t.pop(gone, None))
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    del index["weight_map"][gone]
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"routed experts without their activation scale: "
                                              r"model\.layers\.2\.mlp\.experts\.5\.w3\.input_scale \(SGLang would use 1\.0"):
        load_model(copy)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tiny_model_dir, tmp_path):
    """`model synth-deepseek --tokenizer-from` names both sizes; a checkpoint that has such a tokenizer anyway
    is refused by the calibration of `quantize` (once a bare IndexError) before anything is written."""
    runner = CliRunner()
    tokens = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    result = runner.invoke(app, ["model", "synth-deepseek", str(tmp_path / "s"), "--preset", "tiny", "--tokenizer-from", str(tiny_model_dir)])
    assert result.exit_code == 2, result.output
    assert f"the tokenizer has {tokens} tokens but vocab_size is 512; pass --vocab-size {tokens}" in result.output
    assert not (tmp_path / "s").exists()

    mismatched = write_synthetic_deepseek_fp8(tmp_path / "fp8", max_shard_bytes=1 << 20, tokenizer_from=tiny_model_dir)
    result = runner.invoke(app, ["quantize", str(mismatched), str(tmp_path / "w4"), "--scheme", "w4afp8", "--calib-samples", "1"])
    assert result.exit_code == 2, result.output
    assert re.search(rf"the tokenizer has {tokens} tokens \(it produced id \d+\) but config.json vocab_size is 512", result.output)
    assert "Traceback" not in result.output and not (tmp_path / "w4").exists() and not (tmp_path / "w4.partial").exists()
