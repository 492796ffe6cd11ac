"""DeepseekV3ForCausalLM: multi-head latent attention, sigmoid group-limited routing with shared experts,
dense first layers. Multi-token-prediction layers in the checkpoint are skipped."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import torch
from torch import nn

from runtime.config import DeepseekV3Config
from runtime.layers.attention import AttentionMetadata, paged_attention
from runtime.kernels import triton_available
from runtime.layers.linear import Linear, join_output_features
from runtime.layers.mlp import GatedMLP
from runtime.layers.moe import FusedMoE, Router, grouped_sigmoid_topk
from runtime.layers.norm import RMSNorm
from runtime.layers.rotary import RotaryEmbedding, yarn_mscale
from runtime.model_api import KVCacheSpec
from runtime.models.base import CausalLMBase, DecoderLayer
from runtime.parallel import ParallelContext
from runtime.quant.base import QuantConfig


def _gpu_decode_kernel(device, latent_dim: int, rope_dim: int):
    if torch.device(device).type != "cuda" or importlib.util.find_spec("triton") is None:
        return None
    from runtime.kernels.mla_decode import mla_decode, supports

    return mla_decode if supports(latent_dim, rope_dim) else None


class MLAttention(nn.Module):
    """MLA with the up-projection absorbed: queries move into the kv_lora latent space, so the cache holds only
    the normalised compressed kv and the rotated shared rope key per token ([kv_lora_rank + qk_rope_head_dim]).

    kv_b_proj is loaded like any column-parallel linear (by heads), then dequantized into w_kc / w_vc in the
    model dtype (as SGLang does for its absorbed decode path).
    """

    def __init__(self, c: DeepseekV3Config, quant: QuantConfig, prefix: str, parallel: ParallelContext, dtype, device):
        super().__init__()
        self.num_heads = parallel.split(c.num_attention_heads, "num_attention_heads")
        self.nope, self.rope_dim, self.v_dim, self.kv_lora = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        qk = self.nope + self.rope_dim
        heads, h = c.num_attention_heads, c.hidden_size
        common = dict(quant=quant, parallel=parallel, dtype=dtype, device=device)
        if c.q_lora_rank is None:
            self.q_proj = Linear(h, heads * qk, prefix=f"{prefix}.q_proj", mode="column", **common)
        else:
            self.q_a_proj = Linear(h, c.q_lora_rank, prefix=f"{prefix}.q_a_proj", mode="replicated", bias=c.attention_bias, **common)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, dtype, device)
            self.q_b_proj = Linear(c.q_lora_rank, heads * qk, prefix=f"{prefix}.q_b_proj", mode="column", **common)
        self.kv_a_proj_with_mqa = Linear(
            h, self.kv_lora + self.rope_dim, prefix=f"{prefix}.kv_a_proj_with_mqa", mode="replicated", bias=c.attention_bias, **common
        )
        self.kv_a_layernorm = RMSNorm(self.kv_lora, c.rms_norm_eps, dtype, device)
        self.kv_b_proj = Linear(self.kv_lora, heads * (self.nope + self.v_dim), prefix=f"{prefix}.kv_b_proj", mode="column", **common)
        self.o_proj = Linear(heads * self.v_dim, h, prefix=f"{prefix}.o_proj", mode="row", bias=c.attention_bias, **common)
        self.rotary = RotaryEmbedding(self.rope_dim, c.rope, interleaved=c.rope_interleave, device=device)
        self.scale = qk**-0.5
        if c.rope.rope_type == "yarn" and c.rope.mscale_all_dim:
            self.scale *= yarn_mscale(c.rope.factor, c.rope.mscale_all_dim) ** 2
        self.dtype = dtype
        # One new token per sequence on a GPU: the Triton paged MLA decode kernel (runtime.kernels.mla_decode);
        # elsewhere, and for prompt chunks, runtime.layers.attention. None: always the latter.
        self.decode_kernel = _gpu_decode_kernel(device, self.kv_lora, self.rope_dim)

    def after_loading(self) -> None:
        w = self.kv_b_proj.quant_method.dequantized_weight(self.kv_b_proj)
        w = w.view(self.num_heads, self.nope + self.v_dim, self.kv_lora)
        self.register_buffer("w_kc", w[:, : self.nope].to(self.dtype).contiguous())  # [heads, nope, kv_lora]
        self.register_buffer("w_vc", w[:, self.nope :].transpose(1, 2).to(self.dtype).contiguous())  # [heads, kv_lora, v]
        del self.kv_b_proj
        # q_a and kv_a read the same input: on a GPU one GEMM computes both (decode: one launch, not two small ones).
        self.q_a_rows = 0
        if (hasattr(self, "q_a_proj") and self.q_a_proj.weight.is_cuda
                and join_output_features(self.q_a_proj, self.kv_a_proj_with_mqa)):
            self.q_a_rows = self.q_a_layernorm.weight.shape[0]
            del self.kv_a_proj_with_mqa

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        if self.q_a_rows:
            q_a, kv_a = self.q_a_proj(x).split([self.q_a_rows, self.kv_lora + self.rope_dim], dim=-1)
        else:
            q_a = None if hasattr(self, "q_proj") else self.q_a_proj(x)
            kv_a = self.kv_a_proj_with_mqa(x)
        q = self.q_proj(x) if q_a is None else self.q_b_proj(self.q_a_layernorm(q_a))
        q_nope, q_pe = q.view(t, self.num_heads, -1).split([self.nope, self.rope_dim], dim=-1)
        c_kv, k_pe = kv_a.split([self.kv_lora, self.rope_dim], dim=-1)
        cos, sin = self.rotary.cos_sin(positions)
        q_pe, k_pe = self.rotary.rotate(q_pe, cos, sin), self.rotary.rotate(k_pe, cos, sin)
        kv_cache[meta.slot_mapping] = torch.cat((self.kv_a_layernorm(c_kv), k_pe), dim=-1).to(kv_cache.dtype)
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_kc).transpose(0, 1)  # [T, heads, kv_lora]
        out_latent = self._attend(torch.cat((q_latent, q_pe), dim=-1), kv_cache, meta)
        out = torch.bmm(out_latent.transpose(0, 1), self.w_vc).transpose(0, 1)  # [T, heads, v]
        return self.o_proj(out.reshape(t, -1))

    def _attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, heads, kv_lora + rope] -> [T, heads, kv_lora]; decode rows on the GPU kernel when there is one."""
        keys = kv_cache.unsqueeze(1)  # one shared key head: [slots, 1, kv_lora + rope]
        if self.decode_kernel is None:
            return paged_attention(q, keys, keys[..., : self.kv_lora], meta, self.scale)
        d = meta.decode
        if d is not None and d.every_row:  # a pure decode step: no row gathers or scatters
            return self.decode_kernel(q, kv_cache, d.slot_table, d.context_lens, self.kv_lora, self.scale)
        out = q.new_empty(q.shape[0], q.shape[1], self.kv_lora)
        if d is not None:
            out[d.rows] = self.decode_kernel(q[d.rows], kv_cache, d.slot_table, d.context_lens, self.kv_lora, self.scale)
        # A lone decoding sequence (and, in batch-invariant mode, every one) is a span with one new token that
        # sees its whole cache. Attended alone, with splits chosen from its own length: batch-invariant.
        single = [s for s in meta.spans if s.length == 1 and s.mask is None]
        for s in single:
            lens = torch.full((1,), s.slots.shape[0], dtype=torch.int32, device=q.device)
            out[s.start : s.start + 1] = self.decode_kernel(q[s.start : s.start + 1], kv_cache, s.slots[None], lens,
                                                            self.kv_lora, self.scale)
        rest = [s for s in meta.spans if not (s.length == 1 and s.mask is None)]
        if rest:
            prompt_out = paged_attention(q, keys, keys[..., : self.kv_lora], replace(meta, spans=rest, decode=None), self.scale)
            for s in rest:
                out[s.start : s.start + s.length] = prompt_out[s.start : s.start + s.length]
        return out


