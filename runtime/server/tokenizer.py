"""The HF tokenizer of a model directory: prompt rendering, end-of-sequence ids and per-token text."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer


def load_tokenizer(model_dir: str | Path) -> Any:
    return AutoTokenizer.from_pretrained(str(model_dir))


def eos_token_ids(model_dir: str | Path, tokenizer: Any) -> set[int]:
    """The tokenizer's EOS plus any listed in generation_config.json (chat models often end turns with another)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        listed = json.loads(path.read_text()).get("eos_token_id")
        ids.update(listed if isinstance(listed, list) else [] if listed is None else [listed])
    return ids


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
                template_kwargs: dict[str, Any]) -> list[int]:
    """Token ids of a conversation under the tokenizer's chat template (raises jinja/ValueError on bad input)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)
    # The template already wrote any BOS; adding special tokens again would double it.
    return tokenizer.encode(text, add_special_tokens=False)


class TokenTexts:
    """Text of single tokens for logprob listings, cached (the same few thousand ids recur)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])
