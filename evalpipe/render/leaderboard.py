"""Leaderboard rendering: results/leaderboard.md and a self-contained results/leaderboard.html.

Input is one `LeaderboardRun` per run (evalpipe.tables collects them), turned into one DataFrame row per run by
`evalpipe.tables.leaderboard_frame`; both renderings read that frame. The HTML page has no external resources:
inline CSS, a few lines of inline JavaScript to sort columns, and one inline SVG chart per task (accuracy with 95%
CI whiskers).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from evalpipe.errors import UserError
from evalpipe.tables import LeaderboardRun, leaderboard_frame, leaderboard_runs


@dataclass(frozen=True)
class Cell:
    """One table cell: display text, a sort key (number or text) and an optional CSS class."""

    text: str
    sort: float | str
    css: str = ""


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _accuracy_cell(acc: float | None, lo: float | None, hi: float | None) -> Cell:
    acc = _finite(acc)
    if acc is None:
        return Cell("-", -math.inf)
    ci = f" [{100 * lo:.1f}, {100 * hi:.1f}]" if _finite(lo) is not None and _finite(hi) is not None else ""
    return Cell(f"{100 * acc:.1f}{ci}", acc)


def _delta_cell(delta: float | None, verdict: str | None) -> Cell:
    delta = _finite(delta)
    if delta is None:
        return Cell("-", -math.inf)
    verdict = verdict if isinstance(verdict, str) else ""
    return Cell(f"{100 * delta:+.1f} ({verdict})", delta, f"verdict-{verdict}")


def _rate_cell(rate: float | None) -> Cell:
    rate = _finite(rate)
    return Cell("-", -math.inf) if rate is None else Cell(f"{100 * rate:.1f}%", rate)


def _tokens_cell(mean: float | None) -> Cell:
    mean = _finite(mean)
    return Cell("-", -math.inf) if mean is None else Cell(f"{mean:.0f}", mean)


def _text_cell(value: str | None) -> Cell:
    value = value if isinstance(value, str) else None
    return Cell(value or "-", value or "")


def _kld_cell(value: float | None, lo: float, hi: float, verdict: str) -> Cell:
    if _finite(value) is None:
        return Cell("-", math.inf)  # sorts after every measured divergence
    return Cell(f"{value:.4f} [{lo:.4f}, {hi:.4f}] ({verdict})", value, f"verdict-{verdict}")


def _top1_cell(value: float | None) -> Cell:
    value = _finite(value)
    return Cell("-", -math.inf) if value is None else Cell(f"{100 * value:.2f}", value)


def table(runs: Sequence[LeaderboardRun]) -> tuple[list[str], list[list[Cell]]]:
    """Header and rows shared by the markdown and HTML renderings. Runs with a divergence probe add its mean KL
    divergence (nats, 95% CI, verdict) and top-1 agreement."""
    frame = leaderboard_frame(runs)
    tasks = frame.attrs["tasks"]
    with_probe = "divergence/kld" in frame
    header = ["run", "label", "quantization", "engine"]
    for task in tasks:
        header += [f"{task} acc % [95% CI]", f"{task} Δ pts (verdict)", f"{task} truncated", f"{task} tokens"]
    if with_probe:
        header += ["divergence KLD [95% CI] (verdict)", "top-1 agree %"]
    rows = []
    for _, run in frame.iterrows():
        row = [_text_cell(run["run"]), _text_cell(run["label"]), _text_cell(run["quantization"]),
               _text_cell(run["engine"])]
        for task in tasks:
            row += [_accuracy_cell(run[f"{task}/accuracy"], run[f"{task}/ci95_low"], run[f"{task}/ci95_high"]),
                    _delta_cell(run[f"{task}/delta"], run[f"{task}/verdict"]),
                    _rate_cell(run[f"{task}/truncation_rate"]), _tokens_cell(run[f"{task}/completion_tokens"])]
        if with_probe:
            row += [_kld_cell(run["divergence/kld"], run["divergence/kld_low"], run["divergence/kld_high"],
                              run["divergence/verdict"]), _top1_cell(run["divergence/top1_agreement"])]
        rows.append(row)
    return header, rows


def render_markdown(runs: Sequence[LeaderboardRun]) -> str:
    header, rows = table(runs)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    out = ["# evalpipe leaderboard", "",
           "Accuracy in percent with 95% CI; Δ is candidate minus baseline in points with the non-inferiority verdict.",
           "Divergence: mean teacher-forced KL divergence from the baseline (nats) with 95% CI and verdict.",
           "", line(header), line(["---"] * len(header))]
    out += [line([cell.text for cell in row]) for row in rows]
    return "\n".join(out) + "\n"


# ---- HTML ------------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
td.text, th.text { text-align: left; }
.scroll { overflow-x: auto; }
td.verdict-pass { background: #e3f5e1; }
td.verdict-fail { background: #fbe0e0; }
td.verdict-inconclusive { background: #fff6d6; }
.charts { display: flex; flex-wrap: wrap; gap: 1.5rem; margin-top: 1.5rem; }
svg text { font-size: 11px; fill: #333; }
"""

