import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from evalpipe.render.leaderboard import LeaderboardRun, render_html, render_markdown


def _summary(label, aime, mmlu=None):
    tasks = {"aime24": {"accuracy": aime, "ci95": [aime - 0.08, aime + 0.08], "truncation_rate": 0.02,
                        "completion_tokens": {"mean": 12034.4, "p50": 11000, "p99": 30000}}}
    if mmlu is not None:
        tasks["mmlu"] = {"accuracy": mmlu, "ci95": [mmlu - 0.01, mmlu + 0.01], "truncation_rate": 0.0,
                         "completion_tokens": {"mean": 900.0, "p50": 800, "p99": 2000}}
    return {"run_id": label, "label": label, "tasks": tasks}


def _comparison(delta, verdict, baseline_acc):
    return {"verdict": verdict, "tasks": {"aime24": {"delta": delta, "verdict": verdict,
                                                     "baseline": {"accuracy": baseline_acc}}}}


RUNS = [
    LeaderboardRun("20250101-a", "fp8", "fp8-block", "sglang 0.5", _summary("fp8", 0.80, 0.90)),
    LeaderboardRun("20250102-b", "w4afp8 <new>", "w4afp8", "evalpipe-runtime", _summary("w4afp8 <new>", 0.70, 0.89),
                   _comparison(-0.10, "fail", 0.80)),
    LeaderboardRun("20250103-c", "w4afp8-fixed", "w4afp8", None, _summary("w4afp8-fixed", 0.79),
                   _comparison(-0.01, "pass", 0.80)),
]


class _Collector(HTMLParser):
    """Elements as (tag, attrs, text) in document order, enough to check the page's structure."""

    def __init__(self):
        super().__init__()
        self.elements = []
        self.stack = []

    def handle_starttag(self, tag, attrs):
        element = [tag, dict(attrs), ""]
        self.elements.append(element)
        if tag not in {"meta", "line", "circle", "path"}:
            self.stack.append(element)

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2] += data

    def find(self, tag, **attrs):
        return [e for e in self.elements if e[0] == tag and all(e[1].get(k) == v for k, v in attrs.items())]


def _parse(text):
    collector = _Collector()
    collector.feed(text)
    return collector


def test_html_table_has_a_row_per_run_and_sortable_numeric_cells():
    page = _parse(render_html(RUNS))
    headers = [e[2] for e in page.find("th")]
    assert headers[:4] == ["run", "label", "quantization", "engine"]
    assert {"aime24 acc % [95% CI]", "aime24 Δ pts (verdict)", "aime24 truncated", "aime24 tokens",
            "mmlu acc % [95% CI]"} <= set(headers)
    cells = page.find("td")
    assert len(cells) == len(RUNS) * len(headers)
    row = cells[len(headers):2 * len(headers)]  # second run
    by_header = dict(zip(headers, row, strict=True))
    assert by_header["label"][2] == "w4afp8 <new>"  # escaped in the source, decoded by the parser
    assert by_header["aime24 acc % [95% CI]"][2] == "70.0 [62.0, 78.0]"
    assert float(by_header["aime24 acc % [95% CI]"][1]["data-value"]) == pytest.approx(0.70)
    assert by_header["aime24 Δ pts (verdict)"][2] == "-10.0 (fail)"
    assert "verdict-fail" in by_header["aime24 Δ pts (verdict)"][1]["class"]
    assert by_header["aime24 tokens"][2] == "12034"
    # a run without the task or a baseline shows a dash and sorts last
    first = dict(zip(headers, cells[:len(headers)], strict=True))
    assert first["aime24 Δ pts (verdict)"][2] == "-"
    assert float(first["aime24 Δ pts (verdict)"][1]["data-value"]) < -1e300
    assert page.find("script") and "addEventListener('click'" in page.find("script")[0][2]


def test_html_is_self_contained_with_a_chart_per_task():
    text = render_html(RUNS)
    page = _parse(text)
    assert not [e for e in page.elements if "src" in e[1] or e[0] == "link"]
    assert "w4afp8 &lt;new&gt;" in text and "w4afp8 <new>" not in text  # labels are escaped
    charts = page.find("svg")
    assert [c[1]["data-task"] for c in charts] == ["aime24", "mmlu"]
    circles = page.find("circle")
    assert len(circles) == 3 + 2  # aime24 for three runs, mmlu for two
    assert len([e for e in page.elements if e[0] == "g" and e[1].get("class") == "whisker"]) == 5
    assert len(page.find("path")) == 2  # baseline markers for the two compared runs
    # the point is drawn inside its whisker
    whisker_lines = [e for e in page.elements if e[0] == "line" and e[1].get("stroke") == "#555"]
    x0, x1 = float(whisker_lines[0][1]["x1"]), float(whisker_lines[0][1]["x2"])
    assert x0 < float(circles[0][1]["cx"]) < x1


def test_markdown_has_the_same_table():
    text = render_markdown(RUNS)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(RUNS)
    assert "w4afp8 <new>" in lines[3] and "-10.0 (fail)" in lines[3] and "70.0 [62.0, 78.0]" in lines[3]
    assert lines[2].count("|") == lines[0].count("|")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_page_renders_and_sorts_in_headless_chromium(tmp_path):
    # Click the aime24 accuracy header once (ascending) after load, then read back the rendered DOM.
    click = '<script>document.querySelectorAll("#leaderboard th")[4].click();</script></body>'
    page = tmp_path / "leaderboard.html"
    page.write_text(render_html(RUNS).replace("</body>", click), encoding="utf-8")
    out = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert out.count("<circle") == 5
    rows = [e for e in _parse(out).find("td") if e[2].startswith("2025")]
    assert [e[2] for e in rows] == ["20250102-b", "20250103-c", "20250101-a"]  # 70.0, 79.0, 80.0
