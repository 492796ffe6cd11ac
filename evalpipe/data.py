"""Benchmark questions from a local directory (checked against the card's sha256) or from the hub.

Local layout is that of shared/datasets (see its PROVENANCE.md). The hub path goes through `datasets`, imported
only when used. GPQA is decrypted from its zip in memory; its rows never touch the disk.

Questions come back in the card's fixed order: sorted by sha256("<task>/<question id>"). That order does not
depend on the source's row order, and any prefix of it (`limit`) is a spread-out subset.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalpipe.cards import TaskCard
from evalpipe.errors import UserError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "EVALPIPE_DATA_DIR"
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    gold: str = ""
    options: tuple[str, ...] = ()
    correct_index: int | None = None
    labels: dict[str, str] = field(default_factory=dict)


def resolve_data_dir(configured: str | None) -> Path | None:
    """EVALPIPE_DATA_DIR overrides the config's data_dir; None means load from the hub."""
    chosen = os.environ.get(DATA_DIR_ENV) or configured
    return Path(chosen).expanduser().resolve() if chosen else None


def question_order_key(task: str, question_id: str) -> str:
    return hashlib.sha256(f"{task}/{question_id}".encode()).hexdigest()


def load_questions(card: TaskCard, data_dir: Path | None) -> list[Question]:
    rows = _local_rows(card, data_dir) if data_dir is not None else _hub_rows(card)
    questions = [_to_question(card, row, i) for i, row in enumerate(rows)]
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise UserError(f"task {card.name}: duplicate question id '{q.id}' in the data")
        seen.add(q.id)
    return sorted(questions, key=lambda q: question_order_key(card.name, q.id))


def question_chars(question: Question) -> int:
    """Characters of a question's text and options: what `max_question_chars` compares, the same for every model
    and prompt template (a proxy for its prompt's token count)."""
    return len(question.text) + sum(len(option) for option in question.options)


def select_questions(
    card: TaskCard, questions: list[Question], *, limit: int | None, subjects: list[str] | None, where: str,
    offset: int = 0, max_question_chars: int | None = None,
) -> list[Question]:
    """Apply a config's `subjects` (exact label match) and `max_question_chars`, then `offset` and `limit` (a slice
    of the fixed order)."""
    if subjects:
        present = {q.labels["subject"] for q in questions if "subject" in q.labels}
        if not present:
            raise UserError(f"{where}.subjects: task {card.name} has no subjects to choose from")
        unknown = sorted(set(subjects) - present)
        if unknown:
            raise UserError(f"{where}.subjects: unknown subject(s) {unknown} for task {card.name}")
        wanted = set(subjects)
        questions = [q for q in questions if q.labels.get("subject") in wanted]
    if max_question_chars is not None:
        kept = [q for q in questions if question_chars(q) <= max_question_chars]
        if not kept:
            shortest = min(map(question_chars, questions), default=0)
            raise UserError(f"{where}.max_question_chars: no question of task {card.name} is that short "
                            f"({max_question_chars}; the shortest has {shortest} characters)")
        questions = kept
    if offset >= len(questions):
        raise UserError(f"{where}.offset: {offset} skips all {len(questions)} questions of task {card.name}")
    return questions[offset:offset + limit] if limit is not None else questions[offset:]


# ---------------------------------------------------------------------------------------------------------
# Local files


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _read_verified(data_dir: Path, relative: str, expected: str, task: str) -> bytes:
    path = data_dir / relative
    if not path.is_file():
        raise UserError(
            f"task {task}: missing data file {path} (data_dir={data_dir}); "
            f"unset data_dir / {DATA_DIR_ENV} to load from the hub instead"
        )
    blob = path.read_bytes()
    stat = path.stat()
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
    digest = _DIGESTS.get(cache_key) or hashlib.sha256(blob).hexdigest()
    if digest != expected:
        raise UserError(f"task {task}: checksum mismatch for {path}: sha256 {digest}, card expects {expected}")
    _DIGESTS[cache_key] = digest
    return blob


