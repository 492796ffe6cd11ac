"""Per-task metrics: pure functions of journal records and plain numpy arrays (no I/O).

The central object is the outcome matrix of a task (evalpipe.outcomes): one row per question in the plan's fixed
order, one column per sample index, 1.0 correct, 0.0 not correct (wrong, no answer, truncated), NaN missing or
transport error.
Accuracy is the mean over questions of the per-question mean over samples; its standard error is the sample
standard deviation of the per-question means over sqrt(n), i.e. the standard error clustered by question (with
the C/(C-1) correction; identical to the sample-level clustered estimator when every question has k samples).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from evalpipe.outcomes import outcome_matrix
from evalpipe.records import OUTCOMES, SampleRecord
from evalpipe.task_plan import TaskPlan

Z95 = 1.959963984540054

def _latest(records: Iterable[SampleRecord], task: str) -> dict[tuple[str, int], SampleRecord]:
    latest: dict[tuple[str, int], SampleRecord] = {}
    hashes = set()
    for r in records:
        if r.task == task:
            hashes.add(r.card_hash)
            latest[(r.question_id, r.sample_index)] = r
    if len(hashes) > 1:
        raise ValueError(f"records of task {task} carry several card hashes {sorted(hashes)}; filter them first")
    return latest


def question_means(matrix: np.ndarray) -> np.ndarray:
    """Per-question mean over available samples; questions with no scored sample are dropped."""
    scored = ~np.isnan(matrix)
    counts = scored.sum(axis=1)
    sums = np.where(scored, matrix, 0.0).sum(axis=1)
    keep = counts > 0
    return sums[keep] / counts[keep]


def mean_stderr_ci(per_question: np.ndarray) -> tuple[float | None, float | None, list[float] | None]:
    n = per_question.size
    if n == 0:
        return None, None, None
    mean = float(per_question.mean())
    if n < 2:
        return mean, None, None
    stderr = float(per_question.std(ddof=1) / math.sqrt(n))
    return mean, stderr, [max(0.0, mean - Z95 * stderr), min(1.0, mean + Z95 * stderr)]


def pass_at_k(matrix: np.ndarray, k: int) -> float | None:
    """Unbiased pass@k (1 - C(n-c, k) / C(n, k)) averaged over questions; a question with fewer than k scored
    samples uses its n instead of k."""
    values = []
    for row in matrix:
        scored = row[~np.isnan(row)]
        n = scored.size
        if n == 0:
            continue
        c = int(scored.sum())
        kk = min(k, n)
        values.append(1.0 if n - c < kk else 1.0 - math.comb(n - c, kk) / math.comb(n, kk))
    return float(np.mean(values)) if values else None


def _vote_key(answer: str) -> str:
    return re.sub(r"[\s$]", "", answer)


def consensus_at_k(answers: Sequence[Sequence[str | None]], matrix: np.ndarray) -> float | None:
    """cons@k: majority vote over the extracted answers of each question (truncated, unanswered and failed
    samples do not vote; ties go to the answer seen first); the question counts as correct when the winning
    answer was graded correct. Questions whose samples all failed in transport are left out."""
    values = []
    for row_answers, row in zip(answers, matrix, strict=True):
        if np.all(np.isnan(row)):
            continue
        votes: Counter[str] = Counter()
        first_seen: dict[str, int] = {}
        correct: dict[str, bool] = {}
        for i, answer in enumerate(row_answers):
            if answer is None:
                continue
            key = _vote_key(answer)
            votes[key] += 1
            first_seen.setdefault(key, i)
            correct[key] = correct.get(key, False) or row[i] == 1.0
        if not votes:
            values.append(0.0)
            continue
        winner = max(votes, key=lambda a: (votes[a], -first_seen[a]))
        values.append(1.0 if correct[winner] else 0.0)
    return float(np.mean(values)) if values else None


def answer_matrix(
    records: Iterable[SampleRecord], task: str, question_ids: Sequence[str], k: int
) -> list[list[str | None]]:
    """Extracted answers that may vote (from samples that finished with an answer), aligned with outcome_matrix."""
    latest = _latest(records, task)
    rows: list[list[str | None]] = [[None] * k for _ in question_ids]
    row_of = {q: i for i, q in enumerate(question_ids)}
    for (qid, sample), r in latest.items():
        if qid in row_of and sample < k and r.outcome in ("correct", "wrong") and r.extracted is not None:
            rows[row_of[qid]][sample] = r.extracted
    return rows


def acc_norm(records: Iterable[SampleRecord], task: str, question_ids: Sequence[str], k: int) -> float | None:
    """Log-likelihood cards: accuracy of the length-normalised choice (`extracted_norm`), averaged like accuracy
    (per question over samples, then over questions; errors excluded)."""
    latest = _latest(records, task)
    matrix = np.full((len(question_ids), k), np.nan)
    row_of = {q: i for i, q in enumerate(question_ids)}
    for (qid, sample), r in latest.items():
        if qid in row_of and sample < k and r.extracted_norm is not None:
            matrix[row_of[qid], sample] = float(r.extracted_norm == r.gold)
    return mean_stderr_ci(question_means(matrix))[0]


def mean_p50_p99(values: Sequence[int]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99))}


def breakdown(matrix: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Accuracy per label value (e.g. per MATH level), rows grouped by their label."""
    out: dict[str, dict[str, Any]] = {}
    for value in sorted(set(labels), key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v)):
        rows = matrix[[i for i, lab in enumerate(labels) if lab == value]]
        per_q = question_means(rows)
        accuracy, stderr, _ = mean_stderr_ci(per_q)
        out[value] = {"n_questions": int(rows.shape[0]), "accuracy": accuracy, "stderr": stderr}
    return out


