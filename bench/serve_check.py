"""GPU check of the fast W4AFP8 MoE backends as served (issue 7, item 4): the same checkpoint with
`--moe-backend torch` (the reference) against `cutlass` and `triton`.

For a demo-shaped model (SmolLM2-135M as an 8-expert MoE, group 64) and an R1-shaped one (R1's full widths,
a few layers, made by `evalpipe model synth-deepseek`'s writer and `evalpipe quantize`):

1. first-token logits of a few prompts, in process, per backend against torch: relative error, largest
   difference, arg-max agreement;
2. `evalpipe serve` per backend (launched by evalpipe.launch), and the divergence probe's pieces over HTTP: the
   torch server's greedy answers scored teacher-forced on the torch and the fast server (mean and p99 KL,
   top-1 agreement, |Δ logprob|). Quantization is the same on both sides, so what remains is kernel error.

Prints the figures and writes `<out>/serve-check-<gpu>.md`.

    python bench/serve_check.py --work /tmp/serve-check --out results/kernels --tokenizer TOKENIZER_DIR
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from evalpipe.client import EndpointPool
from evalpipe.config import ClientConfig, parse_config
from evalpipe.divergence import KL_APPROXIMATION, score_sequence, summarize
from evalpipe.divergence_probe import Generation, build_item, scored_positions
from evalpipe.launch import launched_sides
from runtime.models import load_model
from runtime.server.tokenizer import load_tokenizer, render_chat
from runtime.tools.quantize import quantize_checkpoint
from runtime.tools.standalone import prompt_logits
from runtime.tools.synthetic import R1_SHAPE, copy_tokenizer_files, write_synthetic_deepseek_fp8, write_tiny_hf_model

QUESTIONS = [
    "Explain why the sky is blue in two sentences.", "What is 17 times 23? Show the steps.",
    "Write a haiku about autumn leaves.", "List three prime numbers greater than 50.",
    "Summarize the plot of Romeo and Juliet.", "How does a hash table handle collisions?",
    "Translate 'good morning' into French and Spanish.", "Why do we quantize neural network weights?",
]
DEMO_SHAPE = dict(hidden_size=576, intermediate_size=192, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, num_local_experts=8, num_experts_per_tok=8, max_position_embeddings=8192,
                  rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def demo_shaped(work: Path, tokenizer_dir: Path, device: str) -> Path:
    """Random weights at the demo model's shapes (the real weights do not fit the transfer), W4AFP8 group 64."""
    tokenizer = load_tokenizer(tokenizer_dir)
    bf16 = write_tiny_hf_model(work / "demo-bf16", "MixtralForCausalLM", init_std=0.02, max_shard_size="2GB",
                               vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **DEMO_SHAPE)
    copy_tokenizer_files(tokenizer_dir, bf16)
    return quantize_checkpoint(bf16, work / "demo-w4afp8", "w4afp8", group_size=64, calib_samples=8,
                               calib_max_len=64, device=device)


def r1_shaped(work: Path, tokenizer_dir: Path, shape, device: str) -> Path:
    fp8 = write_synthetic_deepseek_fp8(work / "r1-fp8", shape, device=device, tokenizer_from=tokenizer_dir)
    w4 = quantize_checkpoint(fp8, work / "r1-w4afp8", "w4afp8", calib_samples=8, calib_max_len=64, device=device)
    shutil.rmtree(fp8)
    return w4


