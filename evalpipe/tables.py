"""A finished run as pandas tables, the way it is analysed in a notebook: `load_run(RUN_DIR)`.

`samples`: one row per side, task, question and sample (the latest record of each), with the outcome, the
extracted answer and the gold one, the tokens and whether the answer was truncated. A baseline taken from the
registry has outcomes only (it stores no answers or tokens).

`questions`: one row per task and question, each side's figures side by side (`candidate_accuracy`,
`baseline_accuracy`, ...): the share of its scored samples that are correct or truncated, its majority answer
and its mean completion tokens; `delta` is candidate minus baseline and `flipped` says which side alone solved
the question (more than half of its samples correct), as comparison.json's `flipped` lists do.

`summary`: one row per side and task, summary.json's figures. `evalpipe export` writes these tables to files.

The leaderboard is a table too: `leaderboard_runs` collects the finished runs and stored baselines of a results
folder, `leaderboard_frame` makes them one row per run, which evalpipe.render.leaderboard renders.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from evalpipe.comparison import SOLVED_FRACTION
from evalpipe.data import question_order_key
from evalpipe.errors import UserError
from evalpipe.journal import latest_by_key, read_journal
from evalpipe.outcomes import OUTCOME_CODES
from evalpipe.registry import DEFAULT_REGISTRY_DIR, load_registry, registry_path
from evalpipe.run_files import (
    CANDIDATE,
    COMPARISON,
    REGISTRY_FILE,
    SIDES,
    SUMMARY,
    ComparisonFile,
    RegistryEntry,
    journal_path,
    read_comparison,
    read_file,
    read_resolved_config,
    file_payload,
    read_summary,
    summary_path,
)

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ["side", "task", "question_id", "sample_index", "outcome", "correct", "truncated", "extracted",
                  "gold", "rule", "finish_reason", "prompt_tokens", "completion_tokens", "reasoning_tokens",
                  "latency_s", "attempts", "error"]
_OUTCOME_OF_CODE = {code: outcome for outcome, code in OUTCOME_CODES.items()}


@dataclass(frozen=True)
class RunTables:
    run_dir: Path
    samples: pd.DataFrame
    questions: pd.DataFrame
    summary: pd.DataFrame
    comparison: ComparisonFile | None  # comparison.json, when the run had a baseline

    def flipped(self, lost_by: Literal["candidate", "baseline"] = "candidate") -> pd.DataFrame:
        """The questions only the other side solved: `flipped('candidate')` are the candidate's losses."""
        other = "baseline" if lost_by == "candidate" else "candidate"
        return self.questions[self.questions["flipped"] == f"{other}_only"]


def _journal_rows(side: str, run_dir: Path) -> list[dict]:
    rows = []
    for r in latest_by_key(read_journal(journal_path(run_dir, side))).values():
        rows.append({"side": side, "task": r.task, "question_id": r.question_id, "sample_index": r.sample_index,
                     "outcome": r.outcome, "extracted": r.extracted, "gold": r.gold, "rule": r.rule,
                     "finish_reason": r.finish_reason, "prompt_tokens": r.usage.prompt_tokens,
                     "completion_tokens": r.usage.completion_tokens, "reasoning_tokens": r.usage.reasoning_tokens,
                     "latency_s": r.latency_s, "attempts": r.attempts, "error": r.error})
    return rows


def _registry_rows(side: str, name: str, registry_dir: str) -> list[dict]:
    """A registry baseline's outcomes (it keeps one code per sample, no answers)."""
    entry = read_file(registry_path(name, registry_dir), RegistryEntry)
    rows = []
    for task, stored in entry.tasks.items():
        for qid, codes in stored.questions.items():
            rows += [{"side": side, "task": task, "question_id": qid, "sample_index": index,
                      "outcome": _OUTCOME_OF_CODE[code]} for index, code in enumerate(codes) if code in _OUTCOME_OF_CODE]
    return rows


