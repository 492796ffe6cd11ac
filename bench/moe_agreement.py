"""Cutlass against torch W4AFP8 MoE on one checkpoint, in process (issue 16: the serving check's greedy first
tokens of the two backends disagreed on 2 of 4 prompts).

On the serving check's greedy prompts (bench/gpu_serving.greedy_prompts), prefilled as the server does:
1. each MoE layer of the cutlass model run on the torch model's own inputs of that layer (so the error does not
   compound): max abs / relative error against the torch backend, and the share of elements outside the
   kernel tests' bound (0.1 + 1e-2 |ref|); the same one token at a time with CTAS_PER_SM 8 (the default) and 2
   (before fe26dcd); two identical calls compared bit for bit;
2. the final logits of the last prompt position from the torch (bf16), cutlass (bf16) and torch (float32)
   models: top-1 of each, the torch model's top-2 margin, and where top-1s differ the logit gap of the two
   tokens on each side. The float32 model is the yardstick: how far bf16 rounding alone moves these logits.

    python bench/moe_agreement.py --model R1_W4AFP8_DIR --tokenizer TOKENIZER_DIR [--json OUT.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime.kernels import _moe_backend  # noqa: E402
from runtime.layers.moe import FusedMoE  # noqa: E402
from runtime.models import load_model  # noqa: E402
from runtime.tools.standalone import prompt_logits  # noqa: E402

_spec = importlib.util.spec_from_file_location("gpu_serving", REPO / "bench" / "gpu_serving.py")
gpu_serving = importlib.util.module_from_spec(_spec)
sys.modules["gpu_serving"] = gpu_serving
_spec.loader.exec_module(gpu_serving)


def moe_layers(model) -> list[tuple[int, FusedMoE]]:
    return [(i, m) for i, layer in enumerate(model.model.layers) for m in layer.modules() if isinstance(m, FusedMoE)]


def record_moe_calls(model) -> tuple[dict[int, list], list]:
    """Per MoE layer index: [(args, output)] of every call, and the hook handles."""
    calls: dict[int, list] = {}
    handles = []
    for i, moe in moe_layers(model):
        calls[i] = []
        handles.append(moe.register_forward_hook(lambda mod, args, out, i=i: calls[i].append((args, out))))
    return calls, handles


def error_figures(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    out, ref = out.float(), ref.float()
    diff = (out - ref).abs()
    return {"max_abs": diff.max().item(), "max_ref": ref.abs().max().item(),
            "rel_norm": ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item(),
            "outside_bound": (diff > 0.1 + 1e-2 * ref.abs()).float().mean().item()}


def layer_errors(ref_calls: dict[int, list], cutlass_model, single_tokens: int) -> list[dict]:
    backend = _moe_backend("cutlass")
    rows = []
    layers = dict(moe_layers(cutlass_model))
    for i, calls in ref_calls.items():
        for prompt, (args, ref_out) in enumerate(calls):
            x, ids, weights, scaling = args
            out = layers[i](x, ids, weights, scaling)
            again = layers[i](x, ids, weights, scaling)
            row = {"layer": i, "prompt": prompt, "tokens": x.shape[0], **error_figures(out, ref_out),
                   "bitwise_repeatable": bool(torch.equal(out, again))}
            for ctas in (None, 2):  # None: the default (CTAS_PER_SM)
                backend.ctas_per_sm = ctas
                single = torch.cat([layers[i](x[t : t + 1], ids[t : t + 1], weights[t : t + 1], scaling)
                                    for t in range(single_tokens)])
                row[f"single_token_ctas_{ctas or 'default'}"] = error_figures(single, ref_out[:single_tokens])
            backend.ctas_per_sm = None
            rows.append(row)
    return rows


def last_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    return torch.stack([prompt_logits(model, p, device="cuda")[-1] for p in prompts]).float().cpu()


def compare_logits(ref: torch.Tensor, other: torch.Tensor) -> list[dict]:
    rows = []
    for r, o in zip(ref, other):
        top2 = r.topk(2)
        a, b = int(r.argmax()), int(o.argmax())
        rows.append({"ref_top1": a, "other_top1": b, "agree": a == b,
                     "ref_top2_margin": (top2.values[0] - top2.values[1]).item(),
                     "max_abs_logit_diff": (o - r).abs().max().item(), "max_abs_logit": r.abs().max().item(),
                     # where they disagree: how far apart the two tokens are on each side
                     "ref_gap": (r[a] - r[b]).item(), "other_gap": (o[b] - o[a]).item()})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--single-tokens", type=int, default=16, help="tokens per prompt also run one at a time")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    prompts = gpu_serving.greedy_prompts(args.tokenizer, args.prompts, 64)

    ref_model, _ = load_model(args.model, moe_backend="torch", device="cuda")
    calls, handles = record_moe_calls(ref_model)
    ref = last_logits(ref_model, prompts)
    for h in handles:
        h.remove()
    cutlass_model, _ = load_model(args.model, moe_backend="cutlass", device="cuda")
    cut_calls, handles = record_moe_calls(cutlass_model)
    cut = last_logits(cutlass_model, prompts)
    for h in handles:
        h.remove()
    # How far the MoE inputs of the two models have drifted apart by each layer (errors compound over layers).
    drift = [{"layer": i, "prompt": j, **error_figures(cut_calls[i][j][0][0], calls[i][j][0][0])}
             for i in calls for j in range(len(prompts))]
    layers = layer_errors(calls, cutlass_model, args.single_tokens)
    del ref_model, calls, cut_calls
    torch.cuda.empty_cache()
    fp32_model, _ = load_model(args.model, moe_backend="torch", dtype="float32", device="cuda")
    fp32 = last_logits(fp32_model, prompts)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "moe_layers": layers, "moe_input_drift": drift,
              "logits_cutlass_vs_torch": compare_logits(ref, cut), "logits_fp32_vs_torch": compare_logits(ref, fp32)}

    print(f"# {result['gpu']}, torch {torch.__version__}, model {args.model.name}, {len(prompts)} prompts of 64 tokens")
    print("MoE layer (cutlass on the torch model's inputs) vs torch backend:")
    for r in layers:
        s8, s2 = r["single_token_ctas_default"], r["single_token_ctas_2"]
        print(f"  layer {r['layer']} prompt {r['prompt']}: {r['tokens']} tokens max|d| {r['max_abs']:.4f} (max|ref| "
              f"{r['max_ref']:.2f}) rel {r['rel_norm']:.2e} outside {r['outside_bound']:.1e} repeatable "
              f"{r['bitwise_repeatable']}; one token at a time: rel {s8['rel_norm']:.2e} (8 CTAs/SM) "
              f"{s2['rel_norm']:.2e} (2 CTAs/SM), max|d| {s8['max_abs']:.4f} / {s2['max_abs']:.4f}")
    print("MoE input drift between the two full models (cutlass vs torch):")
    for r in drift:
        print(f"  layer {r['layer']} prompt {r['prompt']}: rel {r['rel_norm']:.2e} max|d| {r['max_abs']:.4f}")
    for name in ("logits_cutlass_vs_torch", "logits_fp32_vs_torch"):
        print(f"{name}:")
        for j, r in enumerate(result[name]):
            print(f"  prompt {j}: top1 {r['ref_top1']} / {r['other_top1']} agree {r['agree']} torch top-2 margin "
                  f"{r['ref_top2_margin']:.4f} max|dlogit| {r['max_abs_logit_diff']:.4f} (max|logit| "
                  f"{r['max_abs_logit']:.2f}) gaps {r['ref_gap']:.4f} / {r['other_gap']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
