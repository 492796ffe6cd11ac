"""Model configs parsed from a checkpoint's config.json, validated, with errors naming the offending field.

One config class per model family; `parse_model_config` picks it from `architectures`. Field names are the
config.json keys (aliases cover the spellings of different families).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from runtime.errors import CheckpointError


class _Config(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class RopeConfig(_Config):
    rope_type: Literal["default", "linear", "llama3", "yarn"] = "default"
    theta: float = Field(10000.0, gt=0)
    factor: float = Field(1.0, gt=0)
    original_max_position_embeddings: PositiveInt | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    @model_validator(mode="after")
    def _needs_original_length(self):
        if self.rope_type in ("yarn", "llama3") and self.original_max_position_embeddings is None:
            raise ValueError(f"rope type {self.rope_type} needs original_max_position_embeddings")
        return self


def _rope_section(raw: dict) -> tuple[str, dict]:
    """Rope parameters from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (older files)."""
    if isinstance(raw.get("rope_parameters"), dict):
        return "rope_parameters", dict(raw["rope_parameters"])
    section = dict(raw.get("rope_scaling") or {})
    if "rope_theta" in raw:
        section["rope_theta"] = raw["rope_theta"]
    return "rope_scaling", section


def _rope_from_hf(raw: dict, default_theta: float) -> dict:
    where, section = _rope_section(raw)
    out = {k: v for k, v in section.items() if v is not None}
    out["rope_type"] = section.get("rope_type") or section.get("type") or "default"
    out["theta"] = section.get("rope_theta", default_theta)
    if out["rope_type"] == "yarn" and "factor" not in out and out.get("original_max_position_embeddings"):
        out["factor"] = raw.get("max_position_embeddings", 0) / out["original_max_position_embeddings"]
    out["_where"] = where
    return out


class CommonConfig(_Config):
    architecture: str
    vocab_size: PositiveInt
    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    rms_norm_eps: float = Field(1e-6, gt=0)
    max_position_embeddings: PositiveInt = 4096
    tie_word_embeddings: bool = False
    hidden_act: Literal["silu"] = "silu"
    rope: RopeConfig
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)


class GqaMoeConfig(CommonConfig):
    """MixtralForCausalLM and Qwen3MoeForCausalLM: GQA attention, softmax top-k routed experts."""

    num_key_value_heads: PositiveInt
    head_dim: PositiveInt
    num_experts: PositiveInt = Field(validation_alias=AliasChoices("num_experts", "num_local_experts"))
    num_experts_per_tok: PositiveInt
    moe_intermediate_size: PositiveInt
    intermediate_size: PositiveInt  # dense MLP layers (Qwen3 mlp_only_layers / decoder_sparse_step)
    norm_topk_prob: bool
    qk_norm: bool  # per-head RMSNorm of q and k before rotary (Qwen3)
    attention_bias: bool = False
    sliding_window: PositiveInt | None = None
    dense_layers: frozenset[int] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _from_hf(cls, raw: dict) -> dict:
        d = dict(raw)
        qwen = d.get("architecture") == "Qwen3MoeForCausalLM"
        d.setdefault("head_dim", None)
        if d["head_dim"] is None and d.get("hidden_size") and d.get("num_attention_heads"):
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if qwen:
            d["qk_norm"] = True
            d.setdefault("norm_topk_prob", False)
            if not d.get("use_sliding_window"):
                d["sliding_window"] = None
            step = d.get("decoder_sparse_step") or 1
            only = set(d.get("mlp_only_layers") or [])
            n = d.get("num_hidden_layers") or 0
            d["dense_layers"] = frozenset(i for i in range(n) if i in only or (i + 1) % step != 0)
        else:  # Mixtral: experts are the MLP, top-k always renormalised
            d["qk_norm"] = False
            d["norm_topk_prob"] = True
            d["moe_intermediate_size"] = d.get("intermediate_size")
        return d

    @model_validator(mode="after")
    def _check(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok exceeds the number of experts")
        return self


class DeepseekV3Config(CommonConfig):
    """DeepseekV3ForCausalLM: MLA attention, sigmoid group-limited routing, shared experts, dense first layers."""

    q_lora_rank: PositiveInt | None = None
    kv_lora_rank: PositiveInt
    qk_nope_head_dim: PositiveInt
    qk_rope_head_dim: PositiveInt
    v_head_dim: PositiveInt
    intermediate_size: PositiveInt
    moe_intermediate_size: PositiveInt
    n_routed_experts: PositiveInt
    n_shared_experts: int = Field(1, ge=0)
    num_experts_per_tok: PositiveInt
    n_group: PositiveInt = 8
    topk_group: PositiveInt = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = Field(2.5, gt=0)
    first_k_dense_replace: int = Field(3, ge=0)
    moe_layer_freq: PositiveInt = 1
    scoring_func: Literal["sigmoid"] = "sigmoid"
    topk_method: Literal["noaux_tc"] = "noaux_tc"
    rope_interleave: bool = True
    attention_bias: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.n_routed_experts % self.n_group:
            raise ValueError("n_routed_experts must be a multiple of n_group")
        if self.n_routed_experts // self.n_group < 2:
            raise ValueError("each expert group needs at least 2 experts (group score = sum of its top 2)")
        if self.topk_group > self.n_group:
            raise ValueError("topk_group exceeds n_group")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            raise ValueError("num_experts_per_tok exceeds the experts in the selected groups")
        return self

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0


CONFIG_CLASSES: dict[str, type[CommonConfig]] = {
    "DeepseekV3ForCausalLM": DeepseekV3Config,
    "MixtralForCausalLM": GqaMoeConfig,
    "Qwen3MoeForCausalLM": GqaMoeConfig,
}
_DEFAULT_THETA = {"DeepseekV3ForCausalLM": 10000.0, "MixtralForCausalLM": 1e6, "Qwen3MoeForCausalLM": 10000.0}


def read_hf_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{model_dir}: no config.json (is this a model directory?)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw


def config_from_dict(raw: dict, where: str = "config.json") -> CommonConfig:
    archs = raw.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1:
        raise CheckpointError(f"{where}: architectures must list exactly one model class, got {archs!r}")
    arch = archs[0]
    if arch not in CONFIG_CLASSES:
        raise CheckpointError(f"{where}: architectures[0] {arch!r} is not supported (supported: {', '.join(CONFIG_CLASSES)})")
    rope = _rope_from_hf(raw, _DEFAULT_THETA[arch])
    rope_where = rope.pop("_where")
    try:
        return CONFIG_CLASSES[arch].model_validate({**raw, "architecture": arch, "rope": rope})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        if loc.startswith("rope"):
            loc = rope_where + loc[len("rope"):]
        elif not loc:
            loc = "(model)"
        raise CheckpointError(f"{where}: {loc}: {err['msg']}") from None


def parse_model_config(model_dir: str | Path) -> CommonConfig:
    return config_from_dict(read_hf_config(model_dir), f"{Path(model_dir) / 'config.json'}")
