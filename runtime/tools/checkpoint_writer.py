"""Writing safetensors checkpoints shard by shard (bounded memory) with a transformers-style index."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from runtime.loader import INDEX_FILE


class ShardWriter:
    """Collects tensors and flushes a shard whenever `max_shard_bytes` is reached; `close()` names the shards
    model-0000i-of-0000n.safetensors and writes the index (extra entries may point into other files)."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 << 30):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        self.pending[name] = tensor
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            save_file(self.pending, str(self.out_dir / f"shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
            self.shards.append(list(self.pending))
            self.total_bytes += self.pending_bytes
            self.pending, self.pending_bytes = {}, 0

    def close(self, extra_weight_map: dict[str, str] | None = None) -> dict[str, str]:
        self._flush()
        n = len(self.shards)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out_dir / f"shard-{i:05d}.tmp").rename(self.out_dir / final)
            weight_map.update({name: final for name in names})
        weight_map.update(extra_weight_map or {})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map
