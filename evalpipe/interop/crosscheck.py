"""`evalpipe crosscheck RUN_DIR --grader evalscope|lm-eval`: re-grade every journal sample with another harness's own
answer extraction and grader, and measure how often it agrees with ours. No new generations.

Each answered sample (transport errors have no response and are skipped) goes to the harness grader with what that
harness would have received from the server: the content and the reasoning field, the gold as its dataset stores
it, and for multiple choice the option texts in the order shown. A sample agrees when both call it correct or both
call it not correct (truncated and unanswered count as not correct, as in our accuracy). A disagreement is either
`ours_only` (we say correct, they do not) or `theirs_only`, and is placed where the two part:
`truncation` (we never count a truncated answer; the harnesses ignore finish_reason), `extraction` (different
answers were extracted) or `grading` (the same answer, judged differently).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evalpipe.cards import load_card
from evalpipe.config import parse_config
from evalpipe.data import Question
from evalpipe.errors import UserError
from evalpipe.interop.harnesses import harness_python, harnesses, run_harness_grader
from evalpipe.journal import latest_by_key, read_journal
from evalpipe.records import SampleRecord
from evalpipe.run_files import CROSSCHECK, REPORT, RESOLVED_CONFIG, journal_path, read_resolved_config, write_json
from evalpipe.runner import plan_from_config
from evalpipe.task_plan import TaskPlan, option_order

REPORT_ROWS_PER_TASK = 25


@dataclass(frozen=True)
class Disagreement:
    task: str
    question_id: str
    sample_index: int
    kind: str  # ours_only | theirs_only
    where: str  # truncation | extraction | grading
    ours: dict[str, Any]
    theirs: dict[str, Any]


@dataclass
class TaskAgreement:
    harness_task: str
    graded: int = 0
    ungraded: int = 0
    agree: int = 0
    ours_correct: int = 0
    theirs_correct: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    where: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        def rate(n: int) -> float | None:
            return n / self.graded if self.graded else None

        return {"harness_task": self.harness_task, "graded": self.graded, "ungraded": self.ungraded,
                "agreement": rate(self.agree), "ours_correct_rate": rate(self.ours_correct),
                "theirs_correct_rate": rate(self.theirs_correct), "ours_only": self.kinds["ours_only"],
                "theirs_only": self.kinds["theirs_only"], "where": dict(sorted(self.where.items()))}


# ---------------------------------------------------------------------------------------------------------
# Pure comparison


def _comparable(answer: str | None) -> str:
    """Extracted answers as compared to tell extraction from grading differences: no spaces, $, or (X) brackets."""
    s = re.sub(r"[\s$]", "", answer or "")
    return re.sub(r"^\((.)\)$", r"\1", s)


def where_they_part(record: SampleRecord, theirs_extracted: str | None) -> str:
    if record.outcome == "truncated":
        return "truncation"
    if _comparable(record.extracted) != _comparable(theirs_extracted):
        return "extraction"
    return "grading"


def compare(
    records: Sequence[SampleRecord], verdicts: Sequence[dict[str, Any]], harness_tasks: dict[str, str]
) -> tuple[dict[str, TaskAgreement], list[Disagreement], list[dict[str, Any]]]:
    """(agreement per task, every disagreement, every sample the harness could not grade) of aligned records and
    verdicts."""
    per_task: dict[str, TaskAgreement] = {}
    disagreements: list[Disagreement] = []
    ungraded: list[dict[str, Any]] = []
    for record, verdict in zip(records, verdicts, strict=True):
        stats = per_task.setdefault(record.task, TaskAgreement(harness_task=harness_tasks[record.task]))
        if verdict["correct"] is None:
            stats.ungraded += 1
            ungraded.append({"task": record.task, "question_id": record.question_id,
                             "sample_index": record.sample_index, "error": verdict["error"]})
            continue
        ours, theirs = record.outcome == "correct", bool(verdict["correct"])
        stats.graded += 1
        stats.ours_correct += ours
        stats.theirs_correct += theirs
        if ours == theirs:
            stats.agree += 1
            continue
        kind = "ours_only" if ours else "theirs_only"
        where = where_they_part(record, verdict["extracted"])
        stats.kinds[kind] += 1
        stats.where[where] += 1
        disagreements.append(Disagreement(
            task=record.task, question_id=record.question_id, sample_index=record.sample_index, kind=kind,
            where=where, ours={"extracted": record.extracted, "rule": record.rule, "outcome": record.outcome,
                               "finish_reason": record.finish_reason},
            theirs={"extracted": verdict["extracted"], "correct": theirs, "details": verdict["details"]},
        ))
    return per_task, disagreements, ungraded


# ---------------------------------------------------------------------------------------------------------
# Journal -> grader items


def _saved_plans(run_dir: Path, tasks: set[str]) -> dict[str, TaskPlan]:
    """The plans of `tasks` as run, rebuilt from the run's resolved config (they give the option texts)."""
    if not tasks:
        return {}
    saved = read_resolved_config(run_dir)
    if "imported" in saved:
        raise UserError(f"{run_dir} was imported from {saved['imported'].get('harness')}: its journal has no option "
                        f"texts for {sorted(tasks)}, which the harness graders need")
    saved.pop("resolved", None)
    config = parse_config(saved, str(run_dir / RESOLVED_CONFIG))
    entries = [entry for entry in config.tasks if entry.task in tasks]
    if not entries:
        return {}
    try:
        _, plans = plan_from_config(config.model_copy(update={"tasks": entries}))
    except UserError as exc:
        raise UserError(f"crosscheck needs the run's questions to rebuild the option texts: {exc}") from None
    return {plan.name: plan for plan in plans}


