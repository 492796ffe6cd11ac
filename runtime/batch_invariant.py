"""Batch-invariant numerics: a row's result must not depend on how many other rows share the call.

Matrix products and last-dimension reductions pick their algorithm by shape: on this project's CPUs an fp32 GEMM
with 1, 2-3 or 4+ rows sums in three different orders, and a reduction over a long row splits across threads
only when few rows are present (GPUs do the same with split-K and multi-block reductions). A request's logits
then depend on the rest of the batch. Inside `batch_invariant_mode(row_chunk)` these operators run on blocks of
exactly `row_chunk` rows (the last block zero-padded), so every call has the same shape and the same algorithm
whatever the batch; within a block, rows are computed alike (checked by tests/test_deterministic.py).

The mode overrides the CPU and CUDA kernels of aten operators (the approach of Thinking Machines'
batch_invariant_ops), so it reaches every matmul of every layer and MoE backend without their cooperation. It is
process-wide while any holder is inside it (reference counted); the engine enters it around each step.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

aten = torch.ops.aten

DEFAULT_ROW_CHUNK = 32
_DEVICE_KEYS = ("CPU", "CUDA")


def _blocks(a: torch.Tensor, dim: int, chunk: int, fn: Callable[[torch.Tensor, slice], torch.Tensor]) -> torch.Tensor:
    """Apply `fn(block, rows)` to blocks of exactly `chunk` rows of `a` along `dim` and concatenate along `dim`.

    `fn` gets the (padded) block and the slice of real rows it covers; its output has `chunk` rows along `dim`.
    """
    n = a.shape[dim]
    parts = []
    for start in range(0, max(n, 1), chunk):
        rows = slice(start, min(start + chunk, n))
        block = a.narrow(dim, start, rows.stop - start)
        if block.shape[dim] < chunk:
            shape = list(a.shape)
            shape[dim] = chunk
            padded = a.new_zeros(shape)
            padded.narrow(dim, 0, block.shape[dim]).copy_(block)
            block = padded
        parts.append(fn(block, rows).narrow(dim, 0, rows.stop - start))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _last_dim(x: torch.Tensor, dims) -> bool:
    """True when `dims` names exactly the last dimension of a tensor with at least one row dimension."""
    if x.dim() < 2 or dims is None or len(dims) != 1:
        return False
    return dims[0] % x.dim() == x.dim() - 1


def _reduce_dtype(x: torch.Tensor, dtype: torch.dtype | None, integral_to_long: bool) -> torch.dtype:
    if dtype is not None:
        return dtype
    if integral_to_long and not (x.is_floating_point() or x.is_complex()):
        return torch.int64
    return x.dtype


class _Overrides:
    """Kernels that route to the operators' out= variants (not overridden) on fixed-size row blocks."""

    def __init__(self, chunk: int):
        self.chunk = chunk

    def mm(self, a, b):
        def block(x, _):
            return aten.mm.out(x, b, out=x.new_empty(x.shape[0], b.shape[1]))

        return _blocks(a, 0, self.chunk, block)

    def addmm(self, bias, a, b, *, beta=1, alpha=1):
        per_row_bias = bias.dim() == 2 and bias.shape[0] == a.shape[0] and a.shape[0] > 1

        def block(x, rows):
            c = bias[rows] if per_row_bias else bias
            if per_row_bias and c.shape[0] < x.shape[0]:
                c = torch.cat((c, c.new_zeros(x.shape[0] - c.shape[0], *c.shape[1:])))
            return aten.addmm.out(c, x, b, beta=beta, alpha=alpha, out=x.new_empty(x.shape[0], b.shape[1]))

        return _blocks(a, 0, self.chunk, block)

    def bmm(self, a, b):
        def block(x, _):
            return aten.bmm.out(x, b, out=x.new_empty(x.shape[0], x.shape[1], b.shape[2]))

        return _blocks(a, 1, self.chunk, block)

    def _rows(self, x, fn):
        """Run a last-dimension operator on x viewed as [rows, last] in fixed blocks; reshape back."""
        flat = x.reshape(-1, x.shape[-1])
        out = _blocks(flat, 0, self.chunk, lambda blk, _: fn(blk))
        return out.reshape(*x.shape[:-1], *out.shape[1:])

    def mean(self, x, dim, keepdim=False, *, dtype=None):
        return self._reduce(aten.mean.out, x, dim, keepdim, dtype, _reduce_dtype(x, dtype, integral_to_long=False))

    def sum(self, x, dim, keepdim=False, *, dtype=None):
        return self._reduce(aten.sum.IntList_out, x, dim, keepdim, dtype, _reduce_dtype(x, dtype, integral_to_long=True))

    def _reduce(self, op, x, dim, keepdim, dtype, out_dtype):
        def run(t, d, k):
            return op(t, d, k, dtype=dtype, out=t.new_empty(0, dtype=out_dtype))

        if not _last_dim(x, dim):
            return run(x, dim, keepdim)
        out = self._rows(x, lambda t: run(t, [-1], True))
        return out if keepdim else out.squeeze(-1)

    def cumsum(self, x, dim, *, dtype=None):
        # CUDA scans a single row with a different algorithm (cub) than a batch of rows: the sampler's CDF, and
        # with it a seeded draw, would depend on how many rows were sampled together.
        out_dtype = _reduce_dtype(x, dtype, integral_to_long=True)

        def run(t, d):
            return aten.cumsum.out(t, d, dtype=dtype, out=t.new_empty(0, dtype=out_dtype))

        if x.dim() < 2 or dim % x.dim() != x.dim() - 1:
            return run(x, dim)
        return self._rows(x, lambda t: run(t, -1))

    def softmax(self, x, dim, half_to_float):
        return self._softmax_like(aten._softmax.out, x, dim, half_to_float)

    def log_softmax(self, x, dim, half_to_float):
        return self._softmax_like(aten._log_softmax.out, x, dim, half_to_float)

    def _softmax_like(self, op, x, dim, half_to_float):
        out_dtype = torch.float32 if half_to_float else x.dtype

        def run(t, d):
            return op(t, d, half_to_float, out=t.new_empty(0, dtype=out_dtype))

        if x.dim() < 2 or dim % x.dim() != x.dim() - 1:
            return run(x, dim)
        return self._rows(x, lambda t: run(t, -1))


_lock = threading.Lock()
_holders = 0
_library: torch.library.Library | None = None


def _register(chunk: int) -> torch.library.Library:
    ops = _Overrides(chunk)
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel" is the point
        for key in _DEVICE_KEYS:
            lib.impl("mm", ops.mm, key)
            lib.impl("addmm", ops.addmm, key)
            lib.impl("bmm", ops.bmm, key)
            lib.impl("mean.dim", ops.mean, key)
            lib.impl("sum.dim_IntList", ops.sum, key)
            lib.impl("cumsum", ops.cumsum, key)
            lib.impl("_softmax", ops.softmax, key)
            lib.impl("_log_softmax", ops.log_softmax, key)
    return lib


@contextmanager
def batch_invariant_mode(row_chunk: int = DEFAULT_ROW_CHUNK) -> Iterator[None]:
    """Run matmuls and last-dimension reductions on fixed blocks of `row_chunk` rows (process-wide while held).

    Nested or concurrent holders share one registration; they must agree on `row_chunk`.
    """
    global _holders, _library
    with _lock:
        if _holders == 0:
            _library = _register(row_chunk)
            _library.row_chunk = row_chunk
        elif _library.row_chunk != row_chunk:
            raise ValueError(f"batch-invariant mode is active with row_chunk {_library.row_chunk}, not {row_chunk}")
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                _library._destroy()
                _library = None