class DeepseekMoE(nn.Module):
    def __init__(self, c: DeepseekV3Config, quant: QuantConfig, prefix: str, parallel: ParallelContext, dtype, device):
        super().__init__()
        self.c = c
        self.parallel = parallel
        self.gate = Router(c.n_routed_experts, c.hidden_size, dtype, device, correction_bias=True,
                           dsv3_router_gemm=not quant.batch_invariant)  # as SGLang's deterministic mode
        self.experts = FusedMoE(
            c.n_routed_experts, c.hidden_size, c.moe_intermediate_size,
            quant=quant, prefix=f"{prefix}.experts", parallel=parallel, dtype=dtype, device=device,
        )
        # One Triton kernel for the routing on a GPU (runtime/kernels/routing.py), where the shapes allow.
        self.fused_routing = None
        if triton_available(torch.device(device)):
            from runtime.kernels.routing import grouped_sigmoid_topk as fused, supports

            if supports(c.n_routed_experts, c.n_group, c.num_experts_per_tok, c.topk_group):
                self.fused_routing = fused
        self.shared_experts = None
        if c.n_shared_experts:
            self.shared_experts = GatedMLP(
                c.hidden_size, c.moe_intermediate_size * c.n_shared_experts, quant=quant, prefix=f"{prefix}.shared_experts",
                parallel=parallel, dtype=dtype, device=device, reduce_output=False,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.c
        logits = self.gate(x)
        route = self.fused_routing if self.fused_routing is not None and logits.is_cuda else grouped_sigmoid_topk
        weights, ids = route(logits, self.gate.e_score_correction_bias, c.num_experts_per_tok, c.n_group, c.topk_group, c.norm_topk_prob)
        out = self.experts(x, ids, weights, c.routed_scaling_factor)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return self.parallel.all_reduce(out)


class DeepseekV3ForCausalLM(CausalLMBase):
    def make_layer(self, i, prefix, dtype, device):
        c, p = self.config, self.parallel
        attn = MLAttention(c, self.quant, f"{prefix}.self_attn", p, dtype, device)
        if c.is_moe_layer(i):
            mlp = DeepseekMoE(c, self.quant, f"{prefix}.mlp", p, dtype, device)
        else:
            mlp = GatedMLP(c.hidden_size, c.intermediate_size, quant=self.quant, prefix=f"{prefix}.mlp", parallel=p, dtype=dtype, device=device)
        return DecoderLayer(attn, mlp, c.hidden_size, c.rms_norm_eps, dtype, device)

    def kv_cache_spec(self) -> KVCacheSpec:
        c = self.config
        return KVCacheSpec(c.num_hidden_layers, (c.kv_lora_rank + c.qk_rope_head_dim,), self.dtype)
