"""Incremental detokenization with stop strings: text deltas that are safe to send to a client.

Decoding one token at a time is wrong for byte-level BPE (a character can span tokens) and for tokenizers whose
decoding depends on the previous token, so each step decodes a short window of recent tokens and emits only what
changed once it ends in complete characters. Text that might be the start of a stop string is held back until it
is clear either way, so a stream never shows part of a stop string.
"""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded ahead of the first generated token so that its leading space or merge is rendered right.
_PROMPT_CONTEXT_TOKENS = 4
_INCOMPLETE = "\ufffd"


class TextStream:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool, stop: tuple[str, ...]):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = stop
        self._max_stop_len = max((len(s) for s in stop), default=0)
        self.text = ""  # generated text so far, cut before a matched stop string
        self._emitted = 0
        self._searched = 0  # text before this index holds no complete stop string

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> bool:
        """Add one generated token; returns True when the text now contains a stop string (the text is cut there)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_INCOMPLETE):
            return False
        self.text += full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._find_stop()

    def _find_stop(self) -> bool:
        if not self._stop:
            return False
        start = max(0, self._searched - self._max_stop_len + 1)
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        self._searched = len(self.text)
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while unfinished, keeps back a possible stop-string start."""
        end = len(self.text) if finished else len(self.text) - self._held_back()
        if end <= self._emitted:
            return ""
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
