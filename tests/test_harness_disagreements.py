"""The golden disagreement classes (tests/golden/harness_disagreements.yaml): our verdict, through the real cards'
ladders and graders, is the one we stand by; and each harness, in its own environment, still says what the case
records (so the class still exists and the cross-check figures still mean what docs/interop.md says)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evalpipe.cards import load_card
from evalpipe.interop.harnesses import HARNESS_NAMES, run_harness_grader
from evalpipe.scoring import score_response
from interop_helpers import needs_harness

CASES = yaml.safe_load((Path(__file__).parent / "golden" / "harness_disagreements.yaml").read_text("utf-8"))


def test_every_class_disagrees_with_some_harness_both_ways() -> None:
    kinds = set()
    for case in CASES:
        ours = case["expect"]["outcome"] == "correct"
        differs = [h for h, v in case["theirs"].items() if v["correct"] != ours]
        # A class that was our error agrees once fixed; the case stays to keep it fixed.
        assert differs or case.get("fixed_in_scoring_version"), f"not a disagreement: {case['why']}"
        kinds |= {"ours_only" if ours else "theirs_only"}
        assert set(case["theirs"]) <= set(HARNESS_NAMES)
    assert kinds == {"ours_only", "theirs_only"}
    assert {c["expect"]["outcome"] for c in CASES} >= {"correct", "wrong", "no_answer", "truncated"}


@pytest.mark.parametrize("case", CASES, ids=[c["why"][:60] for c in CASES])
def test_our_verdict_is_the_one_we_stand_by(case: dict) -> None:
    card = load_card(case["task"])
    score = score_response(answer_type=card.scoring.answer_type, ladder=card.scoring.extract, gold=case["gold"],
                           content=case["content"], finish_reason=case.get("finish_reason", "stop"),
                           letters="ABCD" if case.get("choices") else "")
    expect = case["expect"]
    if "extracted" in expect:
        assert score.extracted == expect["extracted"]
    assert (score.rule, score.outcome) == (expect["rule"], expect["outcome"])


@pytest.mark.slow
@pytest.mark.parametrize("harness", [pytest.param(h, marks=needs_harness(h)) for h in HARNESS_NAMES])
def test_the_harness_still_grades_each_case_as_recorded(harness: str) -> None:
    cases = [c for c in CASES if harness in c["theirs"]]
    items = [{"id": i, "task": c["task"], "content": c["content"], "reasoning": c.get("reasoning"), "gold": c["gold"],
              "choices": c.get("choices"), "subject": c.get("subject")} for i, c in enumerate(cases)]
    _, verdicts = run_harness_grader(harness, sorted({c["task"] for c in cases}), items)
    for case, verdict in zip(cases, verdicts, strict=True):
        expected = case["theirs"][harness]
        assert verdict["correct"] == expected["correct"], case["why"]
        if "extracted" in expected:
            assert verdict["extracted"] == expected["extracted"], case["why"]
