"""A tiny GQA transformer with random weights that implements the CausalLM contract over a paged KV cache.

It exercises everything the engine relies on (slot mapping, block tables, chunked prefill, decode against cached
K/V) while staying cheap enough for CI. `reference_logits` runs the same weights on a whole sequence without any
cache: the engine's outputs (greedy tokens, prompt logprobs) are checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.model_api import ForwardBatch, KVCacheSpec


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    rope_theta: float = 10000.0
    dtype: torch.dtype = torch.float32


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE on x [T, heads, head_dim]."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = positions.float()[:, None] * freqs[None, :]
    cos, sin = angles.cos()[:, None, :].to(x.dtype), angles.sin()[:, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int) -> torch.Tensor:
    """q [Tq, H, D] at positions q_offset.., k/v [Tk, KVH, D] at positions 0..; returns [Tq, H, D]."""
    tq, tk = q.shape[0], k.shape[0]
    mask = torch.arange(tk, device=q.device)[None, :] <= (q_offset + torch.arange(tq, device=q.device))[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         enable_gqa=True)
    return out.transpose(0, 1)


class TinyGQALM(nn.Module):
    def __init__(self, config: TinyConfig, seed: int = 0):
        super().__init__()
        self.config = c = config
        g = torch.Generator().manual_seed(seed)

        def param(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter((torch.randn(*shape, generator=g) * std).to(c.dtype), requires_grad=False)

        h, qd, kvd = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.embed = param(c.vocab_size, h, std=1.0)
        self.layers = nn.ModuleList()
        for _ in range(c.num_layers):
            layer = nn.Module()
            layer.attn_norm = nn.Parameter(torch.ones(h, dtype=c.dtype), requires_grad=False)
            layer.qkv = param(qd + 2 * kvd, h, std=h**-0.5)
            layer.o = param(h, qd, std=qd**-0.5)
            layer.mlp_norm = nn.Parameter(torch.ones(h, dtype=c.dtype), requires_grad=False)
            layer.gate_up = param(2 * c.intermediate_size, h, std=h**-0.5)
            layer.down = param(h, c.intermediate_size, std=c.intermediate_size**-0.5)
            self.layers.append(layer)
        self.final_norm = nn.Parameter(torch.ones(h, dtype=c.dtype), requires_grad=False)
        # Untied and sharper than 1/sqrt(h), so that greedy continuations vary instead of echoing the input.
        self.lm_head = param(c.vocab_size, h, std=3 * h**-0.5)

    def kv_cache_spec(self) -> KVCacheSpec:
        c = self.config
        return KVCacheSpec(c.num_layers, (2, c.num_kv_heads, c.head_dim), c.dtype)

    def _layer(self, layer: nn.Module, x: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        c = self.config
        qd, kvd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q, k, v = (_rms_norm(x, layer.attn_norm) @ layer.qkv.T).split([qd, kvd, kvd], dim=-1)
        q = _rope(q.view(-1, c.num_heads, c.head_dim), positions, c.rope_theta)
        k = _rope(k.view(-1, c.num_kv_heads, c.head_dim), positions, c.rope_theta)
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        x = x + attend(q, k, v).reshape(-1, qd) @ layer.o.T
        gate, up = (_rms_norm(x, layer.mlp_norm) @ layer.gate_up.T).chunk(2, dim=-1)
        return x + (F.silu(gate) * up) @ layer.down.T

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed[batch.input_ids]
        for layer, cache in zip(self.layers, batch.kv_caches):

            def paged_attend(q, k, v, cache=cache):
                cache[batch.slot_mapping] = torch.stack([k, v], dim=1)
                out, start = [], 0
                for b, (ql, cl) in enumerate(zip(batch.query_lens, batch.context_lens)):
                    blocks = batch.block_tables[b, : -(-cl // batch.block_size)]
                    slots = (blocks[:, None] * batch.block_size + torch.arange(batch.block_size, device=blocks.device)).flatten()[:cl]
                    kv = cache[slots]
                    out.append(_causal_attention(q[start : start + ql], kv[:, 0], kv[:, 1], cl - ql))
                    start += ql
                return torch.cat(out)

            x = self._layer(layer, x, batch.positions, paged_attend)
        return _rms_norm(x, self.final_norm)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.lm_head.T).float()

    @torch.inference_mode()
    def reference_logits(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 logits [N, vocab] for every position of one sequence, computed without a KV cache."""
        ids = torch.tensor(token_ids)
        x = self.embed[ids]
        for layer in self.layers:
            x = self._layer(layer, x, torch.arange(len(ids)), lambda q, k, v: _causal_attention(q, k, v, 0))
        return self.compute_logits(_rms_norm(x, self.final_norm))
