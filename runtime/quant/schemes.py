"""The quantization schemes by name, and which one a checkpoint is stored in.

The map is written out, as in SGLang's quantization/__init__.py: a new scheme is a QuantConfig subclass
(runtime.quant.base) listed here; nothing registers itself on import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.errors import CheckpointError
from runtime.quant.base import QuantConfig
from runtime.quant.bf16 import Bf16Config
from runtime.quant.fp8 import Fp8Config
from runtime.quant.w4afp8 import W4AFp8Config

if TYPE_CHECKING:
    from runtime.loader import CheckpointReader

QUANT_SCHEMES: dict[str, type[QuantConfig]] = {cls.name: cls for cls in (Bf16Config, Fp8Config, W4AFp8Config)}


def read_hf_quant_config(model_dir: Path) -> dict | None:
    path = Path(model_dir) / "hf_quant_config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def detect_quantization(model_dir: Path, hf_config: dict) -> str:
    """The scheme a checkpoint is stored in, the way SGLang decides it.

    config.json `quantization_config` wins; without it, hf_quant_config.json with quantization.quant_algo
    MIXED_PRECISION (and no per-layer `quantized_layers` map) is SGLang's DeepSeek-R1-W4AFP8 format.
    """
    qc = hf_config.get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        if method == "fp8":
            return "fp8"
        if method == "w4afp8":
            return "w4afp8"
        raise CheckpointError(f"config.json: quantization_config.quant_method {method!r} is not supported (supported: fp8, w4afp8)")
    hq = read_hf_quant_config(model_dir)
    if hq is not None:
        quant = hq.get("quantization") or {}
        algo = quant.get("quant_algo")
        if algo == "MIXED_PRECISION" and not quant.get("quantized_layers"):
            return "w4afp8"
        if algo is not None:
            raise CheckpointError(f"hf_quant_config.json: quantization.quant_algo {algo!r} is not supported (supported: MIXED_PRECISION)")
    return "bf16"


def resolve_quant_config(model_dir: Path, hf_config: dict, reader: "CheckpointReader", requested: str = "auto", **options) -> QuantConfig:
    """The QuantConfig for a checkpoint; an explicit `requested` scheme must match what the checkpoint holds."""
    detected = detect_quantization(model_dir, hf_config)
    if requested not in ("auto", *QUANT_SCHEMES):
        raise CheckpointError(f"quantization {requested!r} is unknown (choose auto, {', '.join(QUANT_SCHEMES)})")
    if requested != "auto" and requested != detected:
        raise CheckpointError(f"quantization {requested!r} requested, but {model_dir} holds a {detected} checkpoint")
    return QUANT_SCHEMES[detected].from_checkpoint(Path(model_dir), hf_config, reader, **options)