def sample_table(run_dir: Path) -> pd.DataFrame:
    """One row per side, task, question and sample; see the module's docstring."""
    saved = read_resolved_config(run_dir)
    rows: list[dict] = []
    for side in SIDES:
        spec = saved.get(side) or {}
        if "registry" in spec:
            rows += _registry_rows(side, spec["registry"], spec.get("registry_dir") or DEFAULT_REGISTRY_DIR)
        elif spec:
            rows += _journal_rows(side, run_dir)
    frame = pd.DataFrame(rows).reindex(columns=SAMPLE_COLUMNS)
    scored = frame["outcome"] != "error"
    frame["correct"] = (frame["outcome"] == "correct").astype("boolean").where(scored)
    frame["truncated"] = (frame["outcome"] == "truncated").astype("boolean").where(scored)
    for column in ("sample_index", "prompt_tokens", "completion_tokens", "reasoning_tokens", "attempts"):
        frame[column] = frame[column].astype("Int64")
    order = [question_order_key(task, qid) for task, qid in zip(frame["task"], frame["question_id"], strict=True)]
    frame = frame.assign(order=order).sort_values(["side", "task", "order", "sample_index"], kind="stable")
    return frame.drop(columns="order").reset_index(drop=True)


def _majority(answers: pd.Series) -> str | None:
    """The answer given most often (ties: the first seen); None when no sample answered."""
    counts = answers.dropna().value_counts(sort=False)
    return None if counts.empty else str(counts.idxmax())


def question_table(samples: pd.DataFrame) -> pd.DataFrame:
    """One row per task and question, each side's figures side by side; see the module's docstring."""
    grouped = samples.groupby(["side", "task", "question_id"], sort=False)
    per_side = pd.DataFrame({
        "samples": grouped["correct"].count(),
        "accuracy": grouped["correct"].mean(),
        "truncated": grouped["truncated"].mean(),
        "answer": grouped["extracted"].agg(_majority),
        "completion_tokens": grouped["completion_tokens"].mean(),
    }).astype({"accuracy": "Float64", "truncated": "Float64", "completion_tokens": "Float64"})
    wide = per_side.unstack("side")
    wide.columns = [f"{side}_{name}" for name, side in wide.columns]
    sides = [side for side in SIDES if side in samples["side"].unique()]
    columns = [f"{side}_{name}" for side in sides for name in per_side.columns]
    wide = wide.reindex(columns=columns).reset_index()
    if len(sides) == 2:
        cand, base = wide["candidate_accuracy"], wide["baseline_accuracy"]
        wide["delta"] = cand - base
        solved_cand, solved_base = cand > SOLVED_FRACTION, base > SOLVED_FRACTION
        both = cand.notna() & base.notna()
        wide["flipped"] = pd.Series(pd.NA, index=wide.index, dtype="string")
        wide.loc[both & solved_base & ~solved_cand, "flipped"] = "baseline_only"
        wide.loc[both & solved_cand & ~solved_base, "flipped"] = "candidate_only"
    order = [question_order_key(task, qid) for task, qid in zip(wide["task"], wide["question_id"], strict=True)]
    wide = wide.assign(order=order).sort_values(["task", "order"], kind="stable")
    return wide.drop(columns="order").reset_index(drop=True)


def summary_table(run_dir: Path) -> pd.DataFrame:
    """One row per side and task: summary.json's figures."""
    rows = []
    for side in SIDES:
        if not summary_path(run_dir, side).is_file():
            continue
        summary = read_summary(run_dir, side)
        for task, entry in summary.tasks.items():
            if entry is None:
                continue
            figures = entry.model_dump(exclude={"completion_tokens", "ci95"})
            low, high = entry.ci95 or (None, None)
            rows.append({"side": side, "label": summary.label, "task": task, **figures, "ci95_low": low,
                         "ci95_high": high, "completion_tokens_mean": entry.completion_tokens.mean,
                         "completion_tokens_p99": entry.completion_tokens.p99})
    return pd.DataFrame(rows)


