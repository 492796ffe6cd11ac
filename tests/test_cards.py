"""Protocol cards: every shipped card validates, pins its data, and its hash tracks score-moving fields only."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from evalpipe.cards import TaskCard, UNHASHED_FIELDS, available_tasks, load_card
from evalpipe.errors import UserError
from orch_helpers import REPO, run_cli

SHIPPED = ["aime24", "gpqa_diamond", "math500", "mmlu"]
LOGLIKELIHOOD = ["gpqa_diamond_loglik", "mmlu_cloze_loglik", "mmlu_loglik"]


def raw_card(name: str) -> dict:
    return yaml.safe_load((REPO / "tasks" / f"{name}.yaml").read_text(encoding="utf-8"))


def test_all_four_cards_ship_and_follow_the_r1_protocol() -> None:
    assert available_tasks() == sorted(SHIPPED + LOGLIKELIHOOD)
    samples = {"aime24": 16, "gpqa_diamond": 8, "math500": 4, "mmlu": 1}
    for name in SHIPPED:
        card = load_card(name)
        assert card.prompt.system is None
        assert (card.sampling.temperature, card.sampling.top_p, card.sampling.max_tokens) == (0.6, 0.95, 32768)
        assert card.sampling.samples == samples[name]
        assert len(card.dataset.hub.revision) == 40
        assert all(len(digest) == 64 for digest in card.dataset.local.files.values())
    r1_suffix = "Please reason step by step, and put your final answer within \\boxed{}."
    assert load_card("aime24").prompt.template == "{question}\n" + r1_suffix
    assert load_card("math500").prompt.template == "{question}\n" + r1_suffix
    for name in ("gpqa_diamond", "mmlu"):
        last_line = load_card(name).prompt.template.splitlines()[-1]
        assert last_line.startswith('The last line of your response must be of the form "Answer: $LETTER"')
    assert len(load_card("mmlu").dataset.local.files) == 57


def test_loglikelihood_cards_share_their_generative_cards_data_and_score_each_option() -> None:
    for name in LOGLIKELIHOOD:
        card, source = load_card(name), load_card(name.split("_cloze")[0].removesuffix("_loglik"))
        assert card.scoring.method == "loglikelihood" and card.scoring.extract == []
        assert (card.dataset, card.fields) == (source.dataset, source.fields)
        assert (card.sampling.temperature, card.sampling.max_tokens, card.sampling.samples) == (0.0, 1, 1)
        assert card.prompt.template.endswith("Answer:") and card.prompt.continuation.startswith(" ")
        assert card.prompt.shuffle_salt == source.prompt.shuffle_salt
        assert card.card_hash != source.card_hash


def _set(tree: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree[key]
    tree[leaf] = value


# (field path, new value): every one of these can move a score.
SCORE_MOVING = [
    ("name", "aime24x"),
    ("version", 2),
    ("dataset.hub.revision", "0" * 40),
    ("dataset.hub.path", "someone/else"),
    ("dataset.local.files", {"aime2024/test.jsonl": "0" * 64}),
    ("fields.question", "question"),
    ("fields.id_pattern", "(\\d+)"),
    ("prompt.template", "{question}\nAnswer in \\boxed{}."),
    ("prompt.system", "You are a helpful assistant."),
    ("sampling.temperature", 0.0),
    ("sampling.top_p", 1.0),
    ("sampling.max_tokens", 20000),
    ("scoring.answer_type", "math"),
    ("scoring.extract", ["boxed_last"]),
]


@pytest.mark.parametrize(("field", "value"), SCORE_MOVING, ids=[f for f, _ in SCORE_MOVING])
def test_card_hash_changes_with_every_score_moving_field(field: str, value: object) -> None:
    base = raw_card("aime24")
    changed = copy.deepcopy(base)
    _set(changed, field, value)
    assert TaskCard.model_validate(changed).card_hash != TaskCard.model_validate(base).card_hash


@pytest.mark.parametrize("field", UNHASHED_FIELDS)
def test_card_hash_ignores_descriptive_fields(field: str) -> None:
    base = raw_card("math500")
    changed = copy.deepcopy(base)
    replacement = {"description": "new words", "dataset.notes": "other notes", "fields.labels": {},
                   "derived_labels": {}, "sampling.samples": 64}[field]
    _set(changed, field, replacement)
    assert TaskCard.model_validate(changed).card_hash == TaskCard.model_validate(base).card_hash


def test_card_hash_includes_scoring_code_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = load_card("mmlu").card_hash
    monkeypatch.setattr("evalpipe.cards.SCORING_VERSION", 999)
    assert load_card("mmlu").card_hash != before


def test_config_overrides_give_a_different_protocol_hash() -> None:
    card = load_card("aime24")
    assert card.with_sampling(max_tokens=1024).card_hash != card.card_hash
    assert card.with_sampling(samples=2).card_hash == card.card_hash  # samples are part of the journal key instead
    assert card.with_sampling(max_tokens=None) is card


def test_bad_cards_are_refused_with_the_field_path(tmp_path: Path) -> None:
    bad = raw_card("aime24")
    bad["scoring"]["extract"] = ["boxed_last", "guess_harder"]
    bad["dataset"]["hub"]["revision"] = "main"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad), encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_card(str(path))
    assert "scoring.extract" in str(err.value) and "guess_harder" in str(err.value)
    assert "dataset.hub.revision" in str(err.value)
    with pytest.raises(UserError, match="unknown task 'mmlu_pro'"):
        load_card("mmlu_pro")


def test_tasks_command_lists_every_card_with_its_hash() -> None:
    result = run_cli("tasks")
    assert result.exit_code == 0
    for name in SHIPPED:
        assert name in result.output and load_card(name).card_hash in result.output
    shown = run_cli("tasks", "gpqa_diamond")
    assert shown.exit_code == 0 and load_card("gpqa_diamond").card_hash in shown.output
    assert "scoring_version" in shown.output and "description" not in shown.output
