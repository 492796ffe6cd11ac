"""Question loading: local files verified by sha256, GPQA decrypted in memory, fixed order, limit, subjects,
the hub path (with `datasets` replaced by a stub), and the option shuffle."""

from __future__ import annotations

import shutil
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from evalpipe.cards import load_card
from evalpipe.data import Question, load_questions, question_chars, resolve_data_dir, select_questions
from evalpipe.errors import UserError
from evalpipe.task_plan import build_task_plan, option_order, sample_seed
from orch_helpers import SHARED_DATA, needs_shared_data

pytestmark = needs_shared_data


@pytest.mark.parametrize(("task", "count"), [("aime24", 30), ("math500", 500), ("gpqa_diamond", 198), ("mmlu", 14042)])
def test_local_data_loads_in_full(task: str, count: int) -> None:
    questions = load_questions(load_card(task), SHARED_DATA)
    assert len(questions) == count
    assert len({q.id for q in questions}) == count


def test_ids_labels_and_golds() -> None:
    aime = {q.id: q for q in load_questions(load_card("aime24"), SHARED_DATA)}
    assert set(aime) == {f"2024-{exam}-{n}" for exam in ("I", "II") for n in range(1, 16)}
    assert all(0 <= int(q.gold) <= 999 for q in aime.values())
    math = load_questions(load_card("math500"), SHARED_DATA)
    assert Counter(q.labels["level"] for q in math) == {"1": 43, "2": 90, "3": 105, "4": 128, "5": 134}
    mmlu = load_questions(load_card("mmlu"), SHARED_DATA)
    assert Counter(q.labels["category"] for q in mmlu).keys() == {"STEM", "humanities", "social_sciences", "other"}
    assert all(q.correct_index in range(4) and len(q.options) == 4 for q in mmlu)
    gpqa = load_questions(load_card("gpqa_diamond"), SHARED_DATA)
    assert Counter(q.labels["domain"] for q in gpqa) == {"Chemistry": 93, "Physics": 86, "Biology": 19}
    assert all(q.correct_index == 0 for q in gpqa)


def test_order_is_fixed_and_limit_takes_a_prefix() -> None:
    card = load_card("math500")
    first = load_questions(card, SHARED_DATA)
    again = load_questions(card, SHARED_DATA)
    assert [q.id for q in first] == [q.id for q in again]
    ten = select_questions(card, first, limit=10, subjects=None, where="tasks.0")
    assert [q.id for q in ten] == [q.id for q in first[:10]]
    assert len({q.labels["subject"] for q in ten}) > 2  # the hashed order spreads a prefix over subjects


def test_offset_continues_a_prefix_without_repeating_it() -> None:
    card = load_card("aime24")
    questions = load_questions(card, SHARED_DATA)
    first = select_questions(card, questions, limit=10, subjects=None, where="tasks.0")
    then = select_questions(card, questions, limit=10, subjects=None, where="tasks.0", offset=10)
    rest = select_questions(card, questions, limit=None, subjects=None, where="tasks.0", offset=25)
    assert [q.id for q in first + then] == [q.id for q in questions[:20]]
    assert [q.id for q in rest] == [q.id for q in questions[25:]]
    with pytest.raises(UserError, match=r"tasks\.0\.offset: 30 skips all 30 questions of task aime24"):
        select_questions(card, questions, limit=5, subjects=None, where="tasks.0", offset=30)


def test_mmlu_subjects_filter_and_unknown_subject() -> None:
    card = load_card("mmlu")
    questions = load_questions(card, SHARED_DATA)
    chosen = select_questions(card, questions, limit=None, subjects=["anatomy", "virology"], where="tasks.3")
    assert len(chosen) == 135 + 166
    limited = select_questions(card, questions, limit=5, subjects=["virology"], where="tasks.3")
    assert [q.id for q in limited] == [q.id for q in chosen if q.labels["subject"] == "virology"][:5]
    with pytest.raises(UserError, match=r"tasks\.3\.subjects: unknown subject\(s\) \['astrology'\]"):
        select_questions(card, questions, limit=None, subjects=["astrology"], where="tasks.3")


def test_max_question_chars_keeps_short_questions_in_the_fixed_order() -> None:
    card = load_card("mmlu")
    questions = load_questions(card, SHARED_DATA)
    short = select_questions(card, questions, limit=None, subjects=None, where="tasks.0", max_question_chars=300)
    assert [q.id for q in short] == [q.id for q in questions if question_chars(q) <= 300]
    assert 0.4 < len(short) / len(questions) < 0.6  # about half of MMLU
    first = select_questions(card, questions, limit=8, subjects=["virology"], where="tasks.0", max_question_chars=300)
    assert [q.id for q in first] == [q.id for q in short if q.labels["subject"] == "virology"][:8]
    assert question_chars(Question("x", "abc", options=("de", "f"))) == 6
    with pytest.raises(UserError, match=r"tasks\.2\.max_question_chars: no question of task mmlu is that short "
                                        r"\(10; the shortest has \d+ characters\)"):
        select_questions(card, questions, limit=None, subjects=None, where="tasks.2", max_question_chars=10)