def load_run(run_dir: str | Path) -> RunTables:
    """A finished run directory (of `evalpipe run` or `evalpipe import`) as tables."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    samples = sample_table(run_dir)
    if samples.empty:
        raise UserError(f"{run_dir}: no results (the journals are missing or empty)")
    return RunTables(run_dir, samples, question_table(samples), summary_table(run_dir), read_comparison(run_dir))


EXPORT_FORMATS = ("csv", "parquet")


def export_run(run_dir: str | Path, out_dir: str | Path, file_format: str) -> list[Path]:
    """samples, questions and summary of a run as files in `out_dir`; returns their paths."""
    if file_format not in EXPORT_FORMATS:
        raise UserError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {file_format!r}")
    tables = load_run(run_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("samples", "questions", "summary"):
        path = out_dir / f"{name}.{file_format}"
        frame = getattr(tables, name)
        if file_format == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------
# The leaderboard: one row per run


@dataclass(frozen=True)
class LeaderboardRun:
    run_id: str
    label: str
    quantization: str | None
    engine: str | None
    summary: dict  # the candidate's summary.json
    comparison: dict | None = None  # comparison.json, when the run had a baseline


def leaderboard_runs(results_dir: Path, extra_run_dirs: Sequence[Path] = ()) -> list[LeaderboardRun]:
    """Every finished run (its candidate side and comparison) and stored baseline under `results_dir`, plus the
    runs in `extra_run_dirs` (a run written outside the results folder)."""
    runs = []
    found = set(results_dir.glob(f"**/{CANDIDATE}/{SUMMARY}"))
    found |= {d / CANDIDATE / SUMMARY for d in extra_run_dirs if (d / CANDIDATE / SUMMARY).is_file()}
    for summary_file in sorted({p.resolve() for p in found}):
        run_dir = summary_file.parent.parent
        try:
            summary = read_summary(run_dir)
            spec = read_resolved_config(run_dir).get(CANDIDATE) or {}
            comparison = read_file(run_dir / COMPARISON, ComparisonFile) if (run_dir / COMPARISON).is_file() else None
        except (UserError, OSError) as exc:
            log.warning("skipping %s: %s", run_dir, exc)
            continue
        runs.append(LeaderboardRun(summary.run_id or run_dir.name, summary.label or "?", spec.get("quantization"),
                                   spec.get("engine"), file_payload(summary),
                                   file_payload(comparison) if comparison is not None else None))
    for entry in sorted(results_dir.glob(f"**/{REGISTRY_FILE}")):
        stored = load_registry(entry.parent.name, entry.parent.parent)
        runs.append(LeaderboardRun(f"baseline:{entry.parent.name}", stored.label, stored.endpoint.get("quantization"),
                                   stored.endpoint.get("engine"), stored.summary))
    return sorted(runs, key=lambda run: run.run_id)


def leaderboard_frame(runs: Sequence[LeaderboardRun]) -> pd.DataFrame:
    """One row per run: run, label, quantization, engine; per task `<task>/accuracy`, `ci95_low`, `ci95_high`,
    `truncation_rate`, `completion_tokens` (mean) from summary.json and `delta`, `verdict`, `baseline_accuracy`
    from comparison.json; with a divergence probe in any run, `divergence/kld` (with `kld_low`, `kld_high`),
    `divergence/verdict` and `divergence/top1_agreement`. `frame.attrs["tasks"]` lists the tasks in order."""
    tasks = list(dict.fromkeys(task for run in runs for task in run.summary.get("tasks", {})))
    with_probe = any((run.comparison or {}).get("divergence") for run in runs)
    rows = []
    for run in runs:
        row: dict[str, object] = {"run": run.run_id, "label": run.label, "quantization": run.quantization,
                                  "engine": run.engine}
        for task in tasks:
            entry = run.summary.get("tasks", {}).get(task) or {}
            compared = ((run.comparison or {}).get("tasks") or {}).get(task) or {}
            low, high = (entry.get("ci95") or [None, None])[:2]
            row.update({f"{task}/accuracy": entry.get("accuracy"), f"{task}/ci95_low": low,
                        f"{task}/ci95_high": high, f"{task}/delta": compared.get("delta"),
                        f"{task}/verdict": compared.get("verdict"),
                        f"{task}/truncation_rate": entry.get("truncation_rate"),
                        f"{task}/completion_tokens": (entry.get("completion_tokens") or {}).get("mean"),
                        f"{task}/baseline_accuracy": (compared.get("baseline") or {}).get("accuracy")})
        if with_probe:
            section = (run.comparison or {}).get("divergence") or {}
            stats = section.get("statistics") or {}
            kld = stats.get("mean_kld") or {}
            low, high = (kld.get("ci95") or [None, None])[:2]
            row.update({"divergence/kld": kld.get("value"), "divergence/kld_low": low, "divergence/kld_high": high,
                        "divergence/verdict": section.get("verdict", "") if stats else None,
                        "divergence/top1_agreement": (stats.get("top1_agreement") or {}).get("value")})
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["tasks"] = tasks
    return frame
