"""Static activation scales of the routed experts, measured by running the unquantized (or FP8) model.

For every routed expert the amax of the tokens it receives (input of w1/w3, identical by construction) and of
its SwiGLU output (input of w2) is recorded over calibration prompts; scale = amax / 448, as TRT-LLM's
mixed-precision script writes them. An expert no calibration token reached gets its layer's largest scale, so
the per-layer (TP) and per-rank (EP) maxima SGLang uses are unaffected by it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from runtime.config import config_from_dict, read_hf_config
from runtime.errors import CheckpointError
from runtime.layers.moe import FusedMoE
from runtime.models import load_model
from runtime.quant.base import routed_tokens
from runtime.quant.numerics import FP8_MAX
from runtime.tools.standalone import prefill_batch

log = logging.getLogger(__name__)

# Varied text so the experts see math, code, prose, dialogue and other languages; formatted with the model's
# chat template when it has one.
CALIBRATION_PROMPTS = [
    "Find all real numbers x such that x^3 - 6x^2 + 11x - 6 = 0, and explain each step.",
    "Write a Python function that returns the n-th Fibonacci number using memoisation, with a docstring and tests.",
    "Summarise the causes of the French Revolution in three paragraphs.",
    "What is the difference between a process and a thread in an operating system?",
    "A train leaves at 9:40 and travels 180 km at 72 km/h. When does it arrive? Show your reasoning.",
    "Translate into French and German: 'The library opens at eight and closes at six on weekdays.'",
    "Explain why the sky is blue, as you would to a ten-year-old.",
    "Prove that the square root of 2 is irrational.",
    "Given the SQL table orders(id, customer_id, total, created_at), write a query for monthly revenue per customer.",
    "List five common logical fallacies with one short example each.",
    "Which of the following is a prime number? A) 91 B) 87 C) 97 D) 51. Answer with the letter and justify it.",
    "Describe the water cycle, naming each stage and the energy source behind it.",
    "Write a haiku about autumn rain, then explain its imagery.",
    "How many ways can 8 rooks be placed on a chessboard so that none attack each other?",
    "Compare TCP and UDP: reliability, ordering, latency and typical uses.",
    "def quicksort(xs):\n    # complete this implementation and analyse its average complexity\n",
    "Let f(x) = e^{2x} sin x. Compute f'(x) and f''(x).",
    "What were the main results of the Michelson-Morley experiment and why did they matter?",
    "Plan a three-day trip to Kyoto with a budget, including transport between sites.",
    "Explain gradient descent, momentum and Adam, and when each is preferable.",
    "Solve the system: 2a + 3b = 12, 5a - b = 13.",
    "Write a short dialogue between a doctor and a patient about a persistent cough.",
    "¿Cuáles son las principales diferencias entre el clima mediterráneo y el clima continental?",
    "用三句话解释什么是机器学习。",
    "In organic chemistry, what distinguishes an SN1 from an SN2 reaction?",
    "A fair die is rolled three times. What is the probability that the sum is 10?",
    "Refactor this JavaScript to use async/await: fetch(url).then(r => r.json()).then(d => console.log(d)).catch(e => console.error(e));",
    "Give a step-by-step derivation of the quadratic formula.",
    "What is the role of mitochondria in a eukaryotic cell?",
    "Write a regular expression that matches ISO 8601 dates (YYYY-MM-DD) and explain it.",
    "Argue for and against a four-day work week in two balanced paragraphs.",
    "If the integers 1 to 100 are written in a row, how many times does the digit 7 appear?",
]


def _has_tokenizer(model_dir: Path) -> bool:
    return (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer.model").exists()


def calibration_token_ids(model_dir: Path, samples: int, max_len: int, vocab_size: int, seed: int = 0) -> Iterator[list[int]]:
    """`samples` token sequences: the built-in prompts through the model's tokenizer (and chat template), or,
    for a checkpoint without a tokenizer, seeded random token ids."""
    if not _has_tokenizer(model_dir):
        log.warning("%s has no tokenizer: calibrating on random token ids", model_dir)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(samples):
            yield torch.randint(0, vocab_size, (max_len,), generator=gen).tolist()
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    n = len(CALIBRATION_PROMPTS)
    for i in range(samples):
        text = CALIBRATION_PROMPTS[i % n]
        if i >= n:  # later rounds pair prompts differently so repeated samples are new text
            text += "\n\n" + CALIBRATION_PROMPTS[(7 * i + 3) % n]
        if tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(text)["input_ids"]
        if max(ids, default=0) >= vocab_size:  # the embedding lookup would fail with a bare IndexError
            raise CheckpointError(
                f"{model_dir}: the tokenizer has {len(tok)} tokens (it produced id {max(ids)}) but config.json "
                f"vocab_size is {vocab_size}: the tokenizer files do not belong to this model"
            )
        yield list(ids)[:max_len]


class ExpertAmax:
    """Observer for FusedMoE layers: per-expert amax of the w1/w3 input and of the w2 input (SwiGLU output)."""

    def __init__(self):
        self.amax: dict[str, torch.Tensor] = {}  # module path -> [E, 2] (w13 input, w2 input)

    def attach(self, model: torch.nn.Module) -> list[str]:
        paths = []
        for path, module in model.named_modules():
            if isinstance(module, FusedMoE):
                self.amax[path] = torch.zeros(module.num_local, 2, device=next(module.parameters()).device)
                module.observer = lambda layer, x, ids, path=path: self._observe(path, layer, x, ids)
                paths.append(path)
        return paths

    def _observe(self, path: str, layer: FusedMoE, x: torch.Tensor, topk_ids: torch.Tensor) -> None:
        a = self.amax[path]
        for e, token_idx, _ in routed_tokens(topk_ids, layer.expert_offset, layer.num_local):
            rows = x[token_idx].float()
            w13, _ = layer.quant_method.dequantized_expert(layer, e)
            inter = w13.shape[0] // 2
            h = rows @ w13.t()
            act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
            a[e, 0] = torch.maximum(a[e, 0], rows.abs().max())
            a[e, 1] = torch.maximum(a[e, 1], act.abs().max())

    def scales(self) -> dict[str, torch.Tensor]:
        """module path -> fp32 [E, 2] scales (amax / 448), unreached experts filled with the layer's maximum."""
        out = {}
        for path, a in self.amax.items():
            reached = a[:, 0] > 0
            if not reached.all():
                log.warning("%s: %d of %d experts got no calibration tokens; using the layer maximum", path, int((~reached).sum()), len(a))
            filled = torch.where(reached.unsqueeze(-1), a, a.max(dim=0).values)
            out[path] = (filled / FP8_MAX).cpu()
        return out


def calibrate_expert_input_scales(model_dir: str | Path, samples: int, max_len: int = 512, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Run the checkpoint on calibration text and return {FusedMoE module path: fp32 [E, 2] input scales}."""
    model_dir = Path(model_dir)
    config = config_from_dict(read_hf_config(model_dir), str(model_dir / "config.json"))
    token_ids = list(calibration_token_ids(model_dir, samples, max_len, config.vocab_size))  # checked before loading
    # On CPU the scales must not depend on the serving speed paths (runtime.layers.cpu_dense, the oneDNN backends):
    # bf16 linears as stored and the batched experts, the computation every released demo build was calibrated with.
    on_cpu = torch.device(device).type == "cpu"
    backends = {"moe_backend": "batched", "linear_backend": "torch"} if on_cpu else {}
    model, _ = load_model(model_dir, dtype="bfloat16", device=device, **backends)
    observer = ExpertAmax()
    observer.attach(model)
    # One forward over all samples: each layer's experts are dequantized once for the observer.
    prefill_batch(model, token_ids, device=device)
    del model
    return observer.scales()
