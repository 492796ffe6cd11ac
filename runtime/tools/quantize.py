"""`evalpipe quantize`: write a checkpoint in DeepSeek's FP8 block format or SGLang's W4AFP8 format.

- fp8 (from bf16): every linear layer's weight -> e4m3 + fp32 weight_scale_inv per 128x128 block; embeddings,
  norms, routers and the LM head unchanged; config.json gets DeepSeek's quantization_config.
- w4afp8 (from bf16 or fp8): routed experts -> dequantize, round to bf16, per (row, K group) scale = amax/7,
  q = clamp(round(w/scale), -8, 7), packed two per byte low nibble first, scales fp32 [N, K/G]; every other
  linear is FP8 block (copied bit for bit from an fp8 input); activation scales amax/448 per expert and GEMM
  from calibration in act_scales.safetensors (`...experts.E.w1|w2|w3.input_scale`, referenced by the index);
  config.json loses quantization_config and hf_quant_config.json says MIXED_PRECISION.

Tensors are streamed one at a time and written shard by shard; the result appears at OUT_DIR only when
complete (it is built in OUT_DIR.partial).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from runtime.config import config_from_dict, read_hf_config
from runtime.errors import CheckpointError
from runtime.layers.linear import Linear
from runtime.loader import EXPERT_NAME, INDEX_FILE, CheckpointReader, CheckpointTensor, check_absent
from runtime.models import MODEL_FAMILIES
from runtime.parallel import SINGLE
from runtime.quant import numerics as nx
from runtime.quant.bf16 import Bf16Config
from runtime.quant.schemes import detect_quantization
from runtime.tools.checkpoint_writer import ShardWriter

log = logging.getLogger(__name__)

SCHEMES = ("fp8", "w4afp8")
ACT_SCALES_FILE = "act_scales.safetensors"
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
W4AFP8_HF_QUANT_CONFIG = {
    "producer": {"name": "evalpipe"},
    "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None},
}
_SKIP_FILES = {"config.json", INDEX_FILE, "hf_quant_config.json", ACT_SCALES_FILE}


def _classify_tensors(model_dir: Path, hf_config: dict, reader: CheckpointReader) -> tuple[set[str], set[str], dict[str, str]]:
    """(linear-layer weights, tensors the runtime does not serve, {checkpoint experts prefix: module path}),
    from the model's own layer definitions, built on the meta device so nothing is allocated. Index entries
    without data are refused if served, else skipped (runtime.loader.check_absent); the output's index omits them."""
    config = config_from_dict(hf_config, str(model_dir / "config.json"))
    skeleton = MODEL_FAMILIES[config.architecture](config, Bf16Config(), SINGLE, torch.bfloat16, torch.device("meta"))
    check_absent(reader, skeleton.checkpoint_name)
    linear_modules = {name for name, m in skeleton.named_modules() if isinstance(m, Linear)}
    linears, unserved, expert_prefixes = set(), set(), {}
    for name in reader.names():
        mapped = skeleton.checkpoint_name(name)
        if mapped is None:
            unserved.add(name)
            continue
        expert = EXPERT_NAME.match(name)
        if expert:
            expert_prefixes[expert["prefix"]] = EXPERT_NAME.match(mapped)["prefix"]
        elif name.endswith(".weight") and mapped.removesuffix(".weight") in linear_modules:
            linears.add(name)
    return linears, unserved, expert_prefixes


def _dense_weight(reader: CheckpointReader, src: CheckpointTensor, device: torch.device) -> torch.Tensor:
    """fp32 weight of a bf16/fp32 tensor or of an FP8-block one (dequantized with its weight_scale_inv)."""
    w = src.read().to(device)
    if w.dtype == nx.FP8_DTYPE:
        return nx.dequantize_fp8_block(w, reader.get(src.name + "_scale_inv").read().to(device))
    return w.float()


@dataclass(frozen=True)
class _Job:
    in_dir: Path
    scheme: str
    group_size: int
    hf_config: dict
    reader: CheckpointReader
    linears: set[str]  # checkpoint names of linear-layer weights (quantized to FP8 block)
    unserved: set[str]  # tensors the runtime does not serve (MTP layers): copied unchanged (stay FP8)
    expert_prefixes: dict[str, str]  # checkpoint "<...>.experts" prefix -> FusedMoE module path
    device: torch.device  # where calibration and the per-tensor quantization run