def _choices(plan: TaskPlan, question: Question, sample_index: int) -> list[str]:
    """The option texts in the order the sample's prompt showed them."""
    order = list(range(len(question.options)))
    if plan.card.prompt.shuffle_options:
        order = option_order(plan.card.prompt.shuffle_salt, question.id, sample_index, len(question.options))
    return [question.options[i] for i in order]


def grader_items(records: Sequence[SampleRecord], plans: dict[str, TaskPlan]) -> list[dict[str, Any]]:
    """One harness_grader item per record (multiple-choice tasks need their plan, for the options shown)."""
    questions = {name: {q.id: q for q in plan.questions} for name, plan in plans.items()}
    items = []
    for i, r in enumerate(records):
        item: dict[str, Any] = {"id": i, "task": r.task, "content": r.content, "reasoning": r.reasoning,
                                "finish_reason": r.finish_reason, "gold": r.gold, "subject": r.labels.get("subject")}
        plan = plans.get(r.task)
        if plan is not None:
            if plan.card_hash != r.card_hash:
                raise UserError(f"{r.task}: the journal was written under card_hash {r.card_hash} but "
                                f"tasks/{r.task}.yaml now gives {plan.card_hash}; crosscheck needs the run's protocol")
            item["choices"] = _choices(plan, questions[r.task][r.question_id], r.sample_index)
        items.append(item)
    return items


# ---------------------------------------------------------------------------------------------------------
# Run directory in, crosscheck.json + report.md section out


def crosscheck_run(run_dir: Path, grader: str, side: str = "candidate") -> dict[str, Any]:
    """Re-grade `side`'s journal with `grader`; update crosscheck.json and report.md; return this grader's entry."""
    journal = journal_path(run_dir, side)
    if not journal.is_file():
        raise UserError(f"{run_dir}: no journal for side '{side}' ({journal} is missing)")
    harness_python(grader)  # a missing environment is reported before any work
    mapping = harnesses()[grader].tasks
    latest = sorted(latest_by_key(read_journal(journal)).values(), key=lambda r: (r.task, r.question_id,
                                                                                    r.sample_index))
    skipped = sorted({r.task for r in latest} - set(mapping))
    records = [r for r in latest if r.task in mapping and r.outcome != "error"]
    if not records:
        raise UserError(f"{journal}: no answered sample of a task {grader} can grade ({sorted(mapping)})")
    tasks = sorted({r.task for r in records})
    multiple_choice = {t for t in tasks if load_card(t).scoring.answer_type == "multiple_choice"}
    version, verdicts = run_harness_grader(grader, tasks, grader_items(records, _saved_plans(run_dir,
                                                                                            multiple_choice)))
    per_task, disagreements, ungraded = compare(records, verdicts, {t: mapping[t].task for t in tasks})
    entry = {
        "harness": grader, "harness_version": version, "side": side,
        "errors_skipped": sum(1 for r in latest if r.outcome == "error"), "tasks_skipped": skipped,
        "tasks": {task: stats.to_dict() for task, stats in sorted(per_task.items())},
        "disagreements": [asdict(d) for d in disagreements], "ungraded": ungraded,
    }
    path = run_dir / CROSSCHECK
    existing = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    existing.setdefault("graders", {}).setdefault(grader, {})[side] = entry
    write_json(path, {"run_dir": str(run_dir), "graders": existing["graders"]})
    update_report(run_dir / REPORT, grader, side, report_section(entry))
    return entry