def summarize_task(
    records: Sequence[SampleRecord], *, task: str, card_hash: str, question_ids: Sequence[str], samples: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary entry exactly as in summary.json, details for details.json) of one task."""
    own = [r for r in records if r.task == task and r.card_hash == card_hash]
    ids, matrix = outcome_matrix(own, task, question_ids, samples)
    # Sorted by key so that sums (and so the summary) do not depend on the order samples finished in.
    latest = [r for _, r in sorted(_latest(own, task).items())]
    accuracy, stderr, ci95 = mean_stderr_ci(question_means(matrix))
    counts = Counter(r.outcome for r in latest)
    total = len(latest)

    def rate(outcome: str) -> float | None:
        return counts[outcome] / total if total else None

    finished = [r for r in latest if r.outcome != "error"]
    summary = {
        "card_hash": card_hash,
        "n_questions": len(ids),
        "samples": samples,
        "accuracy": accuracy,
        "stderr": stderr,
        "ci95": ci95,
        "cons_at_k": consensus_at_k(answer_matrix(own, task, ids, samples), matrix),
        "pass_at_k": pass_at_k(matrix, samples),
        "truncation_rate": rate("truncated"),
        "no_answer_rate": rate("no_answer"),
        "error_rate": rate("error"),
        "completion_tokens": mean_p50_p99(
            [r.usage.completion_tokens for r in finished if r.usage.completion_tokens is not None]
        ),
    }
    if any(r.extracted_norm is not None for r in latest):
        summary["acc_norm"] = acc_norm(own, task, ids, samples)
    labels_of = {r.question_id: r.labels for r in latest}
    label_names = sorted({name for lab in labels_of.values() for name in lab})
    details = {
        "n_samples": total,
        "n_planned": len(ids) * samples,
        "outcomes": {o: counts[o] for o in OUTCOMES},
        "rules": dict(sorted(Counter(r.rule or "none" for r in finished).items())),
        "pass_at": {str(k): pass_at_k(matrix, k) for k in _powers_of_two(samples)},
        "reasoning_tokens": mean_p50_p99(
            [r.usage.reasoning_tokens for r in finished if r.usage.reasoning_tokens is not None]
        ),
        "latency_s": mean_p50_p99([r.latency_s for r in finished if r.latency_s is not None]),
        "retried_samples": sum(1 for r in latest if r.attempts > 1),
        "breakdown": {
            name: breakdown(matrix, [labels_of.get(q, {}).get(name, "unknown") for q in ids]) for name in label_names
        },
    }
    return summary, details


def summarize_side(
    records: Sequence[SampleRecord], plans: Sequence[TaskPlan], *, run_id: str, config_name: str, label: str,
    extra_details: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary.json, details.json) of one side, from its journal records."""
    tasks, details = {}, {}
    for plan in plans:
        entry, more = summarize_task(records, task=plan.name, card_hash=plan.card_hash,
                                     question_ids=plan.question_ids, samples=plan.samples)
        tasks[plan.name] = entry
        details[plan.name] = {**more, "seed": plan.seed, "protocol": plan.card.hashed_view()}
    summary = {"run_id": run_id, "config_name": config_name, "label": label, "tasks": tasks}
    return summary, {"run_id": run_id, "label": label, **(extra_details or {}), "tasks": details}


def _powers_of_two(k: int) -> list[int]:
    out, p = [], 1
    while p < k:
        out.append(p)
        p *= 2
    return [*out, k]
