"""Planted faults, for tests that the accuracy gate catches real regressions. Never set in production.

`EVALPIPE_FAULT=KIND:LAYER[:ARG]` (several separated by commas) corrupts one decoder layer's W4AFP8 routed
experts after loading, the way a real bug would:

* `permute_group_scales:LAYER` - every expert's group scales (gate/up and down) rotated by one group along K,
  so each group of int4 weights is dequantized with its neighbour's scale (a scale-layout bug).
* `clip_act_scale:LAYER[:FACTOR]` - the static FP8 activation scales divided by FACTOR (default 16), so
  activations above 448 * scale / FACTOR saturate in the FP8 quantization (a bad calibration).

A server with a planted fault says so in its log at start-up.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch

from runtime.errors import CheckpointError

log = logging.getLogger(__name__)

FAULT_ENV = "EVALPIPE_FAULT"
KINDS = ("permute_group_scales", "clip_act_scale")
DEFAULT_CLIP_FACTOR = 16.0
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Fault:
    kind: str
    layer: int
    factor: float = DEFAULT_CLIP_FACTOR


def parse_faults(value: str | None) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in (value or "").split(","))):
        kind, _, rest = item.partition(":")
        layer, _, arg = rest.partition(":")
        if kind not in KINDS or not layer.isdigit():
            raise CheckpointError(f"{FAULT_ENV}: {item!r} is not KIND:LAYER[:ARG] with KIND one of {', '.join(KINDS)}")
        try:
            factor = float(arg) if arg else DEFAULT_CLIP_FACTOR
        except ValueError:
            raise CheckpointError(f"{FAULT_ENV}: {item!r}: {arg!r} is not a number") from None
        faults.append(Fault(kind, int(layer), factor))
    return faults


def faults_for(prefix: str) -> list[Fault]:
    """The faults planted (by the environment) in the layer whose module prefix is `prefix`."""
    match = _LAYER.search(prefix)
    if match is None:
        return []
    return [f for f in parse_faults(os.environ.get(FAULT_ENV)) if f.layer == int(match.group(1))]


def plant_w4afp8_faults(layer: torch.nn.Module, prefix: str) -> None:
    """Corrupt a loaded W4AFP8 MoE layer (scales already in their compute dtype) as the environment asks."""
    for fault in faults_for(prefix):
        log.warning("PLANTED FAULT %s in %s (%s is set: results of this server are wrong on purpose)",
                    fault, prefix, FAULT_ENV)
        if fault.kind == "permute_group_scales":
            for name in ("w13_weight_scale_inv", "w2_weight_scale_inv"):
                scales = getattr(layer, name)
                scales.data.copy_(torch.roll(scales.data, shifts=1, dims=-1))
        else:
            for name in ("w13_input_scale", "w2_input_scale"):
                scale = getattr(layer, name)
                scale.data.div_(fault.factor)
