"""Products with unquantized bf16 / fp16 weights on CPU, computed in fp32.

On CPUs without bf16 matrix instructions (the AVX2 development machine) torch's bf16 GEMM runs 4-5x slower than
fp32 SGEMM (one thread, 8 rows x 576 -> 3072: 5.6 ms against 2.1 ms; the 49152-row LM head 89 ms against 43 ms).
Both accumulate in fp32, so an fp32 copy of the weight made once at load, with the product rounded to the
activation dtype, gives the bf16 GEMM's result up to fp32 summation order. Where the caller allows it (not in
deterministic mode, whose batch-invariant overrides only reach aten's matmuls), a weight can instead be packed
once for oneDNN's linear, about twice as fast again for wide weights at decode batch sizes (LM head, 8 rows: 21 ms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# oneDNN picks its packed layout for this many rows; any row count can use it.
_PACK_BATCH_HINT = 8


def wants_fp32_compute(weight: torch.Tensor) -> bool:
    """True for a half-precision weight on CPU (the case this module speeds up)."""
    return weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)


class Fp32CpuWeight:
    """An fp32 copy of a [out, in] weight, optionally packed for oneDNN; `linear` returns the fp32 product."""

    def __init__(self, weight: torch.Tensor, pack: bool = False):
        w = weight.detach().float().contiguous()
        self.packed = pack and torch.backends.mkldnn.is_available()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, batch_size=_PACK_BATCH_HINT) if self.packed else w
        self.out_features = weight.shape[0]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float()
        bias = None if bias is None else bias.float()
        if not self.packed:
            return F.linear(x, self.weight, bias)
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.weight, bias, "none", [], "")
        return y.reshape(*lead, self.out_features)
