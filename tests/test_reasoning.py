"""deepseek-r1 reasoning split: whole outputs and every way of streaming them give the same split."""

import random

import pytest

from runtime.server.reasoning import PARSERS, ReasoningStream, split_reasoning

R1 = PARSERS["deepseek-r1"]


@pytest.mark.parametrize("text, reasoning, content", [
    ("<think>\nLet me add.</think>\n\nThe answer is 4.", "\nLet me add.", "\n\nThe answer is 4."),
    ("Let me add.</think>4", "Let me add.", "4"),  # the template already opened <think>
    ("Still thinking when max_tokens hit", "Still thinking when max_tokens hit", None),
    ("</think>Direct answer", None, "Direct answer"),
    ("a < b </thin but not closed", "a < b </thin but not closed", None),
])
def test_split_and_streaming_agree(text, reasoning, content):
    assert split_reasoning(R1, text) == (reasoning, content)
    rng = random.Random(0)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 8))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        stream = ReasoningStream(R1)
        got_r, got_c = "", ""
        for k, piece in enumerate(pieces):
            r, c = stream.feed(piece, final=k == len(pieces) - 1)
            got_r, got_c = got_r + r, got_c + c
        assert (got_r or None, got_c or None) == (reasoning, content), pieces


def test_a_partial_end_marker_is_held_back_until_resolved():
    stream = ReasoningStream(R1)
    assert stream.feed("I think </th") == ("I think ", "")
    assert stream.feed("ink>Yes") == ("", "Yes")
