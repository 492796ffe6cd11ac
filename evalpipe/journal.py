"""The append-only journal of one side: one SampleRecord per JSON line, written and flushed as each sample
finishes, so a run killed at any moment loses at most the line being written.

A later record for the same key supersedes an earlier one (a resumed run re-asks samples that only errored).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pydantic import ValidationError

from evalpipe.errors import UserError
from evalpipe.records import SampleRecord

log = logging.getLogger(__name__)

Key = tuple[str, str, int]


class JournalWriter:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def append(self, record: SampleRecord) -> None:
        # One write per record, flushed at once: the OS holds it even if this process is killed next.
        self._file.write(record.model_dump_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(line: bytes, where: str) -> SampleRecord:
    try:
        return SampleRecord.model_validate(json.loads(line))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as exc:
        raise UserError(f"{where}: corrupt journal line ({' '.join(str(exc).split())[:200]})") from None


def read_journal(path: Path, *, repair: bool = False) -> list[SampleRecord]:
    """All records in file order. A last line without its newline (the process died mid-write) is dropped,
    or kept if it happens to be complete; with `repair` the file is fixed so appending can continue."""
    if not path.is_file():
        return []
    blob = path.read_bytes()
    complete, _, tail = blob.rpartition(b"\n")
    if not complete and not blob.endswith(b"\n"):
        complete, tail = b"", blob
    records = [_parse(line, f"{path}:{i + 1}") for i, line in enumerate(complete.split(b"\n")) if line.strip()]
    if tail.strip():
        try:
            records.append(_parse(tail, str(path)))
            fix, action = b"\n", "completed"
        except UserError:
            fix, action = None, "dropped"
        log.warning("journal %s ended in a partly written line (%d bytes): %s", path, len(tail), action)
        if repair:
            with open(path, "r+b") as f:
                if fix is None:
                    f.truncate(len(blob) - len(tail))
                else:
                    f.seek(0, os.SEEK_END)
                    f.write(fix)
    return records


def latest_by_key(records: list[SampleRecord]) -> dict[Key, SampleRecord]:
    latest: dict[Key, SampleRecord] = {}
    for record in records:
        latest[record.key] = record
    return latest
