"""Tensor parallelism and deterministic mode on GPUs (2 devices, NCCL); prints figures, writes DIR/<device>-tp2.json.

    python bench/gpu_parallel.py --out DIR [--layers 3] [--experts 16] [--tiny-chat-model DIR]
    python bench/gpu_parallel.py --out DIR --device cpu --shape tiny     # the same on a CPU (gloo), to try it

1. Equivalence: a synthetic DeepSeek-R1-width checkpoint (hidden 7168, 128 MLA heads, moe_intermediate 2048,
   vocab 129280; runtime.tools.synthetic) with a few layers, in FP8 and quantized to W4AFP8; 16 random prompts with 8
   greedy tokens each at tp=1 (one process) and at tp=2 (two processes), routed experts in the TP and EP layouts,
   bf16 activations as served, torch backends. Reported per case: logits difference on the prompts (same inputs
   on both sides), arg-max agreement there, identical greedy continuations; W4AFP8 also against a tp=1 run given
   the tp=2 layout's expert numerics (per-rank bf16 partial outputs, EP per-rank activation scales).
   Run in float32 (checks the TP logic) and bf16 (as served), with tp=1 bf16 against tp=1 float32 as the noise
   floor of bf16 rounding on these random full-width layers.
2. Batch invariance on the device (runtime.testing.batch_invariance): 16 requests alone vs in a busy batch of 64,
   with and without --deterministic, greedy and seeded on a tiny Mixtral with a tokenizer if one is given, then
   the busy batch's output tokens per second on the W4AFP8 R1-width stack in both modes (the mode's cost), then
   greedy alone vs busy on that stack.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from runtime.models import load_model
from runtime.testing import batch_invariance as bi
from runtime.testing.tp_equivalence import Case, case_outputs, run_ranks, with_rank_experts
from runtime.tools.quantize import quantize_checkpoint
from runtime.tools.synthetic import R1_SHAPE, DeepseekShape, write_synthetic_deepseek_fp8

NEW_TOKENS = 8


def shape_for(args) -> DeepseekShape:
    if args.shape == "tiny":
        return DeepseekShape(num_hidden_layers=args.layers, num_nextn_predict_layers=0)
    return dataclasses.replace(R1_SHAPE, num_hidden_layers=args.layers, first_k_dense_replace=1,
                               n_routed_experts=args.experts, num_nextn_predict_layers=0)


def prompt_stats(out, ref, prompts) -> dict:
    """Logits on the prompt rows (identical inputs on both sides) and greedy continuations."""
    diffs, refs, agree = 0.0, 0.0, []
    worst = 0.0
    for a, b, p in zip(out.logits, ref.logits, prompts):
        a, b = a[: len(p)], b[: len(p)]
        diffs += (a - b).abs().sum().item()
        refs += b.abs().sum().item()
        worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
        agree.append((a.argmax(-1) == b.argmax(-1)).float().mean().item())
    return {"mean_rel_diff": diffs / refs, "worst_row_rel_diff": worst, "argmax_agreement": sum(agree) / len(agree),
            "identical_greedy": sum(x == y for x, y in zip(out.tokens, ref.tokens)), "prompts": len(prompts)}


def equivalence(args, root: Path, device: str, report: dict) -> None:
    shape = shape_for(args)
    t = time.perf_counter()
    fp8 = write_synthetic_deepseek_fp8(root / "fp8", shape, device=device, max_shard_bytes=4 << 30,
                                       init_scale=args.init_scale)
    w4 = quantize_checkpoint(fp8, root / "w4afp8", "w4afp8", calib_samples=4, calib_max_len=64, device=device)
    report["checkpoints"] = {"shape": dataclasses.asdict(shape), "init_scale": args.init_scale, "write_and_quantize_s": time.perf_counter() - t}
    rng = random.Random(0)
    prompts = [[rng.randrange(3, shape.vocab_size) for _ in range(rng.randint(16, 64))] for _ in range(16)]
    dev = f"{device}:0" if device == "cuda" else device
    checkpoints = (("fp8", fp8), ("w4afp8", w4))
    results, tp1 = {}, {}
    for dtype in args.dtypes.split(","):
        load = dict(dtype=dtype, moe_backend="torch", linear_backend="torch", device=dev)
        cases = [Case(f"{fmt}-{mode}", str(path), prompts, mode, dtype, "torch", "torch")
                 for fmt, path in checkpoints for mode in ("tp", "ep")]
        t = time.perf_counter()
        two = run_ranks(cases, NEW_TOKENS, world_size=2, device=device)
        report[f"tp2_run_s_{dtype}"] = time.perf_counter() - t
        for fmt, path in checkpoints:
            model, _ = load_model(path, **load)
            tp1[fmt, dtype] = plain = case_outputs(model, prompts, NEW_TOKENS, dev)
            del model
            for mode in ("tp", "ep"):
                row = {"vs_tp1": prompt_stats(two[f"{fmt}-{mode}"], plain, prompts)}
                if fmt == "w4afp8":
                    emulated = with_rank_experts(path, mode, **load)
                    row["vs_tp1_with_rank_experts"] = prompt_stats(
                        two[f"{fmt}-{mode}"], case_outputs(emulated, prompts, NEW_TOKENS, dev), prompts)
                    del emulated
                results[f"{fmt}-{mode}-{dtype}"] = row
                print(f"{fmt:7} {mode} {dtype}: {json.dumps(row)}", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
    # The noise floor: the same tp=1 model in bf16 against float32. A tp=2 difference in bf16 of this size is
    # rounding carried through random full-width layers (FP8 activation roundings flip, routing follows), not TP.
    for fmt, _ in checkpoints:
        if (fmt, "bfloat16") in tp1 and (fmt, "float32") in tp1:
            row = prompt_stats(tp1[fmt, "bfloat16"], tp1[fmt, "float32"], prompts)
            results[f"{fmt}-tp1-bfloat16-vs-float32"] = row
            print(f"{fmt:7} tp1 bfloat16 vs float32: {json.dumps(row)}", flush=True)
    report["equivalence"] = results


def invariance(model, tokenizer, vocab: int, device: str, samplings=(False, True)) -> dict:
    row = {}
    for deterministic in (True, False):
        for sampled in samplings:
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            alone, busy = bi.alone_and_busy(model, tokenizer, vocab, sampled, deterministic, device)
            key = f"{'deterministic' if deterministic else 'default'}-{'seeded' if sampled else 'greedy'}"
            row[key] = {"identical_tokens": sum(alone[k][0] == busy[k][0] for k in alone),
                        "identical_logprobs": sum(alone[k][1] == busy[k][1] for k in alone),
                        "requests": len(alone), "seconds": time.perf_counter() - t}
            print(f"  {key}: {json.dumps(row[key])}", flush=True)
    return row


def busy_throughput(model, tokenizer, vocab: int, device: str, deterministic: bool) -> float:
    engine = bi.make_engine(model, tokenizer, deterministic, device)
    requests = bi.targets(vocab, False) + bi.others(vocab)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    results = bi.run(engine, requests)
    if device == "cuda":
        torch.cuda.synchronize()
    return sum(len(tokens) for tokens, _ in results.values()) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, help="scratch folder for the checkpoints (default: a new temporary one)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shape", default="r1", choices=["r1", "tiny"])
    parser.add_argument("--layers", type=int, default=3, help="1 dense + (layers - 1) MoE layers")
    parser.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer (R1: 256)")
    parser.add_argument("--parts", default="equivalence,invariance", help="which parts to run (comma-separated)")
    parser.add_argument("--init-scale", type=float, default=1.0,
                        help="weights N(0, s^2/fan_in); below 1 the random stack is less chaotic under FP8 roundings")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="activation dtypes of the equivalence runs")
    parser.add_argument("--tiny-chat-model", type=Path, help="a tiny Mixtral with tokenizer for part 2")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    report = {"device": name, "devices": torch.cuda.device_count() if args.device == "cuda" else 1,
              "torch": torch.__version__}
    stem = args.out / ("h100" if "H100" in name else "h200" if "H200" in name else args.device)

    def save() -> None:
        stem.with_name(stem.name + "-tp2.json").write_text(json.dumps(report, indent=2) + "\n")

    if args.work is None:
        args.work = Path(tempfile.mkdtemp(prefix="evalpipe-gpu-parallel-"))
    print(f"device: {name}; checkpoints in {args.work}", flush=True)
    start = time.perf_counter()
    parts = args.parts.split(",")
    if "equivalence" in parts:
        equivalence(args, args.work, args.device, report)
        report["equivalence_s"] = time.perf_counter() - start
        save()
    if "invariance" not in parts:
        return
    dev = "cuda:0" if args.device == "cuda" else "cpu"
    report["batch_invariance"], report["busy_output_tok_s"] = {}, {}
    if args.tiny_chat_model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tiny_chat_model)
        tiny, _ = load_model(args.tiny_chat_model, dtype="bfloat16", device=dev, batch_invariant=True)
        print("batch invariance, tiny Mixtral:", flush=True)
        report["batch_invariance"]["tiny-mixtral"] = invariance(tiny, tokenizer, len(tokenizer), dev)
        for mode in ("default", "deterministic"):
            report["busy_output_tok_s"][f"tiny-mixtral-{mode}"] = busy_throughput(
                tiny, tokenizer, len(tokenizer), dev, mode == "deterministic")
        print(f"  busy batch output tok/s: {report['busy_output_tok_s']}", flush=True)
        save()
    if "equivalence" not in parts:
        return
    # Slowest last (the torch reference path at full width), so a time limit still leaves the rest saved.
    w4, _ = load_model(args.work / "w4afp8", dtype="bfloat16", moe_backend="torch", linear_backend="torch",
                       device=dev, batch_invariant=True)
    vocab = shape_for(args).vocab_size
    for mode in ("default", "deterministic"):
        report["busy_output_tok_s"][f"w4afp8-stack-{mode}"] = busy_throughput(
            w4, bi.TokenIdText(), vocab, dev, mode == "deterministic")
        print(f"  busy batch output tok/s, W4AFP8 stack, {mode}: {report['busy_output_tok_s']}", flush=True)
        save()
    print("batch invariance, W4AFP8 R1-width stack:", flush=True)
    report["batch_invariance"]["w4afp8-stack"] = invariance(w4, bi.TokenIdText(), vocab, dev, samplings=(False,))
    report["total_s"] = time.perf_counter() - start
    save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