def quantize_checkpoint(
    in_dir: str | Path,
    out_dir: str | Path,
    scheme: str,
    group_size: int = 128,
    calib_samples: int = 32,
    calib_max_len: int = 512,
    device: str = "cpu",
    max_shard_bytes: int = 4 << 30,
    on_tensor: Callable[[int, int], None] | None = None,
) -> Path:
    """Quantize the checkpoint in `in_dir` into `out_dir` (must not exist yet or be empty); returns out_dir."""
    job = _plan(Path(in_dir), Path(out_dir), scheme, group_size, calib_samples, torch.device(device))
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        act_index = _write_act_scales(job, partial, calib_samples, calib_max_len) if scheme == "w4afp8" else {}
        _write_tensors(job, partial, max_shard_bytes, act_index, on_tensor)
        _write_configs(job, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # never leave a half-written checkpoint behind
        raise
    if out_dir.exists():
        out_dir.rmdir()
    partial.rename(out_dir)
    log.info("wrote %s checkpoint to %s", scheme, out_dir)
    return out_dir


def _plan(in_dir: Path, out_dir: Path, scheme: str, group_size: int, calib_samples: int, device: torch.device) -> _Job:
    """Check every precondition before anything is written."""
    if scheme not in SCHEMES:
        raise CheckpointError(f"--scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} already exists and is not empty")
    hf_config = read_hf_config(in_dir)
    config = config_from_dict(hf_config, str(in_dir / "config.json"))
    source = detect_quantization(in_dir, hf_config)
    allowed = {"fp8": ("bf16",), "w4afp8": ("bf16", "fp8")}[scheme]
    if source not in allowed:
        raise CheckpointError(f"{in_dir} holds a {source} checkpoint; --scheme {scheme} needs {' or '.join(allowed)} input")
    reader = CheckpointReader(in_dir)
    linears, unserved, expert_prefixes = _classify_tensors(in_dir, hf_config, reader)
    if scheme == "w4afp8":
        if not expert_prefixes:
            raise CheckpointError(f"{in_dir}: no routed experts to quantize")
        if group_size <= 0 or group_size % 2:
            raise CheckpointError(f"--group-size {group_size}: must be a positive even number")
        for what, size in (("hidden_size", config.hidden_size), ("moe_intermediate_size", config.moe_intermediate_size)):
            if size % group_size:
                hint = " (try --group-size 64)" if size % 64 == 0 else ""
                raise CheckpointError(f"config.json: {what}={size} is not a multiple of --group-size {group_size}{hint}")
        if calib_samples < 1:
            raise CheckpointError("--calib-samples must be at least 1 for w4afp8 (activation scales are calibrated)")
    return _Job(in_dir, scheme, group_size, hf_config, reader, linears, unserved, expert_prefixes, device)


def _write_act_scales(job: _Job, out: Path, calib_samples: int, calib_max_len: int) -> dict[str, str]:
    """act_scales.safetensors (w1 == w3 per expert, as TRT-LLM writes them); returns its index entries."""
    from runtime.tools.calibration import calibrate_expert_input_scales

    scales = calibrate_expert_input_scales(job.in_dir, calib_samples, calib_max_len, job.device)
    act = {}
    for ckpt_prefix, module_path in sorted(job.expert_prefixes.items()):
        for e, (s13, s2) in enumerate(scales[module_path].tolist()):
            for proj, value in (("w1", s13), ("w3", s13), ("w2", s2)):
                act[f"{ckpt_prefix}.{e}.{proj}.input_scale"] = torch.tensor([value], dtype=torch.float32)
    save_file(act, str(out / ACT_SCALES_FILE), metadata={"format": "pt"})
    return {name: ACT_SCALES_FILE for name in act}


def _write_tensors(job: _Job, out: Path, max_shard_bytes: int, extra_index: dict[str, str], on_tensor) -> None:
    reader, writer = job.reader, ShardWriter(out, max_shard_bytes)
    names = sorted(reader.names())
    for i, name in enumerate(names):
        if on_tensor:
            on_tensor(i, len(names))
        if name in job.unserved:
            writer.add(name, reader.get(name).read())
            continue
        if name.endswith(".weight_scale_inv") and name.removesuffix("_scale_inv") in reader:
            continue  # written together with its weight
        src = reader.get(name)
        expert = EXPERT_NAME.match(name)
        is_expert_weight = bool(expert) and expert["suffix"] == "weight"
        if is_expert_weight and job.scheme == "w4afp8":
            packed, scale = nx.quantize_w4_groupwise(_dense_weight(reader, src, job.device).to(torch.bfloat16), job.group_size)
            writer.add(name, packed)
            writer.add(name + "_scale_inv", scale)
        elif is_expert_weight or name in job.linears:
            if src.dtype == nx.FP8_DTYPE:  # already FP8 block: copied bit for bit
                writer.add(name, src.read())
                writer.add(name + "_scale_inv", reader.get(name + "_scale_inv").read())
            else:
                q, scale = nx.quantize_fp8_block(src.read().to(job.device, torch.bfloat16))
                writer.add(name, q)
                writer.add(name + "_scale_inv", scale)
        else:
            writer.add(name, src.read())
    writer.close(extra_index)


def _write_configs(job: _Job, out: Path) -> None:
    new_config = dict(job.hf_config)
    if job.scheme == "fp8":
        new_config["quantization_config"] = FP8_QUANTIZATION_CONFIG
    else:
        new_config.pop("quantization_config", None)  # SGLang would otherwise detect fp8 and ignore hf_quant_config
        (out / "hf_quant_config.json").write_text(json.dumps(W4AFP8_HF_QUANT_CONFIG, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
    for f in job.in_dir.iterdir():  # tokenizer, chat template, generation config, ...
        if f.is_file() and f.suffix != ".safetensors" and f.name not in _SKIP_FILES:
            shutil.copy2(f, out / f.name)
