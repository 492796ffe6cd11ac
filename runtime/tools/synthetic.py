"""Random-weight checkpoints for tests and kernel work.

- `write_tiny_hf_model`: a tiny model of a supported family built and saved by `transformers` itself (the
  independent reference our implementations are checked against).
- `write_synthetic_deepseek_fp8`: a DeepSeek-V3/R1-shaped checkpoint in DeepSeek's FP8 block release format,
  written tensor by tensor (bounded memory), at any width and depth: tiny for CPU tests, full R1 width
  (hidden 7168, 256 experts) for a few layers on a GPU machine. Includes an MTP layer, as the real release does.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from runtime.quant import numerics as nx
from runtime.tools.checkpoint_writer import ShardWriter

TINY_HF_CONFIGS: dict[str, dict] = {
    "MixtralForCausalLM": dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
    ),
    "Qwen3MoeForCausalLM": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[1], max_position_embeddings=512,
    ),
    "DeepseekV3ForCausalLM": dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=512,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
}


def write_tiny_hf_model(out_dir: str | Path, architecture: str, *, seed: int = 0, init_std: float = 0.1,
                        max_shard_size: str = "300KB", **overrides) -> Path:
    """Save a random `architecture` model with transformers (sharded, with index) and return its directory.

    Weights are drawn with std `init_std` (larger than transformers' 0.02 so every path changes the logits);
    DeepSeek's e_score_correction_bias is randomised too so the bias really steers routing.
    """
    import transformers

    cfg_cls = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    model_cls = getattr(transformers, architecture)
    config = cfg_cls(**{**TINY_HF_CONFIGS[architecture], "initializer_range": init_std, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn_like(buf))
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return Path(out_dir)


@dataclass(frozen=True)
class DeepseekShape:
    """Widths and depth of a synthetic DeepSeek-V3-style model.

    The defaults are tiny (CPU tests) yet every tensor-parallel shard at tp=2 stays a whole number of 128-wide
    FP8 blocks and W4 groups, like R1's shards at tp=8.
    """

    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 512
    moe_intermediate_size: int = 256
    num_hidden_layers: int = 3
    first_k_dense_replace: int = 1
    num_attention_heads: int = 4
    q_lora_rank: int | None = 128
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 4
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    num_nextn_predict_layers: int = 1


R1_SHAPE = DeepseekShape(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    first_k_dense_replace=3, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
    topk_group=4, routed_scaling_factor=2.5,
)


def deepseek_config(shape: DeepseekShape) -> dict:
    """config.json of DeepSeek's FP8 release, at the given shape."""
    s = asdict(shape)
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **s,
        "num_key_value_heads": shape.num_attention_heads, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "moe_layer_freq": 1, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
    }


def _fp8_linear(writer: ShardWriter, name: str, out_f: int, in_f: int, gen: torch.Generator, device, init_scale: float) -> None:
    w = torch.randn(out_f, in_f, generator=gen, device=device) * (init_scale / math.sqrt(in_f))
    q, scale = nx.quantize_fp8_block(w.to(torch.bfloat16))
    writer.add(f"{name}.weight", q)
    writer.add(f"{name}.weight_scale_inv", scale)


