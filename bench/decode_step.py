"""Decode step time in process (issue 16): ModelRunner.execute on B sequences of C cached tokens, one new token each.

The cache holds zeros (the time of a decode step does not depend on the cached values); every sequence owns its
blocks, handed out shuffled as the engine's allocator would after some traffic. Per batch size: the median step
time over --steps timed steps after a warm-up, replayed from CUDA graphs (captured for --max-model-len, as the
server does) and eagerly, both with the Triton MLA decode kernel, and with --compare-attention eagerly with the
torch attention path (runtime.layers.attention); plus the top kernels of one step (torch profiler).

    python bench/decode_step.py --model R1_W4AFP8_DIR --batch 1 64 --context 1000 [--compare-attention]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from runtime.engine.model_runner import ModelRunner, StepInput
from runtime.models import load_model
from runtime.testing.decode_steps import decode_step_input

BLOCK_SIZE = 16


def time_steps(runner: ModelRunner, step: StepInput, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        runner.execute(step)
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        runner.execute(step)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    return times


def top_kernels(runner: ModelRunner, step: StepInput, n: int = 24) -> tuple[int, list[tuple[str, float, int]]]:
    """(kernel launches, [(kernel, ms, launches)]) of one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.execute(step)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    launches = sum(e.count for e in events)
    ranked = sorted(events, key=lambda e: e.device_time_total, reverse=True)[:n]
    return launches, [(e.key[:90], e.device_time_total / 1000, e.count) for e in ranked]


def set_attention(model, use_kernel: bool, kernels: list) -> None:
    for layer, kernel in zip(model.model.layers, kernels, strict=True):
        layer.self_attn.decode_kernel = kernel if use_kernel else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--moe-backend", default="auto")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--compare-attention", action="store_true", help="also time the torch attention path")
    p.add_argument("--max-model-len", type=int, default=2048, help="context the CUDA graphs are captured for")
    p.add_argument("--top-kernels", type=int, default=24, help="kernels listed per step (most time first)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model, _ = load_model(args.model, device="cuda", moe_backend=args.moe_backend)
    kernels = [layer.self_attn.decode_kernel for layer in model.model.layers]
    blocks_per_seq = -(-(args.context + 1) // BLOCK_SIZE)
    num_blocks = max(args.batch) * blocks_per_seq + 8
    cuda = torch.device("cuda")
    eager = ModelRunner(model, num_blocks, BLOCK_SIZE, cuda)
    t = time.perf_counter()
    graphed = ModelRunner(model, num_blocks, BLOCK_SIZE, cuda, cuda_graph_batch=max(args.batch),
                          max_model_len=args.max_model_len)
    capture_s = time.perf_counter() - t
    gen = torch.Generator().manual_seed(0)
    print(f"# decode step: {torch.cuda.get_device_name()}, torch {torch.__version__}, model {args.model.name}, "
          f"moe backend {args.moe_backend}, context {args.context}; CUDA graphs "
          f"{'captured in %.1f s' % capture_s if graphed.decode_graphs.captured else 'NOT captured (see log)'}")
    results = []
    variants = [("triton-mla+graphs", graphed, True), ("triton-mla", eager, True)]
    if args.compare_attention:
        variants.append(("torch-attention", eager, False))
    for batch in args.batch:
        step = decode_step_input(batch, args.context, num_blocks, BLOCK_SIZE, gen)
        for name, runner, use_kernel in variants:
            if use_kernel and kernels[0] is None:
                continue
            set_attention(model, use_kernel, kernels)
            times = time_steps(runner, step, args.warmup, args.steps)
            launches, top = top_kernels(runner, step, args.top_kernels)
            row = {"batch": batch, "variant": name, "median_ms": statistics.median(times), "min_ms": min(times),
                   "launches": launches, "top_kernels_ms": top}
            results.append(row)
            print(f"batch {batch:3d} {name:18s} median {row['median_ms']:8.2f} ms  min {row['min_ms']:8.2f} ms  "
                  f"{launches} kernel launches")
            for kernel, ms, count in top:
                print(f"    {ms:8.3f} ms {count:4d}x  {kernel}")
    set_attention(model, True, kernels)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