def _copy_data(tmp_path: Path, *relative: str) -> Path:
    for rel in relative:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED_DATA / rel, tmp_path / rel)
    return tmp_path


def test_checksum_mismatch_and_missing_file_are_refused(tmp_path: Path) -> None:
    data = _copy_data(tmp_path, "aime2024/test.jsonl")
    with open(data / "aime2024/test.jsonl", "a", encoding="utf-8") as f:
        f.write("\n")
    with pytest.raises(UserError, match="checksum mismatch for .*aime2024/test.jsonl"):
        load_questions(load_card("aime24"), data)
    with pytest.raises(UserError, match="missing data file .*math500/test.jsonl"):
        load_questions(load_card("math500"), data)


def test_gpqa_zip_member_checksum_is_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    card = load_card("gpqa_diamond")
    local = card.dataset.local.model_copy(update={"member_sha256": "0" * 64})
    tampered = card.model_copy(update={"dataset": card.dataset.model_copy(update={"local": local})})
    with pytest.raises(UserError, match="checksum mismatch for gpqa/dataset.zip:dataset/gpqa_diamond.csv"):
        load_questions(tampered, SHARED_DATA)


def test_env_var_overrides_config_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EVALPIPE_DATA_DIR", str(tmp_path))
    assert resolve_data_dir("/somewhere/else") == tmp_path.resolve()
    monkeypatch.delenv("EVALPIPE_DATA_DIR")
    assert resolve_data_dir(None) is None


def test_gpqa_options_are_shuffled_per_question_and_sample() -> None:
    card = load_card("gpqa_diamond")
    questions = load_questions(card, SHARED_DATA)[:40]
    plan = build_task_plan(card, questions, samples=4, seed=0)
    again = build_task_plan(card, questions, samples=4, seed=123)
    assert [r.gold for r in plan.requests] == [r.gold for r in again.requests]  # independent of the task seed
    assert [r.messages for r in plan.requests] == [r.messages for r in again.requests]
    assert len({r.gold for r in plan.requests}) == 4  # the correct option lands on every letter
    by_question = {}
    for r in plan.requests:
        by_question.setdefault(r.question_id, set()).add(r.prompt_hash)
    assert sum(len(v) > 1 for v in by_question.values()) > 30  # samples of a question see different orders
    for r in plan.requests[:20]:
        q = next(q for q in questions if q.id == r.question_id)
        shown = r.messages[-1]["content"]
        assert f"{r.gold}) {q.options[q.correct_index]}" in shown
    assert option_order("s", "rec1", 0, 4) == option_order("s", "rec1", 0, 4)
    assert sorted(option_order("s", "rec1", 3, 4)) == [0, 1, 2, 3]


def test_seeds_depend_on_task_seed_and_sample_index_only() -> None:
    card = load_card("aime24")
    questions = load_questions(card, SHARED_DATA)[:3]
    plan = build_task_plan(card, questions, samples=3, seed=7)
    for r in plan.requests:
        assert r.seed == sample_seed(7, r.sample_index)
    assert len({sample_seed(7, i) for i in range(100)}) == 100
    assert sample_seed(7, 0) != sample_seed(8, 0)
    assert [r.sample_index for r in plan.requests] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # sample-major


def _stub_datasets(monkeypatch: pytest.MonkeyPatch, rows: list[dict], calls: list[tuple]) -> None:
    module = types.ModuleType("datasets")

    def load_dataset(path: str, name: str | None = None, *, split: str, revision: str) -> list[dict]:
        calls.append((path, name, split, revision))
        return rows

    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_mmlu_rows_get_the_same_ids_as_local_csvs(monkeypatch: pytest.MonkeyPatch) -> None:
    card = load_card("mmlu")
    local = {q.id: q for q in load_questions(card, SHARED_DATA) if q.labels["subject"] in ("anatomy", "virology")}
    # cais/mmlu layout: subject, question, choices, answer index; rows of each subject in file order.
    hub_rows = []
    for subject in ("anatomy", "virology"):
        for i in range(sum(q.labels["subject"] == subject for q in local.values())):
            q = local[f"{subject}/{i}"]
            hub_rows.append({"question": q.text, "subject": subject, "choices": list(q.options),
                             "answer": q.correct_index})
    calls: list[tuple] = []
    _stub_datasets(monkeypatch, hub_rows, calls)
    from_hub = {q.id: q for q in load_questions(card, None)}
    assert calls == [("cais/mmlu", "all", "test", card.dataset.hub.revision)]
    assert from_hub == local


def test_hub_failure_is_a_clear_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("datasets")

    def load_dataset(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'HuggingFaceH4/aime_2024' on the Hub (LocalEntryNotFoundError)")

    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    with pytest.raises(UserError, match="could not load HuggingFaceH4/aime_2024@2fe88a2f1091 from the hub"):
        load_questions(load_card("aime24"), None)
