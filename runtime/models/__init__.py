"""Model families by config.json `architectures`, and `load_model`, the one way to get a servable model."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from runtime.config import CommonConfig, config_from_dict, read_hf_config
from runtime.errors import CheckpointError
from runtime.loader import CheckpointReader, load_checkpoint
from runtime.models.base import CausalLMBase
from runtime.models.deepseek_v3 import DeepseekV3ForCausalLM
from runtime.models.gqa_moe import GqaMoeForCausalLM
from runtime.parallel import SINGLE, ParallelContext
from runtime.quant.schemes import resolve_quant_config

log = logging.getLogger(__name__)

MODEL_FAMILIES: dict[str, type[CausalLMBase]] = {
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "MixtralForCausalLM": GqaMoeForCausalLM,
    "Qwen3MoeForCausalLM": GqaMoeForCausalLM,
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise CheckpointError(f"dtype {dtype!r} is not supported (choose {', '.join(DTYPES)})")


def load_model(
    model_dir: str | Path,
    quantization: str = "auto",
    dtype: torch.dtype | str = torch.bfloat16,
    moe_backend: str = "auto",
    parallel: ParallelContext = SINGLE,
    device: torch.device | str = "cpu",
    linear_backend: str = "auto",
    batch_invariant: bool = False,
) -> tuple[CausalLMBase, CommonConfig]:
    """Build the model of `model_dir` for this rank and fill it from the checkpoint.

    model_dir: a transformers-style directory (config.json + safetensors, sharded with an index or not).
    quantization: "auto" (detected as SGLang does: config.json quantization_config, else hf_quant_config.json
      MIXED_PRECISION = w4afp8, else unquantized) or one of "bf16", "fp8", "w4afp8", which must match the
      checkpoint.
    dtype: activations and unquantized weights ("bfloat16" or "float32").
    moe_backend / linear_backend: backend names from runtime.backends ("auto" = best available on device).
    batch_invariant: select only batch-invariant backends (deterministic serving; see runtime.batch_invariant).
    parallel: this process's rank, world size and MoE layout; only this rank's shards are read.
    Returns (model implementing runtime.model_api.CausalLM, validated config). Raises CheckpointError for a
    directory, config or tensor it cannot load (the message names what is wrong).
    """
    model_dir = Path(model_dir)
    hf_config = read_hf_config(model_dir)
    config = config_from_dict(hf_config, str(model_dir / "config.json"))
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    start = time.perf_counter()
    reader = CheckpointReader(model_dir)
    quant = resolve_quant_config(model_dir, hf_config, reader, quantization, moe_backend=moe_backend,
                                 linear_backend=linear_backend, batch_invariant=batch_invariant)
    family = MODEL_FAMILIES[config.architecture]
    with torch.no_grad():
        model = family(config, quant, parallel, dtype, device)
        load_checkpoint(model, reader)
        model.process_weights_after_loading()
    model.eval()
    log.info(
        "loaded %s (%s, %s) from %s in %.1fs, rank %d/%d",
        config.architecture, quant.name, str(dtype).removeprefix("torch."), model_dir, time.perf_counter() - start,
        parallel.rank, parallel.world_size,
    )
    return model, config
