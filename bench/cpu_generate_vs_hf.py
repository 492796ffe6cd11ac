"""Output tokens per CPU-second of one side, one thread, in process: our engine (LLMEngine.step loop with
detokenization) or HF transformers `generate`, greedy on the same random prompts of the demo model.

CPU time is what a loaded shared machine disturbs least; on a quiet one use bench/serving.py --compare-hf (wall
clock, through HTTP). Run each side in its own process:
    python bench/cpu_generate_vs_hf.py --side ours --batch 8
    python bench/cpu_generate_vs_hf.py --side hf --batch 8
"""
import sys, time, random, os, argparse
p = argparse.ArgumentParser(); p.add_argument("--side", choices=["ours", "hf"]); p.add_argument("--batch", type=int, default=8)
p.add_argument("--n", type=int, default=8); p.add_argument("--inp", type=int, default=128); p.add_argument("--out", type=int, default=32)
p.add_argument("--variant", default="bf16", help="demo model variant (HF side: bf16 only)")
a = p.parse_args()
import torch
torch.set_num_threads(1)
d = os.path.expanduser(f"~/.cache/evalpipe/models/smollm2-moe-{a.variant}")
rng = random.Random(0)
prompts = [[rng.randrange(100, 40000) for _ in range(a.inp)] for _ in range(a.n)]
if a.side == "ours":
    from runtime.models import load_model
    from runtime.server.launch import EngineOptions, build_engine
    from runtime.server.tokenizer import load_tokenizer
    from runtime.engine.sampling_params import SamplingParams
    model, cfg = load_model(d)
    eng = build_engine(model, load_tokenizer(d), set(), EngineOptions(max_model_len=4096, kv_cache_gib=0.5, max_num_seqs=a.batch), torch.device("cpu"), cfg.vocab_size)
    def run(ps):
        for i, pr in enumerate(ps):
            eng.add_request(str(time.monotonic()) + str(i), pr, SamplingParams(max_tokens=a.out, temperature=0.0, ignore_eos=True))
        while eng.has_unfinished(): eng.step()
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    def run(ps):
        for i in range(0, len(ps), a.batch):
            ids = torch.tensor(ps[i:i + a.batch])
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.out, min_new_tokens=a.out, do_sample=False, pad_token_id=0)
run([prompts[0][:16]])
c, w = time.process_time(), time.perf_counter()
run(prompts)
c, w = time.process_time() - c, time.perf_counter() - w
print(f"{a.side} batch {a.batch}: {a.n * a.out} tokens, cpu {c:.1f}s wall {w:.1f}s -> {a.n * a.out / c:.2f} tok per cpu-s")
