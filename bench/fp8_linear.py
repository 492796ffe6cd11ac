"""FP8 block linears at decode sizes (issue 16): the Triton kernels of runtime/kernels/fp8_gemm.py at the
DeepSeek-R1 linear shapes, timed from CUDA graphs with the weights rotated through more copies than the L2 holds
(a decode step reads each weight once), against the weight-bytes limit.

Per M: the tiled kernel, the GEMV path with DEFAULT_GEMV, and (at --sweep-m) other GEMV launch shapes; per variant the
time of one batch-1 decode step's linears of the synthetic R1 model (4 layers, 1 dense; see STEP_LINEARS).

    python bench/fp8_linear.py [--m 1 2 4 8 16] [--sweep-m 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

import torch

from runtime.kernels.fp8_gemm import DEFAULT_GEMV, GemvConfig, fp8_block_linear
from runtime.quant.numerics import FP8_BLOCK, FP8_DTYPE

# (name, N, K, uses per decode step of the 4-layer R1-width model: 4 MLA layers, 1 dense MLP, 3 shared experts)
STEP_LINEARS = [
    ("q_a_proj", 1536, 7168, 4), ("q_b_proj", 24576, 1536, 4), ("kv_a_proj", 576, 7168, 4), ("o_proj", 7168, 16384, 4),
    ("dense_gate_up", 18432, 7168, 2), ("dense_down", 7168, 18432, 1),
    ("shared_gate_up", 2048, 7168, 6), ("shared_down", 7168, 2048, 3),
]
SWEEP = [GemvConfig(bn, bk, w, p) for bn, bk, w, p in [
    (16, 512, 4, 4), (16, 1024, 8, 4), (32, 512, 4, 4), (32, 512, 8, 4), (32, 1024, 8, 4), (8, 1024, 4, 4),
    (8, 2048, 4, 4), (16, 512, 4, 8), (16, 256, 4, 8), (64, 256, 4, 4), (16, 512, 4, 2),
]]
L2_ROTATION_BYTES = 256 << 20  # several times the H200's 50 MB L2
log = logging.getLogger("fp8_linear")


def time_us(n: int, k: int, m: int, gemv, reps: int = 10) -> float:
    """Median microseconds per call over graph replays of calls that rotate through weight copies."""
    copies = max(2, -(-L2_ROTATION_BYTES // (n * k)))
    gen = torch.Generator(device="cuda").manual_seed(0)
    ws = [(torch.randn(n, k, device="cuda", generator=gen) * 0.05).to(FP8_DTYPE) for _ in range(copies)]
    scales = [torch.rand(-(-n // FP8_BLOCK), -(-k // FP8_BLOCK), device="cuda", generator=gen) for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    for w, s in zip(ws, scales):  # compile, and allocate the outputs, outside the capture
        fp8_block_linear(x, w, s, gemv=gemv)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w, s in zip(ws, scales):
            fp8_block_linear(x, w, s, gemv=gemv)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / copies)
    del graph, ws, scales
    torch.cuda.empty_cache()
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--sweep-m", type=int, nargs="*", default=[], help="M values at which to time SWEEP's GEMV shapes too")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"# FP8 block linears: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    variants = [("tiled", False), (f"gemv{DEFAULT_GEMV}", DEFAULT_GEMV)]
    sweep = [(f"gemv{c}", c) for c in SWEEP if c != DEFAULT_GEMV]
    rows = []
    for m in args.m:
        for name, gemv in variants + (sweep if m in args.sweep_m else []):
            step_us = 0.0
            per_shape = {}
            for shape, n, k, uses in STEP_LINEARS:
                us = time_us(n, k, m, gemv)
                per_shape[shape] = round(us, 2)
                step_us += us * uses
                print(f"M={m:3d} {name:60s} {shape:15s} {us:8.2f} us  {n * k / us / 1e3:7.0f} GB/s")
            step_bytes = sum(n * k * uses for _, n, k, uses in STEP_LINEARS)
            print(f"M={m:3d} {name:60s} STEP {step_us:9.1f} us  {step_bytes / step_us / 1e3:7.0f} GB/s")
            rows.append({"m": m, "variant": name, "per_shape_us": per_shape, "step_us": round(step_us, 1),
                         "step_gb_per_s": round(step_bytes / step_us / 1e3)})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