_HARNESS_TITLES = {"evalscope": "EvalScope", "lm-eval": "lm-evaluation-harness"}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _cell(value: Any) -> str:
    text = "∅" if value is None or value == "" else str(value)
    text = " ".join(text.split())
    return (text[:60] + "…" if len(text) > 61 else text).replace("|", "\\|")


AGREEMENT_COLUMNS = ("task", "their task", "samples", "agreement %", "ours correct %", "theirs correct %",
                     "ours only", "theirs only", "where they part", "ungraded")


def agreement_rows(entry: dict[str, Any]) -> list[list[str]]:
    """One row per task of a grader's entry, in AGREEMENT_COLUMNS order (report.md and the terminal table)."""
    return [[task, t["harness_task"], str(t["graded"]), _pct(t["agreement"]), _pct(t["ours_correct_rate"]),
             _pct(t["theirs_correct_rate"]), str(t["ours_only"]), str(t["theirs_only"]),
             ", ".join(f"{k} {v}" for k, v in t["where"].items()) or "-", str(t["ungraded"])]
            for task, t in entry["tasks"].items()]


def report_section(entry: dict[str, Any]) -> str:
    """The report.md section of one grader's cross-check: agreement per task, then each disagreement."""
    title = _HARNESS_TITLES.get(entry["harness"], entry["harness"])
    lines = [f"## Cross-check: {title} {entry['harness_version']} ({entry['side']})", "",
             f"The {entry['side']} responses re-graded with {title}'s own answer extraction and grader (no new "
             f"generations). ours only: we count the sample correct and {title} does not; theirs only: the reverse.",
             "", "| " + " | ".join(AGREEMENT_COLUMNS) + " |", "|" + "---|" * len(AGREEMENT_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in agreement_rows(entry)]
    if entry["errors_skipped"] or entry["tasks_skipped"]:
        lines += ["", f"Not graded: {entry['errors_skipped']} transport errors (no response); tasks without a "
                      f"{title} counterpart: {entry['tasks_skipped'] or 'none'}."]
    disagreements = entry["disagreements"]
    if disagreements:
        lines += ["", f"### Disagreements with {title} ({len(disagreements)}; at most {REPORT_ROWS_PER_TASK} per "
                      f"task here, all in {CROSSCHECK})", "",
                  "| task | question | sample | kind | where | ours: answer (rule) -> outcome | theirs: answer -> "
                  "verdict |", "|---|---|---|---|---|---|---|"]
        shown: Counter[str] = Counter()
        for d in disagreements:
            shown[d["task"]] += 1
            if shown[d["task"]] > REPORT_ROWS_PER_TASK:
                continue
            ours, theirs = d["ours"], d["theirs"]
            lines.append(f"| {d['task']} | {_cell(d['question_id'])} | {d['sample_index']} | {d['kind']} | "
                         f"{d['where']} | {_cell(ours['extracted'])} ({ours['rule']}) -> {ours['outcome']} | "
                         f"{_cell(theirs['extracted'])} -> {'correct' if theirs['correct'] else 'not correct'} |")
    return "\n".join(lines) + "\n"


def update_report(path: Path, grader: str, side: str, section: str) -> None:
    """Put `section` into report.md between markers of its own, replacing an earlier cross-check's section."""
    begin, end = f"<!-- crosscheck {grader} {side} -->", f"<!-- /crosscheck {grader} {side} -->"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    block = f"{begin}\n{section}{end}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block
    path.write_text(text, encoding="utf-8")
