"""What every decoder family shares: embedding -> decoder layers -> final norm -> LM head, checkpoint naming
(module paths mirror the transformers checkpoints) and the after-loading pass."""

from __future__ import annotations

import re

import torch
from torch import nn

from runtime.config import CommonConfig
from runtime.layers.attention import AttentionMetadata
from runtime.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from runtime.layers.norm import RMSNorm
from runtime.model_api import ForwardBatch, KVCacheSpec
from runtime.parallel import ParallelContext
from runtime.quant.base import QuantConfig

_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.mlp = mlp

    def forward(self, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions, meta, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    def __init__(self, config: CommonConfig, layers: list[DecoderLayer], parallel: ParallelContext, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel, dtype, device)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)


class CausalLMBase(nn.Module):
    """Implements runtime.model_api.CausalLM; a family supplies `make_layer` and `kv_cache_spec`."""

    # checkpoint spelling -> module path spelling (e.g. Mixtral's block_sparse_moe is our mlp)
    checkpoint_renames: dict[str, str] = {}
    sliding_window: int | None = None

    def __init__(self, config: CommonConfig, quant: QuantConfig, parallel: ParallelContext, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config = config
        self.quant = quant
        self.parallel = parallel
        self.dtype = dtype
        layers = [self.make_layer(i, f"model.layers.{i}", dtype, device) for i in range(config.num_hidden_layers)]
        self.model = DecoderModel(config, layers, parallel, dtype, device)
        self.lm_head = ParallelLMHead(self.model.embed_tokens, config.tie_word_embeddings, dtype, device)

    def make_layer(self, i: int, prefix: str, dtype: torch.dtype, device: torch.device) -> DecoderLayer:
        raise NotImplementedError

    def kv_cache_spec(self) -> KVCacheSpec:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        meta = AttentionMetadata.from_batch(batch, self.sliding_window)
        h = self.model.embed_tokens(batch.input_ids)
        for layer, kv_cache in zip(self.model.layers, batch.kv_caches, strict=True):
            h = layer(h, batch.positions, meta, kv_cache)
        return self.model.norm(h)

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def checkpoint_name(self, name: str) -> str | None:
        """Module path for a checkpoint tensor, or None for tensors this model does not use."""
        layer = _LAYER_INDEX.match(name)
        if layer and int(layer[1]) >= self.config.num_hidden_layers:
            return None  # multi-token-prediction layers (DeepSeek layer 61) are not served
        if name.endswith("rotary_emb.inv_freq") or (self.config.tie_word_embeddings and name == "lm_head.weight"):
            return None
        for old, new in self.checkpoint_renames.items():
            name = name.replace(old, new)
        return name

    def process_weights_after_loading(self) -> None:
        # Module hooks (MLA weight absorption) see the weights as loaded, before methods re-lay them out.
        for module in list(self.modules()):
            if hasattr(module, "after_loading"):
                module.after_loading()
        for module in self.modules():
            if hasattr(module, "quant_method"):
                module.quant_method.process_weights_after_loading(module)
        self.lm_head.prepare_cpu_compute(fast=not self.quant.batch_invariant)
