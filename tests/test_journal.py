"""The journal survives a process killed mid-write: a torn last line is dropped (or kept if complete)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evalpipe.errors import UserError
from evalpipe.journal import JournalWriter, latest_by_key, read_journal
from evalpipe.records import SampleRecord


def rec(q: str, s: int, outcome: str = "correct") -> SampleRecord:
    return SampleRecord(task="t", card_hash="h", question_id=q, sample_index=s, gold="1", outcome=outcome)


def test_append_flushes_each_record_immediately(tmp_path: Path) -> None:
    path = tmp_path / "side" / "journal.jsonl"
    writer = JournalWriter(path)
    writer.append(rec("a", 0))
    assert read_journal(path) == [rec("a", 0)]  # visible before close: nothing waits in a buffer
    writer.append(rec("b", 0))
    writer.close()
    assert [r.question_id for r in read_journal(path)] == ["a", "b"]


def test_torn_last_line_is_dropped_and_repaired(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with JournalWriter(path) as w:
        w.append(rec("a", 0))
        w.append(rec("b", 0))
    whole = path.read_bytes()
    path.write_bytes(whole + rec("c", 0).model_dump_json().encode()[:40])
    assert [r.question_id for r in read_journal(path)] == ["a", "b"]
    assert path.read_bytes() != whole  # reading alone does not touch the file
    read_journal(path, repair=True)
    assert path.read_bytes() == whole
    with JournalWriter(path) as w:
        w.append(rec("c", 0))
    assert [r.question_id for r in read_journal(path)] == ["a", "b", "c"]


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text(rec("a", 0).model_dump_json() + "\n" + rec("b", 0).model_dump_json(), encoding="utf-8")
    assert [r.question_id for r in read_journal(path, repair=True)] == ["a", "b"]
    assert path.read_text(encoding="utf-8").endswith("}\n")


def test_corruption_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text(rec("a", 0).model_dump_json() + "\n{not json\n" + rec("b", 0).model_dump_json() + "\n")
    with pytest.raises(UserError, match="journal.jsonl:2: corrupt journal line"):
        read_journal(path)


def test_later_record_supersedes_earlier_for_the_same_key() -> None:
    latest = latest_by_key([rec("a", 0, "error"), rec("a", 1), rec("a", 0, "wrong")])
    assert latest[("h", "a", 0)].outcome == "wrong" and len(latest) == 2
