"""How a run's results are shown: report.md and the rich tables printed by `evalpipe run`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from evalpipe.task_plan import TaskPlan

TRUNCATION_WARNING = 0.05


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def _acc_ci(entry: dict[str, Any]) -> str:
    if entry["accuracy"] is None:
        return "-"
    if entry["ci95"] is None:
        return _pct(entry["accuracy"])
    lo, hi = entry["ci95"]
    return f"{_pct(entry['accuracy'])} [{_pct(lo)}, {_pct(hi)}]"


def _tokens(entry: dict[str, Any]) -> str:
    t = entry["completion_tokens"]
    return "-" if t["mean"] is None else f"{t['mean']:,.0f} / {t['p99']:,.0f}"


RESULT_COLUMNS = ("task", "card", "questions x k", "accuracy % [95% CI]", "cons@k %", "pass@k %", "truncated %",
                  "no answer %", "errors %", "tokens mean / p99")


def _result_row(task: str, e: dict[str, Any]) -> list[str]:
    return [task, e["card_hash"], f"{e['n_questions']} x {e['samples']}", _acc_ci(e), _pct(e["cons_at_k"]),
            _pct(e["pass_at_k"]), _pct(e["truncation_rate"]), _pct(e["no_answer_rate"]), _pct(e["error_rate"]),
            _tokens(e)]


def results_table(summary: dict[str, Any], side: str) -> Table:
    table = Table(title=f"{side}: {summary['label']}  (run {summary['run_id']})")
    for name in RESULT_COLUMNS:
        table.add_column(name, justify="left" if name in ("task", "card") else "right")
    for task, entry in summary["tasks"].items():
        table.add_row(*_result_row(task, entry))
    return table


def truncation_warnings(summary: dict[str, Any], plans: Sequence[TaskPlan]) -> list[str]:
    max_tokens = {p.name: p.card.sampling.max_tokens for p in plans}
    return [
        f"{task}: {_pct(e['truncation_rate'])}% of answers hit max_tokens={max_tokens.get(task)}; they count as not "
        f"correct, so accuracy understates the model. Raise max_tokens to compare with published numbers."
        for task, e in summary["tasks"].items()
        if e["truncation_rate"] is not None and e["truncation_rate"] > TRUNCATION_WARNING
    ]


def plan_table(plans: Sequence[TaskPlan], done: int = 0) -> Table:
    table = Table(title="plan (nothing sent)")
    for name in ("task", "card", "questions", "samples", "requests", "max_tokens", "prompt tokens (est.)",
                 "token budget (max)"):
        table.add_column(name, justify="left" if name in ("task", "card") else "right")
    for p in plans:
        prompt_tokens = sum(r.prompt_chars for r in p.requests) // 4  # ~4 characters per token in English
        budget = len(p.requests) * p.card.sampling.max_tokens
        table.add_row(p.name, p.card_hash, str(len(p.questions)), str(p.samples), f"{len(p.requests):,}",
                      f"{p.card.sampling.max_tokens:,}", f"{prompt_tokens:,}", f"{budget + prompt_tokens:,}")
    return table


def report_markdown(
    *, config_name: str, run_dir: Path, sides: dict[str, tuple[dict[str, Any], dict[str, Any]]],
    warnings: Sequence[str], config_path: str | None,
) -> str:
    """`config_path` None: the run cannot be resumed (e.g. imported from another harness)."""
    lines = [f"# evalpipe run `{config_name}`", "", f"- run dir: `{run_dir}`"]
    if config_path is not None:
        lines.append(f"- resume: `evalpipe run {config_path} --resume {run_dir}`")
    for side, (summary, details) in sides.items():
        endpoint = details.get("endpoint", {})
        lines += ["", f"## {side}: {summary['label']}", ""]
        lines += [f"- {key}: {value}" for key, value in endpoint.items()]
        lines += ["", "| " + " | ".join(RESULT_COLUMNS) + " |", "|" + "---|" * len(RESULT_COLUMNS)]
        lines += ["| " + " | ".join(_result_row(t, e)) + " |" for t, e in summary["tasks"].items()]
        for task, d in details["tasks"].items():
            outcomes = ", ".join(f"{k} {v}" for k, v in d["outcomes"].items())
            rules = ", ".join(f"{k} {v}" for k, v in d["rules"].items())
            pass_at = ", ".join(f"pass@{k} {_pct(v)}%" for k, v in d["pass_at"].items())
            lines += ["", f"### {task}", "", f"- outcomes: {outcomes}", f"- extraction rule that fired: {rules}",
                      f"- {pass_at}", f"- samples that needed retries: {d['retried_samples']}"]
            for label, groups in d["breakdown"].items():
                lines += ["", f"| {label} | questions | accuracy % |", "|---|---|---|"]
                lines += [f"| {value} | {g['n_questions']} | {_pct(g['accuracy'])} |" for value, g in groups.items()]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"
