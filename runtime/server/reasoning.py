"""Split model output into reasoning and answer (`reasoning_content` / `content`), whole or streamed.

deepseek-r1: the model thinks first and closes with `</think>`; recent R1 chat templates put the opening
`<think>` in the prompt, so the output may or may not start with it. Everything before `</think>` is reasoning,
everything after is content. Output that never closes its thinking (e.g. cut by max_tokens) is all reasoning,
with content None: a truncated answer must not be scored as an answer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningFormat:
    start: str
    end: str


PARSERS = {"deepseek-r1": ReasoningFormat("<think>", "</think>")}


def split_reasoning(fmt: ReasoningFormat, text: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a complete output; either is None when empty."""
    text = text.removeprefix(fmt.start)
    reasoning, closed, content = text.partition(fmt.end)
    return reasoning or None, (content or None) if closed else None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ReasoningStream:
    """Incremental split: feed text deltas, get (reasoning delta, content delta); holds back partial markers."""

    def __init__(self, fmt: ReasoningFormat):
        self._fmt = fmt
        self._pending = ""  # text not yet classified (could be part of a marker)
        self._seen_start = False  # the opening marker is only stripped at the very beginning
        self._in_reasoning = True

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        text = self._pending + delta
        self._pending = ""
        if not self._in_reasoning:
            return "", text
        if not self._seen_start:
            if self._fmt.start.startswith(text) and not final:
                self._pending = text  # still could become the opening marker
                return "", ""
            self._seen_start = True
            text = text.removeprefix(self._fmt.start)
        reasoning, closed, content = text.partition(self._fmt.end)
        if closed:
            self._in_reasoning = False
            return reasoning, content
        keep = 0 if final else _partial_suffix(text, self._fmt.end)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], ""
