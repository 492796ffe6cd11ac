"""Serving load benchmark (bench_serving style) against any OpenAI-compatible /v1/completions endpoint.

Random token-id prompts of given input/output lengths arrive as a Poisson process at --request-rate (inf = all at
once) under --max-concurrency; each streams its completion with ignore_eos so that it produces exactly the
requested output length. Prints SGLang's "Serving Benchmark Result" layout: throughput, TTFT, ITL, E2E latency.

--compare-hf DIR then runs HF transformers `generate` on the same prompts (greedy, same output lengths, batches
of --max-concurrency, on this machine) and prints the output-token throughput ratio server / HF.

Example (server on this machine):
  evalpipe serve --model M --port 30000 &
  python bench/serving.py --base-url http://127.0.0.1:30000 --tokenizer M --num-prompts 32 \
      --random-input-len 256 --random-output-len 64 --max-concurrency 8 --compare-hf M
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def random_prompts(tokenizer, num: int, input_len: int, output_len: int, range_ratio: float, seed: int
                   ) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) pairs; lengths uniform in [ratio * L, L], ids avoid special tokens."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [t for t in range(len(tokenizer)) if t not in special]
    out = []
    for _ in range(num):
        n_in = rng.randint(max(1, int(input_len * range_ratio)), input_len)
        n_out = rng.randint(max(1, int(output_len * range_ratio)), output_len)
        out.append(([rng.choice(vocab) for _ in range(n_in)], n_out))
    return out


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
                      headers: dict[str, str]) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult(ok=False, prompt_len=len(prompt))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2e = time.perf_counter() - start
        result.ok = result.ttft > 0
    except httpx.HTTPError as exc:
        result.error = repr(exc)
    return result


async def run_load(args, prompts: list[tuple[list[int], int]]) -> tuple[list[RequestResult], float]:
    url = f"{args.base_url.rstrip('/')}/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = asyncio.Semaphore(args.max_concurrency or len(prompts))
    rng = np.random.default_rng(args.seed)

    async def limited(client, prompt, n_out):
        async with limit:
            return await one_request(client, url, args.model, prompt, n_out, headers)

    timeout = httpx.Timeout(None, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None)) as client:
        tasks = []
        start = time.perf_counter()
        for prompt, n_out in prompts:
            tasks.append(asyncio.create_task(limited(client, prompt, n_out)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    ms = lambda xs, q: float(np.percentile(xs, q) * 1000) if len(xs) else float("nan")  # noqa: E731
    ttft = [r.ttft for r in ok]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.e2e for r in ok]
    n_in = sum(r.prompt_len for r in ok)
    n_out = sum(r.output_len for r in ok)
    return {
        "successful": len(ok), "failed": len(results) - len(ok), "duration": duration,
        "input_tokens": n_in, "output_tokens": n_out,
        "request_throughput": len(ok) / duration, "input_throughput": n_in / duration,
        "output_throughput": n_out / duration, "total_throughput": (n_in + n_out) / duration,
        "concurrency": sum(e2e) / duration,
        "e2e_mean": float(np.mean(e2e) * 1000) if e2e else float("nan"), "e2e_median": ms(e2e, 50),
        "ttft_mean": float(np.mean(ttft) * 1000) if ttft else float("nan"), "ttft_median": ms(ttft, 50),
        "ttft_p99": ms(ttft, 99),
        "itl_mean": float(np.mean(itl) * 1000) if itl else float("nan"), "itl_median": ms(itl, 50),
        "itl_p95": ms(itl, 95), "itl_p99": ms(itl, 99), "itl_max": ms(itl, 100),
    }


def print_result(s: dict[str, float], rate: float, concurrency: int | None) -> None:
    row = lambda name, value: print(f"{name:<40} {value}")  # noqa: E731
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    row("Backend:", "openai-completions")
    row("Traffic request rate:", rate)
    row("Max request concurrency:", concurrency or "not set")
    row("Successful requests:", s["successful"])
    row("Failed requests:", s["failed"])
    row("Benchmark duration (s):", f"{s['duration']:.2f}")
    row("Total input tokens:", s["input_tokens"])
    row("Total generated tokens:", s["output_tokens"])
    row("Request throughput (req/s):", f"{s['request_throughput']:.2f}")
    row("Input token throughput (tok/s):", f"{s['input_throughput']:.2f}")
    row("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}")
    row("Total token throughput (tok/s):", f"{s['total_throughput']:.2f}")
    row("Concurrency:", f"{s['concurrency']:.2f}")
    for title, keys in (("End-to-End Latency", [("Mean E2E Latency (ms):", "e2e_mean"),
                                                 ("Median E2E Latency (ms):", "e2e_median")]),
                        ("Time to First Token", [("Mean TTFT (ms):", "ttft_mean"), ("Median TTFT (ms):", "ttft_median"),
                                                  ("P99 TTFT (ms):", "ttft_p99")]),
                        ("Inter-Token Latency", [("Mean ITL (ms):", "itl_mean"), ("Median ITL (ms):", "itl_median"),
                                                  ("P95 ITL (ms):", "itl_p95"), ("P99 ITL (ms):", "itl_p99"),
                                                  ("Max ITL (ms):", "itl_max")])):
        print("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        for name, key in keys:
            row(name, f"{s[key]:.2f}")
    print("=" * 50)


def hf_generate_throughput(model_dir: str, tokenizer, prompts: list[tuple[list[int], int]], batch_size: int,
                           dtype: str) -> tuple[float, int, float]:
    """(output tokens per second, tokens generated, seconds) of greedy HF `generate` over the same prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generated, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch])  # left padding for generation
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        n_out = max(n for _, n in batch)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_out, min_new_tokens=n_out,
                           do_sample=False, pad_token_id=pad)
        generated += sum(n for _, n in batch)  # tokens the server was asked for; padding rows beyond them do not count
    seconds = time.perf_counter() - start
    return generated / seconds, generated, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:30000")
    parser.add_argument("--model", help="model id in the API (default: the first of /v1/models)")
    parser.add_argument("--api-key")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (prompt ids and vocabulary)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--random-input-len", type=int, default=256)
    parser.add_argument("--random-output-len", type=int, default=64)
    parser.add_argument("--random-range-ratio", type=float, default=1.0)
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second (Poisson)")
    parser.add_argument("--max-concurrency", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-hf", metavar="MODEL_DIR", help="also time HF transformers generate on these prompts")
    parser.add_argument("--hf-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--result-json", type=Path, help="also write the summary here (bench/gpu_serving.py reads it)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.model is None:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        args.model = httpx.get(f"{args.base_url.rstrip('/')}/v1/models", headers=headers).json()["data"][0]["id"]
    prompts = random_prompts(tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
                             args.random_range_ratio, args.seed)
    results, duration = asyncio.run(run_load(args, prompts))
    summary = summarize(results, duration)
    print_result(summary, args.request_rate, args.max_concurrency)
    if args.result_json:
        args.result_json.write_text(json.dumps(summary))
    for r in results:
        if not r.ok:
            print(f"failed request: {r.error}")
            break
    if args.compare_hf:
        batch = args.max_concurrency or len(prompts)
        hf_tps, hf_tokens, hf_s = hf_generate_throughput(args.compare_hf, tokenizer, prompts, batch, args.hf_dtype)
        print("{s:{c}^{n}}".format(s=" Side by side: HF transformers generate ", n=50, c="="))
        print(f"{'HF generate batch size:':<40} {batch}")
        print(f"{'HF generated tokens / seconds:':<40} {hf_tokens} / {hf_s:.2f}")
        print(f"{'HF output token throughput (tok/s):':<40} {hf_tps:.2f}")
        print(f"{'Server output token throughput (tok/s):':<40} {summary['output_throughput']:.2f}")
        print(f"{'Throughput ratio (server / HF):':<40} {summary['output_throughput'] / hf_tps:.2f}")
        print("=" * 50)


if __name__ == "__main__":
    main()
