"""DeepSeek-R1 widths end to end on one device: write a synthetic FP8 checkpoint (full hidden size, MLA with 128
heads, experts of width 2048; fewer layers and experts than R1 so it fits), quantize it to W4AFP8 with
calibration, load both, and print sizes, times and how far the W4AFP8 logits move from FP8.

    python bench/synthetic_r1.py --out /tmp/r1 [--layers 4] [--dense-layers 3] [--experts 16] [--device cuda]
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from runtime.models import load_model
from runtime.tools.quantize import quantize_checkpoint
from runtime.tools.standalone import SingleSequence
from runtime.tools.synthetic import R1_SHAPE, write_synthetic_deepseek_fp8


def dir_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir()) / 2**30


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_model(path: Path, device: str, prompt: list[int], steps: int) -> tuple[float, torch.Tensor, float, float]:
    t = time.perf_counter()
    model, _ = load_model(path, device=device)
    sync(device)
    load_s = time.perf_counter() - t
    seq = SingleSequence(model, len(prompt) + steps, device=device)
    t = time.perf_counter()
    logits = seq.step(prompt)
    sync(device)
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        seq.step([int(logits[-1].argmax())])
    sync(device)
    decode_ms = 1000 * (time.perf_counter() - t) / steps
    del model, seq
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return load_s, logits.cpu(), prefill_s, decode_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dense-layers", type=int, default=3)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    shape = replace(R1_SHAPE, num_hidden_layers=args.layers, first_k_dense_replace=args.dense_layers, n_routed_experts=args.experts)
    shutil.rmtree(args.out, ignore_errors=True)
    t = time.perf_counter()
    fp8 = write_synthetic_deepseek_fp8(args.out / "fp8", shape, device=args.device)
    print(f"synthetic FP8 checkpoint: {dir_gib(fp8):.2f} GiB in {time.perf_counter() - t:.1f} s ({shape.num_hidden_layers} layers, {shape.n_routed_experts} experts)")
    t = time.perf_counter()
    w4 = quantize_checkpoint(fp8, args.out / "w4afp8", "w4afp8", calib_samples=8, calib_max_len=64, device=args.device)
    print(f"W4AFP8 checkpoint: {dir_gib(w4):.2f} GiB in {time.perf_counter() - t:.1f} s")
    prompt = list(range(1000, 1000 + args.prompt))
    results = {}
    for name, path in (("fp8", fp8), ("w4afp8", w4)):
        load_s, logits, prefill_s, decode_ms = run_model(path, args.device, prompt, args.steps)
        results[name] = logits
        print(f"{name:7} load {load_s:6.1f} s  prefill {args.prompt} tokens {prefill_s:6.2f} s  decode {decode_ms:7.1f} ms/step (torch reference)")
    a, b = results["fp8"], results["w4afp8"]
    rel = ((a - b).abs().mean() / a.abs().mean()).item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"W4AFP8 vs FP8 logits: mean |diff| / mean |logit| = {rel:.3f}, arg-max agreement {agree:.2f} over {args.prompt} positions")


if __name__ == "__main__":
    main()