def first_token_logits(model_dir: Path, prompts: list[list[int]], backends: list[str], device: str
                       ) -> dict[str, list[str]]:
    """Per fast backend: figures of its first-token logits against the torch backend's (bf16, as served). The row
    `torch float32` is the torch backend in float32 against the same: how far bf16 rounding alone moves these
    logits, the yardstick for a fast backend (a kernel is fine when it stays within that floor)."""
    logits = {}
    for name, backend, dtype in (("torch", "torch", "bfloat16"), ("torch float32", "torch", "float32"),
                                 *((b, b, "bfloat16") for b in backends)):
        model, _ = load_model(model_dir, moe_backend=backend, dtype=dtype, device=device)
        logits[name] = torch.stack([prompt_logits(model, ids, device=device)[-1] for ids in prompts]).float()
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    ref = logits["torch"]

    def rel(name: str) -> float:
        return ((logits[name] - ref).abs().mean() / ref.abs().mean()).item()

    floor = rel("torch float32")
    rows = {}
    for name in ("torch float32", *backends):
        diff = (logits[name] - ref).abs()
        agree = (logits[name].argmax(-1) == ref.argmax(-1)).float().mean().item()
        check = "(floor)" if name == "torch float32" else (
            "within the bf16 floor" if rel(name) <= floor else f"{rel(name) / floor:.1f}x the bf16 floor")
        rows[name] = [f"{rel(name):.2e}", f"{diff.max().item():.3f}", f"{ref.abs().max().item():.1f}",
                      f"{agree:.0%}", check]
    return rows


def side(name: str, model_dir: Path, backend: str) -> dict:
    return {"label": f"{name}-{backend}", "model": f"{name}-{backend}",
            "launch": {"model": str(model_dir), "startup_timeout": 300,
                       "args": ["--moe-backend", backend, "--max-model-len", "2048", "--kv-cache-gib", "2"]}}


async def _answers(pool: EndpointPool, model: str, tokenizer, max_tokens: int) -> list[Generation]:
    """The reference server's greedy answers to QUESTIONS (what the probe scores)."""
    out = []
    for i, question in enumerate(QUESTIONS):
        messages = ({"role": "user", "content": question},)
        ids = render_chat(tokenizer, list(messages), True, {})
        client = pool.replicas[0].client
        body = (await client.completions.with_raw_response.create(
            model=model, prompt=ids, max_tokens=max_tokens, temperature=0.0)).http_response.json()
        out.append(Generation("check", f"q{i}", 0, messages, body["choices"][0]["text"]))
    return out


async def _probe(urls: dict[str, list[str]], models: dict[str, str], tokenizer, fast: str, max_tokens: int):
    pools = {key: EndpointPool(u, None, ClientConfig()) for key, u in urls.items()}
    try:
        return await _probe_pools(pools, models, tokenizer, fast, max_tokens)
    finally:
        for pool in pools.values():
            await pool.aclose()


async def _probe_pools(pools: dict[str, EndpointPool], models: dict[str, str], tokenizer, fast: str,
                       max_tokens: int):
    generations = await _answers(pools["torch"], models["torch"], tokenizer, max_tokens)
    items = [build_item(g, tokenizer, max_tokens) for g in generations]
    scores = []
    for item in items:
        base = await pools["torch"].prompt_logprobs(models["torch"], item.prompt, 20)
        cand = await pools[fast].prompt_logprobs(models[fast], item.prompt, 20)
        if base.body is None or cand.body is None:
            raise RuntimeError(f"probe request failed: {base.error or cand.error}")
        scores.append(score_sequence(scored_positions(base.body, item, max_tokens),
                                     scored_positions(cand.body, item, max_tokens)))
    return summarize(scores, resamples=1000)


def served_probe(name: str, model_dir: Path, tokenizer, work: Path, backends: list[str], max_tokens: int
                 ) -> dict[str, list[str]]:
    rows = {}
    for fast in backends:
        config = parse_config({"name": "serve-check", "candidate": side(name, model_dir, fast),
                               "baseline": side(name, model_dir, "torch"), "tasks": [{"task": "mmlu"}]}, "check")
        t = time.perf_counter()
        with launched_sides(config, work / "logs" / f"{name}-{fast}") as live:
            started = time.perf_counter() - t
            specs = {"torch": live.baseline, fast: live.candidate}
            urls = {key: spec.urls for key, spec in specs.items()}
            models = {key: spec.model for key, spec in specs.items()}
            t = time.perf_counter()
            summary = asyncio.run(_probe(urls, models, tokenizer, fast, max_tokens))
            probe_s = time.perf_counter() - t
        k, top1, delta, p99 = summary.mean_kld, summary.top1_agreement, summary.mean_abs_logprob_change, summary.p99_kld
        rows[fast] = [f"{k.value:.2e} [{k.ci95[0]:.2e}, {k.ci95[1]:.2e}]", f"{p99.value:.2e}",
                      f"{100 * top1.value:.2f} [{100 * top1.ci95[0]:.2f}, {100 * top1.ci95[1]:.2f}]",
                      f"{delta.value:.2e}", str(summary.n_positions), f"{started:.0f} / {probe_s:.1f}"]
        print(name, fast, rows[fast], flush=True)
    return rows


