"""The GQA MoE family: MixtralForCausalLM and Qwen3MoeForCausalLM (softmax top-k routing, no shared experts)."""

from __future__ import annotations

import torch
from torch import nn

from runtime.config import GqaMoeConfig
from runtime.errors import CheckpointError
from runtime.layers.attention import AttentionMetadata, paged_attention
from runtime.layers.linear import Linear
from runtime.layers.mlp import GatedMLP
from runtime.layers.moe import FusedMoE, Router, softmax_topk
from runtime.layers.norm import RMSNorm
from runtime.layers.rotary import RotaryEmbedding
from runtime.model_api import KVCacheSpec
from runtime.models.base import CausalLMBase, DecoderLayer
from runtime.parallel import ParallelContext
from runtime.quant.base import QuantConfig


def kv_head_shards(num_kv_heads: int, parallel: ParallelContext) -> tuple[int, int]:
    """(index, count) of this rank's key/value heads: split them, or replicate when ranks outnumber heads."""
    ws = parallel.world_size
    if num_kv_heads % ws == 0:
        return parallel.rank, ws
    if ws % num_kv_heads == 0:
        return parallel.rank // (ws // num_kv_heads), num_kv_heads
    raise CheckpointError(f"num_key_value_heads={num_kv_heads} and tensor-parallel size {ws}: neither divides the other")


class GqaAttention(nn.Module):
    def __init__(self, config: GqaMoeConfig, quant: QuantConfig, prefix: str, parallel: ParallelContext, dtype, device):
        super().__init__()
        d = config.head_dim
        self.num_heads = parallel.split(config.num_attention_heads, "num_attention_heads")
        kv_shards = kv_head_shards(config.num_key_value_heads, parallel)
        self.num_kv_heads = config.num_key_value_heads // kv_shards[1]
        self.head_dim = d
        common = dict(quant=quant, parallel=parallel, dtype=dtype, device=device, bias=config.attention_bias)
        h = config.hidden_size
        self.q_proj = Linear(h, config.num_attention_heads * d, prefix=f"{prefix}.q_proj", mode="column", **common)
        self.k_proj = Linear(h, config.num_key_value_heads * d, prefix=f"{prefix}.k_proj", mode="column", shards=kv_shards, **common)
        self.v_proj = Linear(h, config.num_key_value_heads * d, prefix=f"{prefix}.v_proj", mode="column", shards=kv_shards, **common)
        self.o_proj = Linear(config.num_attention_heads * d, h, prefix=f"{prefix}.o_proj", mode="row", **common)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, dtype, device)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = RotaryEmbedding(d, config.rope, interleaved=False, device=device)
        self.scale = d**-0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rotary.cos_sin(positions)
        q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
        kv_cache[meta.slot_mapping, 0] = k.to(kv_cache.dtype)
        kv_cache[meta.slot_mapping, 1] = v.to(kv_cache.dtype)
        out = paged_attention(q, kv_cache[:, 0], kv_cache[:, 1], meta, self.scale, kv_cache=kv_cache)
        return self.o_proj(out.reshape(t, -1))


class SparseMoeBlock(nn.Module):
    def __init__(self, config: GqaMoeConfig, quant: QuantConfig, prefix: str, parallel: ParallelContext, dtype, device):
        super().__init__()
        self.parallel = parallel
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.gate = Router(config.num_experts, config.hidden_size, dtype, device)
        self.experts = FusedMoE(
            config.num_experts, config.hidden_size, config.moe_intermediate_size,
            quant=quant, prefix=f"{prefix}.experts", parallel=parallel, dtype=dtype, device=device,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = softmax_topk(self.gate(x), self.top_k, self.renormalize)
        return self.parallel.all_reduce(self.experts(x, ids, weights))


class GqaMoeForCausalLM(CausalLMBase):
    def __init__(self, config: GqaMoeConfig, quant: QuantConfig, parallel: ParallelContext, dtype: torch.dtype, device: torch.device):
        self.checkpoint_renames = {".block_sparse_moe.": ".mlp."} if config.architecture == "MixtralForCausalLM" else {}
        self.sliding_window = config.sliding_window
        super().__init__(config, quant, parallel, dtype, device)

    def make_layer(self, i, prefix, dtype, device):
        c, p = self.config, self.parallel
        attn = GqaAttention(c, self.quant, f"{prefix}.self_attn", p, dtype, device)
        if i in c.dense_layers:
            mlp = GatedMLP(c.hidden_size, c.intermediate_size, quant=self.quant, prefix=f"{prefix}.mlp", parallel=p, dtype=dtype, device=device)
        else:
            mlp = SparseMoeBlock(c, self.quant, f"{prefix}.mlp", p, dtype, device)
        return DecoderLayer(attn, mlp, c.hidden_size, c.rms_norm_eps, dtype, device)

    def kv_cache_spec(self) -> KVCacheSpec:
        attn = self.model.layers[0].self_attn
        return KVCacheSpec(self.config.num_hidden_layers, (2, attn.num_kv_heads, attn.head_dim), self.dtype)
