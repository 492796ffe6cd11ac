"""Dense products on CPU from weights prepared once at load.

Measured on the 2-core AVX2 development machine (2 threads, each weight read from memory, not cache):
- torch's bf16 GEMM has no bf16 matrix instructions to use and runs 2-5x slower than fp32 SGEMM from 4 rows up
  (8 rows x 576 -> 3072: 2.9 ms bf16, 2.1 ms fp32). Both accumulate in fp32, so an fp32 copy of the weight,
  with the product rounded to the activation dtype, gives the bf16 GEMM's result up to fp32 summation order.
- The same fp32 weight packed once into oneDNN's blocked layout is 2-4x faster again from 4 rows up (0.70 ms at 8
  rows; the 49152-row LM head 9.9 ms against 45 ms) and about as fast as plain fp32 at one row.
- One row is bound by memory bandwidth: there the bf16 weight itself, half the bytes, is fastest (576 -> 576:
  80 us bf16, 123 us fp32, 129 us packed).
oneDNN's packed kernels are not covered by the batch-invariant overrides (runtime.batch_invariant), which reach
aten's matmuls only; deterministic mode therefore keeps plain fp32 weights (`fast=False`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# oneDNN picks its packed layout for this many rows; any row count can use it.
_PACK_BATCH_HINT = 8


def wants_fp32_compute(weight: torch.Tensor) -> bool:
    """True for a half-precision weight on CPU (the case this module speeds up)."""
    return weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


def pack_for_onednn(weight: torch.Tensor) -> torch.Tensor:
    """An fp32 [out, in] weight in oneDNN's packed layout (an opaque tensor only onednn_linear reads)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous(), batch_size=_PACK_BATCH_HINT)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] (made fp32) times a pack_for_onednn weight: the fp32 product [..., out_features]."""
    lead = x.shape[:-1]
    bias = None if bias is None else bias.float()
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).float(), packed, bias, "none", [], "")
    return y.reshape(*lead, out_features)


class CpuDenseWeight:
    """The CPU compute copies of a half-precision [out, in] weight; `linear` returns the product in x.dtype.

    fast=False: an fp32 copy (deterministic mode). fast=True: an fp32 copy packed for oneDNN, and with
    `half_for_one_row` the half-precision weight itself for one-row products.
    """

    def __init__(self, weight: torch.Tensor, fast: bool, half_for_one_row: bool = False):
        self.out_features = weight.shape[0]
        fast = fast and onednn_available()
        self.packed = pack_for_onednn(weight) if fast else None
        self.fp32 = None if fast else weight.detach().float().contiguous()
        self.half = weight.detach() if fast and half_for_one_row else None

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.half is not None and x.numel() == x.shape[-1]:
            return F.linear(x.to(self.half.dtype), self.half, None if bias is None else bias.to(self.half.dtype)).to(x.dtype)
        if self.packed is not None:
            return onednn_linear(x, self.packed, self.out_features, bias).to(x.dtype)
        return F.linear(x.float(), self.fp32, None if bias is None else bias.float()).to(x.dtype)