def table(header: list[str], rows: dict[str, list[str]], first: str) -> list[str]:
    lines = ["| " + " | ".join([first, *header]) + " |", "|" + "---|" * (len(header) + 1)]
    return lines + ["| " + " | ".join([key, *values]) + " |" for key, values in rows.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True, help="SmolLM2 tokenizer dir (chat template)")
    p.add_argument("--r1-layers", type=int, default=3)
    p.add_argument("--r1-dense-layers", type=int, default=1)
    p.add_argument("--r1-experts", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--backends", default="cutlass,triton", help="fast MoE backends compared with torch")
    p.add_argument("--skip-served", action="store_true", help="in-process logits only (no servers, no probe)")
    p.add_argument("--device", default="cuda", help="cpu only to try the script itself (--backends cached)")
    args = p.parse_args()
    backends = args.backends.split(",")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    tokenizer = load_tokenizer(args.tokenizer)
    prompts = [render_chat(tokenizer, [{"role": "user", "content": q}], True, {}) for q in QUESTIONS]
    lines = [f"# Served W4AFP8 backends against the torch reference: {gpu}", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}; `python bench/serve_check.py` (issue 7 item 4). "
             "Same checkpoint on every side, so the figures are kernel error only (no quantization error).", ""]
    t = time.perf_counter()
    shape = replace(R1_SHAPE, num_hidden_layers=args.r1_layers, first_k_dense_replace=args.r1_dense_layers,
                    n_routed_experts=args.r1_experts, vocab_size=len(tokenizer))
    models = {"demo-shaped": demo_shaped(args.work, args.tokenizer, args.device),
              "r1-shaped": r1_shaped(args.work, args.tokenizer, shape, args.device)}
    print(f"checkpoints ready in {time.perf_counter() - t:.0f} s", flush=True)
    describe = {"demo-shaped": "random weights at the demo model's shapes (30 layers, hidden 576, 8 experts of 192, "
                               "top-8, W4AFP8 group 64)",
                "r1-shaped": f"R1 widths (hidden 7168, MLA with 128 heads, experts of width 2048, top-8 of "
                             f"{args.r1_experts}), {args.r1_layers} layers ({args.r1_dense_layers} dense), W4AFP8 "
                             "group 128, vocabulary of the SmolLM2 tokenizer"}
    for name, model_dir in models.items():
        logits = first_token_logits(model_dir, prompts, backends, args.device)
        print(name, logits, flush=True)
        probe = {} if args.skip_served else served_probe(name, model_dir, tokenizer, args.work, backends,
                                                         args.max_tokens)
        lines += [f"## {name}: {describe[name]}", "", f"First-token logits of {len(prompts)} chat prompts "
                  "(in process, `load_model(moe_backend=...)`), against `torch`:", ""]
        lines += table(["mean rel. diff", "max abs diff", "max abs logit", "arg-max agreement", "check"], logits,
                       "backend")
        if not probe:
            lines.append("")
            continue
        lines += ["", f"Divergence probe over HTTP: `evalpipe serve --moe-backend torch` vs the fast backend; the "
                  f"torch server's greedy answers ({len(QUESTIONS)} x up to {args.max_tokens} tokens) scored "
                  "teacher-forced on both (95% bootstrap CI):", ""]
        lines += table(["mean KLD (nats)", "p99 KLD", "top-1 agreement %", "mean abs Δ logprob", "positions",
                        "servers up / probe s"], probe, "backend")
        lines.append("")
    lines += [f"KL: {KL_APPROXIMATION}.", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    slug = gpu.lower().replace(" ", "-")
    (args.out / f"serve-check-{slug}.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