def _layer_tensors(writer: ShardWriter, shape: DeepseekShape, i: int, gen, device, init_scale: float) -> None:
    s, p = shape, f"model.layers.{i}"
    h, bf16 = s.hidden_size, torch.bfloat16

    def norm(name: str, n: int) -> None:
        writer.add(name, (1 + 0.1 * torch.randn(n, generator=gen, device=device)).to(bf16))

    def linear(name: str, out_f: int, in_f: int) -> None:
        _fp8_linear(writer, name, out_f, in_f, gen, device, init_scale)

    norm(f"{p}.input_layernorm.weight", h)
    norm(f"{p}.post_attention_layernorm.weight", h)
    qk = s.qk_nope_head_dim + s.qk_rope_head_dim
    a = f"{p}.self_attn"
    if s.q_lora_rank is None:
        linear(f"{a}.q_proj", s.num_attention_heads * qk, h)
    else:
        linear(f"{a}.q_a_proj", s.q_lora_rank, h)
        norm(f"{a}.q_a_layernorm.weight", s.q_lora_rank)
        linear(f"{a}.q_b_proj", s.num_attention_heads * qk, s.q_lora_rank)
    linear(f"{a}.kv_a_proj_with_mqa", s.kv_lora_rank + s.qk_rope_head_dim, h)
    norm(f"{a}.kv_a_layernorm.weight", s.kv_lora_rank)
    linear(f"{a}.kv_b_proj", s.num_attention_heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank)
    linear(f"{a}.o_proj", h, s.num_attention_heads * s.v_head_dim)

    def mlp(prefix: str, inter: int) -> None:
        linear(f"{prefix}.gate_proj", inter, h)
        linear(f"{prefix}.up_proj", inter, h)
        linear(f"{prefix}.down_proj", h, inter)

    if i < s.first_k_dense_replace:
        mlp(f"{p}.mlp", s.intermediate_size)
        return
    writer.add(f"{p}.mlp.gate.weight", (torch.randn(s.n_routed_experts, h, generator=gen, device=device) / math.sqrt(h)).to(bf16))
    writer.add(f"{p}.mlp.gate.e_score_correction_bias", 0.05 * torch.randn(s.n_routed_experts, generator=gen, device=device))
    for e in range(s.n_routed_experts):
        mlp(f"{p}.mlp.experts.{e}", s.moe_intermediate_size)
    if s.n_shared_experts:
        mlp(f"{p}.mlp.shared_experts", s.moe_intermediate_size * s.n_shared_experts)


def write_synthetic_deepseek_fp8(
    out_dir: str | Path, shape: DeepseekShape = DeepseekShape(), *, seed: int = 0, device: str = "cpu",
    init_scale: float = 1.0, max_shard_bytes: int = 2 << 30, tokenizer_from: str | Path | None = None,
) -> Path:
    """Write a random DeepSeek-V3/R1-shaped FP8-block checkpoint (plus its MTP layer) and return the directory.

    Linear weights are N(0, init_scale^2 / fan_in) rounded to bf16, then block-quantized as DeepSeek's release.
    `tokenizer_from`: copy tokenizer files from this directory (the vocabulary size must match the shape).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    writer = ShardWriter(out, max_shard_bytes)
    s = shape
    embed = (torch.randn(s.vocab_size, s.hidden_size, generator=gen, device=device)).to(torch.bfloat16)
    writer.add("model.embed_tokens.weight", embed)
    for i in range(s.num_hidden_layers):
        _layer_tensors(writer, s, i, gen, device, init_scale)
    writer.add("model.norm.weight", torch.ones(s.hidden_size, dtype=torch.bfloat16))
    writer.add("lm_head.weight", (torch.randn(s.vocab_size, s.hidden_size, generator=gen, device=device) / math.sqrt(s.hidden_size)).to(torch.bfloat16))
    for j in range(s.num_nextn_predict_layers):  # the MTP block: a decoder layer plus its projections
        n = s.num_hidden_layers + j
        _layer_tensors(writer, s, n, gen, device, init_scale)
        for name in ("enorm", "hnorm"):
            writer.add(f"model.layers.{n}.{name}.weight", torch.ones(s.hidden_size, dtype=torch.bfloat16))
        _fp8_linear(writer, f"model.layers.{n}.eh_proj", s.hidden_size, 2 * s.hidden_size, gen, device, init_scale)
    writer.close()
    (out / "config.json").write_text(json.dumps(deepseek_config(s), indent=2) + "\n")
    if tokenizer_from is not None:
        copy_tokenizer_files(Path(tokenizer_from), out)
    return out


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json",
)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
