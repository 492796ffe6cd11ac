"""Forward-pass cost of the demo model variants on this machine (no engine): load time, prefill throughput and
single-sequence decode step time, per MoE/linear backend.

    python bench/model_step.py [--variants bf16,fp8,w4afp8] [--backends auto,torch] [--prompt 64] [--steps 16]

Medians of wall-clock and of this process's CPU time (the latter is less disturbed by other processes on a shared
machine; with several threads it counts all of them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from runtime.models import load_model
from runtime.tools.demo_model import VARIANTS, demo_model_path
from runtime.tools.standalone import SingleSequence


def measure(variant: str, backend: str, prompt: int, steps: int) -> dict:
    path = demo_model_path(variant)
    start = time.perf_counter()
    model, config = load_model(path, moe_backend=backend, linear_backend=backend)
    load_s = time.perf_counter() - start
    prefill, decode = [], []

    def timed(fn) -> tuple[float, float]:
        w, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w, time.process_time() - c

    for _ in range(3):
        seq = SingleSequence(model, prompt + steps)
        prefill.append(timed(lambda: seq.step(list(range(100, 100 + prompt)))))
        decode += [timed(lambda: seq.step([42])) for _ in range(steps)]
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    return {
        "load_s": load_s,
        "prefill_tok_s": prompt / med(prefill, 0), "prefill_cpu_tok_s": prompt / med(prefill, 1),
        "decode_ms": 1000 * med(decode, 0), "decode_cpu_ms": 1000 * med(decode, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--backends", default="auto,torch")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, prompt {args.prompt} tokens, {args.steps} decode steps x 3")
    print(f"{'variant':8} {'backend':8} {'load s':>7} {'prefill tok/s (cpu)':>20} {'decode ms/step (cpu)':>21}")
    for variant in args.variants.split(","):
        for backend in args.backends.split(","):
            if variant == "bf16" and backend != "auto":
                continue  # bf16 has a single backend
            r = measure(variant, backend, args.prompt, args.steps)
            print(
                f"{variant:8} {backend:8} {r['load_s']:7.2f} {r['prefill_tok_s']:10.1f} ({r['prefill_cpu_tok_s']:6.1f})"
                f" {r['decode_ms']:12.1f} ({r['decode_cpu_ms']:6.1f})"
            )


if __name__ == "__main__":
    main()
