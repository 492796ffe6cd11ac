"""A side's outcomes, read from its journal once for every use: the outcome matrix of each task.

One row per question in the task's fixed order (by sha256("<task>/<id>"), the plan's order), one column per
sample index. `SideOutcomes` holds it as arrays (correct 1.0 / 0.0 / NaN, truncated, errored); stored baselines
hold it as one code character per sample (OUTCOME_CODES). The latest record of a sample wins. Metrics
(evalpipe.metrics), the comparison (evalpipe.comparison), adaptive stages and the registry all start here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from evalpipe.data import question_order_key
from evalpipe.journal import latest_by_key
from evalpipe.records import SampleRecord


def question_order(task: str, question_ids: Iterable[str]) -> list[str]:
    """The fixed order of a task's questions (the plan's order): by sha256("<task>/<id>")."""
    return sorted(set(question_ids), key=lambda q: question_order_key(task, q))


# One character per sample in stored baselines and in SideOutcomes.codes(); "." is a sample never issued.
OUTCOME_CODES: dict[str, str] = {"correct": "c", "wrong": "w", "no_answer": "n", "truncated": "t", "error": "e"}
MISSING = "."


@dataclass(frozen=True)
class SideOutcomes:
    """One side of one task. correct: 1.0 / 0.0 / NaN (error or never issued); flags are False where NaN."""

    question_ids: tuple[str, ...]
    correct: np.ndarray  # (n, k) float
    truncated: np.ndarray  # (n, k) bool
    errored: np.ndarray  # (n, k) bool

    @classmethod
    def from_codes(cls, question_ids: Sequence[str], rows: Sequence[str]) -> SideOutcomes:
        """From one code string per question (see OUTCOME_CODES); rows may differ in length."""
        width = max((len(row) for row in rows), default=0)
        grid = np.array([list(row.ljust(width, MISSING)) for row in rows], dtype="<U1").reshape(len(rows), width)
        unknown = set(np.unique(grid)) - set(OUTCOME_CODES.values()) - {MISSING}
        if unknown:
            raise ValueError(f"unknown outcome codes {sorted(unknown)}")
        correct = np.where(grid == "c", 1.0, np.where(np.isin(grid, ["w", "n", "t"]), 0.0, np.nan))
        return cls(tuple(question_ids), correct, grid == "t", grid == "e")

    def take(self, question_ids: Iterable[str]) -> SideOutcomes:
        index = {qid: i for i, qid in enumerate(self.question_ids)}
        rows = [index[qid] for qid in question_ids]
        return SideOutcomes(
            tuple(self.question_ids[i] for i in rows), self.correct[rows], self.truncated[rows], self.errored[rows]
        )

    def reindex(self, question_ids: Sequence[str], width: int) -> SideOutcomes:
        """Rows for exactly these questions (never issued where absent) and exactly `width` sample columns."""
        index = {qid: i for i, qid in enumerate(self.question_ids)}
        n, k = len(question_ids), min(width, self.correct.shape[1])
        correct = np.full((n, width), np.nan)
        truncated = np.zeros((n, width), bool)
        errored = np.zeros((n, width), bool)
        for row, qid in enumerate(question_ids):
            if qid in index:
                source = index[qid]
                correct[row, :k] = self.correct[source, :k]
                truncated[row, :k] = self.truncated[source, :k]
                errored[row, :k] = self.errored[source, :k]
        return SideOutcomes(tuple(question_ids), correct, truncated, errored)

    def restrict(self, keep: np.ndarray) -> SideOutcomes:
        """Only the samples where `keep` (same shape) is True; the others become never issued."""
        return SideOutcomes(self.question_ids, np.where(keep, self.correct, np.nan), self.truncated & keep,
                            self.errored & keep)

    @property
    def issued(self) -> np.ndarray:
        """(n, k) bool: a record exists for the sample (answered or errored)."""
        return ~np.isnan(self.correct) | self.errored

    def rate(self, flags: np.ndarray) -> float:
        issued = int(self.issued.sum())
        return float(flags.sum()) / issued if issued else 0.0


def outcome_codes(records: Iterable[SampleRecord]) -> dict[str, tuple[list[str], list[str]]]:
    """Per task, (question ids in the task's fixed order, one OUTCOME_CODES string per question); the latest
    record of a key wins."""
    by_task: dict[str, dict[tuple[str, int], str]] = {}
    for record in latest_by_key(list(records)).values():
        by_task.setdefault(record.task, {})[(record.question_id, record.sample_index)] = record.outcome
    codes = {}
    for task, outcomes in by_task.items():
        question_ids = question_order(task, (qid for qid, _ in outcomes))
        width = 1 + max(index for _, index in outcomes)
        grid = {qid: [MISSING] * width for qid in question_ids}
        for (qid, index), outcome in outcomes.items():
            grid[qid][index] = OUTCOME_CODES[outcome]
        codes[task] = (question_ids, ["".join(grid[qid]).rstrip(MISSING) for qid in question_ids])
    return codes


def side_outcomes(records: Iterable[SampleRecord]) -> dict[str, SideOutcomes]:
    """Per task, the outcome arrays of a side's journal records. An "error" record is missing for accuracy
    (NaN) and flagged as errored."""
    return {task: SideOutcomes.from_codes(ids, rows) for task, (ids, rows) in outcome_codes(records).items()}


def outcome_matrix(
    records: Iterable[SampleRecord], task: str, question_ids: Sequence[str] | None = None, k: int | None = None
) -> tuple[list[str], np.ndarray]:
    """(question ids, matrix of shape (n_questions, k)) with 1.0 / 0.0 / NaN: `side_outcomes(...).correct`.

    Without `question_ids` the rows are the questions present in the records, in the task's fixed order, so two
    sides evaluated on the same plan give aligned rows. Pass another side's ids to align explicitly (questions
    absent from these records get NaN rows). `k` defaults to the highest sample index seen + 1.
    """
    own = [r for r in records if r.task == task]
    hashes = {r.card_hash for r in own}
    if len(hashes) > 1:
        raise ValueError(f"records of task {task} carry several card hashes {sorted(hashes)}; filter them first")
    outcomes = side_outcomes(own).get(task, SideOutcomes.from_codes([], []))
    ids = list(question_ids) if question_ids is not None else list(outcomes.question_ids)
    width = k if k is not None else outcomes.correct.shape[1]
    return ids, outcomes.reindex(ids, width).correct
