"""Output tokens per CPU-second of one side, one thread, in process: our engine (LLMEngine.step loop with
detokenization) or HF transformers `generate`, greedy on the same random prompts of the demo model.

CPU time is what a loaded shared machine disturbs least; on a quiet one use bench/serving.py --compare-hf (wall
clock, through HTTP). Run each side in its own process:
    python bench/cpu_generate_vs_hf.py --side ours --batch 8
    python bench/cpu_generate_vs_hf.py --side hf --batch 8
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch

from runtime.tools.demo_model import demo_model_path

Prompts = list[list[int]]


def our_engine(model_dir, batch: int, out_tokens: int) -> Callable[[Prompts], None]:
    from runtime.engine.sampling_params import SamplingParams
    from runtime.models import load_model
    from runtime.server.launch import EngineOptions, build_engine
    from runtime.server.tokenizer import load_tokenizer

    model, cfg = load_model(model_dir)
    options = EngineOptions(max_model_len=4096, kv_cache_gib=0.5, max_num_seqs=batch)
    engine = build_engine(model, load_tokenizer(model_dir), set(), options, torch.device("cpu"), cfg.vocab_size)
    params = SamplingParams(max_tokens=out_tokens, temperature=0.0, ignore_eos=True)

    def run(prompts: Prompts) -> None:
        for i, prompt in enumerate(prompts):
            engine.add_request(f"{time.monotonic()}-{i}", prompt, params)
        while engine.has_unfinished():
            engine.step()

    return run


def hf_generate(model_dir, batch: int, out_tokens: int) -> Callable[[Prompts], None]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()

    def run(prompts: Prompts) -> None:
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i : i + batch])
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_tokens,
                               min_new_tokens=out_tokens, do_sample=False, pad_token_id=0)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["ours", "hf"], required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n", type=int, default=8, help="prompts")
    parser.add_argument("--inp", type=int, default=128, help="prompt tokens")
    parser.add_argument("--out", type=int, default=32, help="output tokens per prompt")
    parser.add_argument("--variant", default="bf16", help="demo model variant (HF side: bf16 only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = demo_model_path(args.variant)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.inp)] for _ in range(args.n)]
    run = (our_engine if args.side == "ours" else hf_generate)(model_dir, args.batch, args.out)
    run([prompts[0][:16]])  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    run(prompts)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    tokens = args.n * args.out
    print(f"{args.side} batch {args.batch}: {tokens} tokens, cpu {cpu:.1f}s wall {wall:.1f}s -> {tokens / cpu:.2f} tok per cpu-s")


if __name__ == "__main__":
    main()