# Sort by the clicked column's data-value (numbers numerically); a second click reverses.
_SCRIPT = """
document.querySelectorAll('#leaderboard th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = document.querySelector('#leaderboard tbody');
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    document.querySelectorAll('#leaderboard th').forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var rows = Array.from(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.value, y = b.cells[col].dataset.value;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

_CHART_WIDTH, _LABEL_WIDTH, _ROW_HEIGHT, _MARGIN = 520, 160, 24, 24


def _x(fraction: float) -> float:
    return _LABEL_WIDTH + max(0.0, min(1.0, fraction)) * (_CHART_WIDTH - _LABEL_WIDTH - _MARGIN)


def _chart(task: str, frame: pd.DataFrame) -> str:
    """Accuracy per run with 95% CI whiskers; a hollow diamond marks the run's baseline accuracy."""
    height = _MARGIN * 2 + _ROW_HEIGHT * len(frame)
    e = html.escape
    parts = [f'<svg class="task-chart" data-task="{e(task)}" xmlns="http://www.w3.org/2000/svg" '
             f'width="{_CHART_WIDTH}" height="{height}" role="img" aria-label="{e(task)} accuracy with 95% CI">',
             f'<text x="{_LABEL_WIDTH}" y="14" font-weight="bold">{e(task)} accuracy (%)</text>']
    axis_y = height - _MARGIN + 4
    for tick in (0, 25, 50, 75, 100):
        x = _x(tick / 100)
        parts.append(f'<line x1="{x:.1f}" y1="{_MARGIN - 4}" x2="{x:.1f}" y2="{axis_y}" stroke="#e3e3e3"/>')
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 12}" text-anchor="middle">{tick}</text>')
    for i, (_, run) in enumerate(frame.iterrows()):
        y = _MARGIN + _ROW_HEIGHT * i + _ROW_HEIGHT / 2
        parts.append(f'<text x="{_LABEL_WIDTH - 6}" y="{y + 4:.1f}" text-anchor="end">{e(run["label"])}</text>')
        acc = _finite(run[f"{task}/accuracy"])
        if acc is None:
            continue
        lo, hi = run[f"{task}/ci95_low"], run[f"{task}/ci95_high"]
        if _finite(lo) is not None and _finite(hi) is not None:
            x0, x1 = _x(lo), _x(hi)
            parts.append(f'<g class="whisker"><line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}" '
                         f'stroke="#555"/><line x1="{x0:.1f}" y1="{y - 5:.1f}" x2="{x0:.1f}" y2="{y + 5:.1f}" '
                         f'stroke="#555"/><line x1="{x1:.1f}" y1="{y - 5:.1f}" x2="{x1:.1f}" y2="{y + 5:.1f}" '
                         f'stroke="#555"/></g>')
        base = _finite(run[f"{task}/baseline_accuracy"])
        if base is not None:
            bx = _x(base)
            parts.append(f'<path class="baseline" d="M{bx:.1f} {y - 5:.1f} L{bx + 5:.1f} {y:.1f} L{bx:.1f} '
                         f'{y + 5:.1f} L{bx - 5:.1f} {y:.1f} Z" fill="none" stroke="#c05000">'
                         f'<title>baseline {100 * base:.1f}%</title></path>')
        parts.append(f'<circle class="point" cx="{_x(acc):.1f}" cy="{y:.1f}" r="4" fill="#1f5fbf">'
                     f'<title>{e(run["label"])}: {100 * acc:.1f}%</title></circle>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(runs: Sequence[LeaderboardRun]) -> str:
    e = html.escape
    header, rows = table(runs)
    text_columns = 4  # run, label, quantization, engine
    head = "".join(f'<th scope="col" class="{"text" if i < text_columns else ""}">{e(name)}</th>'
                   for i, name in enumerate(header))
    body = []
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            css = " ".join(filter(None, ["text" if index < text_columns else "", cell.css]))
            value = cell.sort if isinstance(cell.sort, str) else (
                f"{math.copysign(1e308, cell.sort):g}" if math.isinf(cell.sort) else repr(cell.sort))
            cells.append(f'<td class="{css}" data-value="{e(value)}">{e(cell.text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    frame = leaderboard_frame(runs)
    charts = "\n".join(_chart(task, frame) for task in frame.attrs["tasks"])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>evalpipe leaderboard</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>evalpipe leaderboard</h1>
<p>Accuracy in percent with 95% CI; Δ is candidate minus baseline in points with the non-inferiority verdict.
Click a column header to sort.</p>
<div class="scroll">
<table id="leaderboard">
<thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
</div>
<div class="charts">
{charts}
</div>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_leaderboard(results_dir: Path, extra_run_dirs: Sequence[Path] = ()) -> int:
    """Rewrite `results_dir`/leaderboard.md and leaderboard.html (with the runs of `extra_run_dirs` too);
    returns the number of rows."""
    if not results_dir.is_dir():
        raise UserError(f"{results_dir}: no such results folder")
    runs = leaderboard_runs(results_dir, extra_run_dirs)
    if not runs:
        raise UserError(f"{results_dir}: no finished runs (candidate/summary.json) or stored baselines found")
    (results_dir / "leaderboard.md").write_text(render_markdown(runs), encoding="utf-8")
    (results_dir / "leaderboard.html").write_text(render_html(runs), encoding="utf-8")
    return len(runs)
