"""What a served model is given: the `evalpipe serve` options (`ServeOptions`, also sent to the other
tensor-parallel ranks as JSON) and the engine's share of them (`EngineOptions`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.config import CommonConfig


@dataclass(frozen=True)
class EngineOptions:
    max_model_len: int  # longest prompt + output; lowered to the KV capacity when that is smaller
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_gib: float | None = None  # None: 2 GiB on CPU, 80% of free memory on a GPU
    deterministic: bool = False  # batch-invariant numerics and scheduling (runtime.batch_invariant)
    enforce_eager: bool = False  # no CUDA graphs for decode steps (runtime.engine.cuda_graphs)


@dataclass(frozen=True)
class ServeOptions:
    """Everything `evalpipe serve` takes."""

    model_dir: Path
    quantization: str = "auto"
    moe_backend: str = "auto"
    dtype: str = "bfloat16"
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    served_model_name: str | None = None  # default: the model directory's name
    max_model_len: int | None = None  # default: max_position_embeddings of config.json
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_gib: float | None = None
    reasoning_parser: str | None = None
    tp: int = 1  # tensor-parallel ranks, one process each
    moe_parallel: str = "tp"  # routed experts: "tp" (intermediate dimension sharded) or "ep" (experts partitioned)
    deterministic: bool = False
    enforce_eager: bool = False

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "model_dir": str(self.model_dir)})

    @classmethod
    def from_json(cls, text: str) -> "ServeOptions":
        fields = json.loads(text)
        return cls(**{**fields, "model_dir": Path(fields["model_dir"])})

    def engine_options(self, config: CommonConfig) -> EngineOptions:
        return EngineOptions(max_model_len=self.max_model_len or config.max_position_embeddings,
                             max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                             kv_cache_gib=self.kv_cache_gib, deterministic=self.deterministic,
                             enforce_eager=self.enforce_eager)
