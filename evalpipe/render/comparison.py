"""How a comparison is shown: the table printed by `evalpipe run`/`compare`/`gate` and the section of report.md.

Everything is rendered from the comparison.json document (plus its optional "gate" section), so stored and
fresh comparisons look the same.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from evalpipe.gate import headline
from evalpipe.planning import oc_markdown

COLUMNS = ("task", "questions", "candidate %", "baseline %", "Δ pts [95% CI]", "margin pts", "verdict", "gate",
           "lost / gained", "Δ both completed (n)", "truncated % c / b")
FLIPS_SHOWN = 20


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _pts(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def _interval(bounds: list[float | None] | None) -> str:
    if not bounds or bounds[0] is None or bounds[1] is None:
        return "[-, -]"
    return f"[{_pts(bounds[0])}, {_pts(bounds[1])}]"


def comparison_rows(document: dict[str, Any]) -> list[list[str]]:
    gate = (document.get("gate") or {}).get("tasks", {})
    rows = []
    for task, t in document["tasks"].items():
        both = t["both_completed"]
        rows.append([
            task,
            str(t["n_questions"]),
            _pct(t["candidate"]["accuracy"]),
            _pct(t["baseline"]["accuracy"]),
            f"{_pts(t['delta'])} {_interval(t['ci95'])}",
            f"-{100 * t['margin']:.1f}",
            t["verdict"],
            _gate_cell(gate.get(task)),
            f"{len(t['flipped']['baseline_only'])} / {len(t['flipped']['candidate_only'])}",
            f"{_pts(both['delta'])} ({both['n']})",
            f"{_pct(t['candidate']['truncation_rate'])} / {_pct(t['baseline']['truncation_rate'])}",
        ])
    return rows


def _shown(decision: dict[str, Any]) -> tuple[str, str | None]:
    """(result, counted_as) of a gate decision; documents written before results existed derive them."""
    if "result" in decision:
        return decision["result"], decision.get("counted_as")
    if decision["status"] != "error" and decision.get("verdict") == "inconclusive":
        return "inconclusive", decision["status"]
    return decision["status"], None


def _gate_cell(decision: dict[str, Any] | None) -> str:
    if not decision:
        return "-"
    result, counted = _shown(decision)
    return f"{result} (counted {counted})" if counted else result


def _title(document: dict[str, Any]) -> str:
    cand, base = document.get("candidate", {}), document.get("baseline", {})
    title = f"{cand.get('label', 'candidate')} vs {base.get('label', 'baseline')}: {document['verdict']}"
    if document.get("gate"):
        title += f" (gate: {document['gate']['status']})"
    return title


def comparison_table(document: dict[str, Any]) -> Table:
    table = Table(title=_title(document))
    for name in COLUMNS:
        table.add_column(name, justify="left" if name in ("task", "verdict", "gate") else "right")
    for row in comparison_rows(document):
        table.add_row(*row)
    return table


def _estimate(entry: dict[str, Any], scale: float = 1.0, digits: int = 4) -> str:
    lo, hi = entry["ci95"]
    return f"{scale * entry['value']:.{digits}g} [{scale * lo:.{digits}g}, {scale * hi:.{digits}g}]"


def divergence_lines(document: dict[str, Any]) -> list[str]:
    """The divergence probe's statistics with 95% intervals, its limits, the null (if any) and its verdict."""
    section = document.get("divergence")
    if not section:
        return []
    stats = section["statistics"]
    head = (f"divergence ({section['source']}, top-{section['top_k']} prompt logprobs, {section['prompt_format']}): "
            f"{section['verdict']}")
    if stats is None:
        return [head, f"  - nothing scored: {section['failed']} of {section['attempted']} generations failed"]
    limits = ", ".join(f"{name} {section[name]:g}" for name in ("max_kld", "min_top1_agreement")
                       if section.get(name) is not None) or "none (reported only)"
    lines = [
        head,
        f"  - {stats['n_positions']} positions of {stats['n_sequences']} generations "
        f"({section['failed']} failed); limits: {limits}",
        f"  - mean KLD {_estimate(stats['mean_kld'])} nats; p99 KLD {_estimate(stats['p99_kld'])}",
        f"  - top-1 agreement % {_estimate(stats['top1_agreement'], 100)}; mean |Δ logprob| of the baseline's "
        f"tokens {_estimate(stats['mean_abs_logprob_change'])}",
        "  - [95% CI: means over generations, skewness-corrected t; p99 by bootstrap over generations]; "
        f"KL: {section['approximation']}",
    ]
    null = section.get("null")
    if null and null.get("candidate"):
        against = null["candidate"]
        lines.append(f"  - null (baseline vs itself, {len(null['runs'])} A/A runs, {len(null['per_answer_kld'])} "
                     f"answers): median {against['null_median_kld']:.4g}, {null['quantile']:g} quantile "
                     f"{against['null_quantile_kld']:.4g} nats at {against['answers']} answers; "
                     f"{100 * against['share_of_null_at_or_above']:.1f}% of null probes reach the candidate's mean "
                     f"KLD; tolerance {null['tolerance']:g}")
    return lines


