"""The golden extraction set (tests/golden/extraction.yaml) through the real cards' ladders and graders."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from evalpipe.cards import load_card
from evalpipe.scoring import score_response, visible_answer

CASES = yaml.safe_load((Path(__file__).parent / "golden" / "extraction.yaml").read_text(encoding="utf-8"))


def test_golden_set_is_large_and_covers_every_answer_type() -> None:
    assert len(CASES) >= 40
    assert {case["task"] for case in CASES} == {"math500", "aime24", "gpqa_diamond"}
    assert {case["expect"]["outcome"] for case in CASES} == {"correct", "wrong", "no_answer", "truncated"}


@pytest.mark.parametrize("case", CASES, ids=[c["why"] for c in CASES])
def test_golden_case(case: dict) -> None:
    card = load_card(case["task"])
    content = case["content"]
    if "huge_boxed" in case:
        content = "\\boxed{" + "x+" * case["huge_boxed"] + "1}"
    started = time.monotonic()
    score = score_response(
        answer_type=card.scoring.answer_type, ladder=card.scoring.extract, gold=case["gold"], content=content,
        finish_reason=case.get("finish_reason", "stop"), letters="ABCD" if card.fields.options else "",
    )
    expect = case["expect"]
    if "extracted" in expect:
        assert score.extracted == expect["extracted"]
    assert score.rule == expect["rule"]
    assert score.outcome == expect["outcome"]
    assert time.monotonic() - started < 10  # math-verify runs under its own timeouts


def test_visible_answer_cuts_after_last_think() -> None:
    assert visible_answer("<think>a</think>b</think>c") == "c"
    assert visible_answer("<think>still thinking") == ""
    assert visible_answer(None) == ""
    assert visible_answer("plain") == "plain"