def _local_rows(card: TaskCard, data_dir: Path) -> list[dict[str, Any]]:
    local, fmt = card.dataset.local, card.dataset.format
    if fmt == "jsonl":
        rows: list[dict[str, Any]] = []
        for relative, digest in local.files.items():
            text = _read_verified(data_dir, relative, digest, card.name).decode("utf-8")
            rows.extend(json.loads(line) for line in text.splitlines() if line.strip())
        return rows
    if fmt == "mmlu_csv":
        rows = []
        for relative, digest in sorted(local.files.items()):
            subject = re.sub(r"_test\.csv$", "", Path(relative).name)
            text = _read_verified(data_dir, relative, digest, card.name).decode("utf-8")
            rows.extend(_mmlu_rows(subject, ([*r] for r in csv.reader(io.StringIO(text, newline="")))))
        return rows
    if fmt == "gpqa_zip":
        (relative, digest), *more = local.files.items()
        if more or not local.member:
            raise UserError(f"task {card.name}: gpqa_zip needs exactly one file and a member")
        archive = _read_verified(data_dir, relative, digest, card.name)
        password = local.password.encode() if local.password else None
        try:
            plain = zipfile.ZipFile(io.BytesIO(archive)).read(local.member, pwd=password)
        except (KeyError, RuntimeError, zipfile.BadZipFile) as exc:
            raise UserError(f"task {card.name}: cannot read {local.member} from {relative}: {exc}") from None
        member_digest = hashlib.sha256(plain).hexdigest()
        if local.member_sha256 and member_digest != local.member_sha256:
            raise UserError(f"task {card.name}: checksum mismatch for {relative}:{local.member}")
        return list(csv.DictReader(io.StringIO(plain.decode("utf-8"), newline="")))
    raise AssertionError(fmt)


def _mmlu_rows(subject: str, records: Iterable[list[str]]) -> Iterator[dict[str, Any]]:
    for index, record in enumerate(records):
        if len(record) != 6:
            raise UserError(f"mmlu {subject}: row {index} has {len(record)} fields, expected 6")
        question, a, b, c, d, answer = record
        yield {"id": f"{subject}/{index}", "subject": subject, "question": question,
               "A": a, "B": b, "C": c, "D": d, "answer": answer.strip()}


# ---------------------------------------------------------------------------------------------------------
# Hub


def _hub_rows(card: TaskCard) -> list[dict[str, Any]]:
    hub = card.dataset.hub
    try:
        import datasets  # lazy: heavy import, only needed without local data
    except ImportError:  # pragma: no cover - core dependency
        raise UserError("the `datasets` package is needed to load from the hub; install it or set data_dir") from None
    log.info("loading %s (%s) @ %s from the hub", hub.path, hub.name or "default", hub.revision[:12])
    try:
        dataset = datasets.load_dataset(hub.path, hub.name, split=hub.split, revision=hub.revision)
    except Exception as exc:  # noqa: BLE001 - any hub failure is reported the same way
        raise UserError(
            f"task {card.name}: could not load {hub.path}@{hub.revision[:12]} from the hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"set data_dir or {DATA_DIR_ENV} to a local copy (gated sets such as GPQA also need HF_TOKEN)"
        ) from None
    rows = [dict(row) for row in dataset]
    if card.dataset.format == "mmlu_csv":
        return _mmlu_hub_rows(rows)
    return rows


def _mmlu_hub_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """cais/mmlu rows (question, subject, choices, answer index) in the local CSV's shape and ids."""
    per_subject: dict[str, list[list[str]]] = {}
    for row in rows:
        per_subject.setdefault(row["subject"], []).append(
            [row["question"], *row["choices"], LETTERS[int(row["answer"])]]
        )
    return [r for subject in sorted(per_subject) for r in _mmlu_rows(subject, per_subject[subject])]


# ---------------------------------------------------------------------------------------------------------
# Row -> Question


def _field(card: TaskCard, row: dict[str, Any], name: str, index: int) -> str:
    if name not in row or row[name] is None:
        raise UserError(f"task {card.name}: row {index} has no field '{name}'")
    return str(row[name])


def _to_question(card: TaskCard, row: dict[str, Any], index: int) -> Question:
    fields = card.fields
    raw_id = _field(card, row, fields.id, index)
    if fields.id_pattern:
        match = re.search(fields.id_pattern, raw_id)
        if not match:
            raise UserError(f"task {card.name}: id '{raw_id}' does not match {fields.id_pattern}")
        qid = "-".join(match.groups())
    else:
        qid = raw_id.strip()
    labels = {label: _field(card, row, src, index).strip() for label, src in fields.labels.items()}
    for label, derived in card.derived_labels.items():
        labels[label] = derived.mapping.get(labels.get(derived.source, ""), "other")
    text = _field(card, row, fields.question, index).strip()
    if not fields.options:
        return Question(id=qid, text=text, gold=_field(card, row, fields.answer or "", index).strip(), labels=labels)
    options = tuple(_field(card, row, name, index).strip() for name in fields.options)
    if fields.correct_option is not None:
        correct = fields.correct_option
    else:
        letter = _field(card, row, fields.answer or "", index).strip()
        if letter not in LETTERS[: len(options)]:
            raise UserError(f"task {card.name}: question {qid} has answer '{letter}', not an option letter")
        correct = LETTERS.index(letter)
    return Question(id=qid, text=text, options=options, correct_index=correct, labels=labels)