def task_headline(decision: dict[str, Any]) -> str:
    """PASS, FAIL, ERROR, or INCONCLUSIVE with how it was counted (never PASS for an undecided task)."""
    result, counted = _shown(decision)
    return headline(result, counted, decision.get("uninformative"))


def override_lines(document: dict[str, Any]) -> list[str]:
    """Settings given on the command line that replaced the run's recorded gate settings."""
    lines = []
    for entry in document.get("overrides") or []:
        lines.append(f"override from the command line: {entry['setting']} {entry['command_line']} replaces "
                     f"{entry['recorded']} ({entry['recorded_from']}) for {', '.join(entry['tasks'])}")
    return lines


def gate_lines(document: dict[str, Any]) -> list[str]:
    """One line per task of the gate: PASS / FAIL / INCONCLUSIVE (counted as ...) / ERROR, the numbers and why;
    then tasks not compared and command-line overrides."""
    lines = []
    for task, decision in (document.get("gate") or {}).get("tasks", {}).items():
        lines.append(f"{task}: {task_headline(decision)} - {decision['summary']}")
        lines += [f"  - {reason}" for reason in decision["reasons"]]
    for task, why in (document.get("missing_tasks") or {}).items():
        lines.append(f"{task}: NOT COMPARED - {why}")
    return lines + override_lines(document)


def comparison_markdown(document: dict[str, Any]) -> str:
    cand, base = document.get("candidate", {}), document.get("baseline", {})
    lines = ["## Comparison", "", f"- candidate: {cand.get('label')} ({cand.get('source')})",
             f"- baseline: {base.get('label')} ({base.get('source')})", f"- verdict: **{document['verdict']}**"]
    if document.get("gate"):
        lines.append(f"- gate: **{document['gate']['status']}** (exit code {document['gate']['exit_code']})")
    lines += ["", "Δ is candidate minus baseline in accuracy points, paired by question; the verdict is the "
              "non-inferiority test against -margin.", "", "| " + " | ".join(COLUMNS) + " |",
              "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(document)]
    if document.get("divergence"):
        lines += ["", "### Divergence probe (teacher-forced)", ""]
        lines += [line if line.startswith(" ") else f"- {line}" for line in divergence_lines(document)]
    if document.get("gate") or document.get("missing_tasks") or document.get("overrides"):
        lines += ["", "### Gate", ""] + [line if line.startswith(" ") else f"- {line}" for line in gate_lines(document)]
    if document.get("operating_characteristics"):
        lines += [""] + oc_markdown(document["operating_characteristics"])
    for task, t in document["tasks"].items():
        lost, gained = t["flipped"]["baseline_only"], t["flipped"]["candidate_only"]
        if lost or gained:
            lines += ["", f"### {task}: flipped questions (solved by a majority of samples on one side only)", "",
                      f"- baseline only ({len(lost)}): {', '.join(lost[:FLIPS_SHOWN])}"
                      + (" ..." if len(lost) > FLIPS_SHOWN else ""),
                      f"- candidate only ({len(gained)}): {', '.join(gained[:FLIPS_SHOWN])}"
                      + (" ..." if len(gained) > FLIPS_SHOWN else "")]
    return "\n".join(lines) + "\n"
