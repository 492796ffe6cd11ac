"""`evalpipe run` with a baseline, `gate`, `compare`, `plan`, `baseline save` and `leaderboard`, end to end
against two in-repo fake servers over loopback HTTP (in-process CLI)."""

from __future__ import annotations

import contextlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from evalpipe.journal import read_journal
from evalpipe.runner import plan_from_config
from evalpipe.testing.fake_server import FakeServer, answer_key_for_plans
from orch_helpers import needs_shared_data, run_cli, write_config

pytestmark = needs_shared_data

TASKS = [
    {"task": "aime24", "samples": 4, "max_tokens": 256, "limit": 30},
    {"task": "gpqa_diamond", "samples": 2, "max_tokens": 256, "limit": 40},
]
ADAPTIVE_AIME = [{"task": "aime24", "samples": "auto", "min_samples": 2, "max_samples": 8, "max_tokens": 256,
                  "limit": 30}]
LIVE_BASELINE = {"label": "fp8", "model": "fake-model", "base_url": "http://127.0.0.1:1/v1"}
COMPARISON_TASK_KEYS = {"candidate", "baseline", "delta", "stderr", "ci95", "margin", "verdict", "flipped",
                        "both_completed"}


def _config(tmp_path: Path, tasks=TASKS, name: str = "run.yaml", **extra) -> Path:
    extra.setdefault("preflight", {"pilot_samples": 2})
    return write_config(tmp_path / name, "http://127.0.0.1:1/v1", tasks, **extra)


@contextlib.contextmanager
def _servers(config: Path, candidate: dict, baseline: dict | None = None):
    """Fake servers that know the plan's answers; the config is pointed at them."""
    _, plans = plan_from_config(config)
    key = answer_key_for_plans(plans)
    with contextlib.ExitStack() as stack:
        cand = stack.enter_context(FakeServer({"answer_key": key, **candidate}))
        base = stack.enter_context(FakeServer({"answer_key": key, **baseline})) if baseline is not None else None
        data = yaml.safe_load(config.read_text())
        data["candidate"]["base_url"] = cand.base_url
        if base is not None:
            data["baseline"]["base_url"] = base.base_url
        config.write_text(yaml.safe_dump(data))
        yield cand, base


def _run(config: Path, *args: str):
    result = run_cli("run", str(config), "--no-progress", *args)
    run_dir = Path(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None
    return result, run_dir


def test_live_baseline_runs_both_sides_on_identical_samples_and_writes_the_comparison(tmp_path):
    config = _config(tmp_path, baseline=LIVE_BASELINE, gate={"margin": 0.3})
    with _servers(config, {"accuracy": 0.7, "truncation_rate": 0.05}, {"accuracy": 0.7}) as (cand, base):
        result, run_dir = _run(config)
    assert result.exit_code == 0, result.output
    keys = {side: {(r.key, r.seed) for r in read_journal(run_dir / side / "journal.jsonl")}
            for side in ("candidate", "baseline")}
    assert keys["candidate"] == keys["baseline"] and len(keys["candidate"]) == 30 * 4 + 40 * 2
    assert len(cand.requests) == len(base.requests) == 200
    for side in ("candidate", "baseline"):
        assert json.loads((run_dir / side / "summary.json").read_text())["tasks"].keys() == {"aime24", "gpqa_diamond"}
    comparison = json.loads((run_dir / "comparison.json").read_text())
    assert comparison["verdict"] == "pass" and comparison["gate"]["exit_code"] == 0
    aime = comparison["tasks"]["aime24"]
    assert COMPARISON_TASK_KEYS <= set(aime)
    assert aime["candidate"]["truncation_rate"] > 0 and aime["baseline"]["truncation_rate"] == 0
    assert aime["both_completed"]["n"] < 30  # questions with a truncated candidate sample are left out
    assert aime["ci95"][0] <= aime["delta"] <= aime["ci95"][1] and aime["margin"] == 0.3
    report = (run_dir / "report.md").read_text()
    assert "## Comparison" in report and "## baseline: fp8" in report


def test_a_regression_fails_the_gate_with_exit_1_and_junit(tmp_path):
    config = _config(tmp_path, baseline=LIVE_BASELINE, gate={"margin": 0.05})
    with _servers(config, {"accuracy": 0.2}, {"accuracy": 0.8}):
        result, run_dir = _run(config)
    assert result.exit_code == 1, result.output
    comparison = json.loads((run_dir / "comparison.json").read_text())
    assert comparison["verdict"] == "fail" and comparison["tasks"]["aime24"]["flipped"]["baseline_only"]
    junit = tmp_path / "gate.xml"
    gated = run_cli("gate", str(run_dir), "--junit", str(junit))
    assert gated.exit_code == 1
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "2"
    assert "delta" in suite.find("testcase/failure").text
    # the same stored run passes a (silly) 90-point margin: the gate is recomputed, not read back
    assert run_cli("gate", str(run_dir), "--margin", "0.9").exit_code == 0


def test_truncation_over_the_limit_cannot_pass(tmp_path):
    config = _config(tmp_path, tasks=TASKS[:1], baseline=LIVE_BASELINE,
                     gate={"margin": 0.5, "max_truncation_rate": 0.02})
    with _servers(config, {"accuracy": 0.7, "truncation_rate": 0.2}, {"accuracy": 0.7}):
        result, run_dir = _run(config)
    assert result.exit_code == 1
    reasons = json.loads((run_dir / "comparison.json").read_text())["gate"]["tasks"]["aime24"]["reasons"]
    assert any("raise max_tokens" in reason for reason in reasons)


def test_unreachable_baseline_is_an_infrastructure_error_before_anything_is_written(tmp_path):
    config = _config(tmp_path, tasks=TASKS[:1], baseline=LIVE_BASELINE, gate={})
    with _servers(config, {"accuracy": 0.7}):  # the baseline keeps its dead port 1
        result, _ = _run(config)
    assert result.exit_code == 3
    assert "baseline" in result.output and not (tmp_path / "runs").exists()


def test_error_rate_over_the_limit_exits_3(tmp_path):
    config = _config(tmp_path, tasks=TASKS[:1], baseline=LIVE_BASELINE, gate={"max_error_rate": 0.01},
                     preflight={"enabled": False})
    failing = {"match": r"(?s)^.{0,260}$", "replies": [{"status": 500, "message": "kernel fault"}]}
    with _servers(config, {"accuracy": 0.7, "rules": [failing]}, {"accuracy": 0.7}):
        result, run_dir = _run(config)
    assert result.exit_code == 3, result.output
    decision = json.loads((run_dir / "comparison.json").read_text())["gate"]["tasks"]["aime24"]
    assert decision["status"] == "error" and "max_error_rate" in decision["reasons"][0]


def _fp8_baseline(tmp_path: Path) -> Path:
    """A finished candidate-only run of the 'fp8' model, stored as registry entry r1-fp8."""
    config = _config(tmp_path, name="fp8.yaml")
    with _servers(config, {"accuracy": 0.75}):
        result, run_dir = _run(config)
    assert result.exit_code == 0, result.output
    registry = tmp_path / "baselines"
    saved = run_cli("baseline", "save", str(run_dir), "--name", "r1-fp8", "--registry-dir", str(registry))
    assert saved.exit_code == 0, saved.output
    return registry


def test_registry_baseline_only_the_candidate_is_evaluated(tmp_path):
    registry = _fp8_baseline(tmp_path)
    stored = json.loads((registry / "r1-fp8" / "baseline.json").read_text())
    assert set(stored["tasks"]) == {"aime24", "gpqa_diamond"}
    assert all(len(codes) == 4 for codes in stored["tasks"]["aime24"]["questions"].values())
    assert stored["tasks"]["aime24"]["summary"]["completion_tokens"]["mean"] > 0
    assert "content" not in json.dumps(stored)  # no responses or prompts are stored

    baseline = {"registry": "r1-fp8", "registry_dir": str(registry)}
    config = _config(tmp_path, baseline=baseline, gate={"margin": 0.3})
    with _servers(config, {"accuracy": 0.75}) as (cand, _):
        result, run_dir = _run(config)
    assert result.exit_code == 0, result.output
    assert len(cand.requests) == 200 and not (run_dir / "baseline" / "journal.jsonl").exists()
    comparison = json.loads((run_dir / "comparison.json").read_text())
    assert comparison["baseline"]["source"] == "registry:r1-fp8"
    assert comparison["tasks"]["aime24"]["delta"] == 0.0  # same deterministic model, same seeds
    assert run_cli("gate", str(run_dir)).exit_code == 0  # its own (registry) baseline
    assert run_cli("gate", str(run_dir), "--baseline", "r1-fp8", "--registry-dir", str(registry)).exit_code == 0

    # a config that changes a score-moving setting is refused before anything is sent, naming the field
    changed = _config(tmp_path, name="changed.yaml", tasks=[{**TASKS[0], "max_tokens": 512}], baseline=baseline)
    refused, _ = _run(changed)
    assert refused.exit_code == 2
    assert "aime24.max_tokens: candidate 512, baseline 256" in refused.output
    assert "aime24.card_hash" in refused.output


def test_stored_runs_with_different_protocols_are_refused_by_compare_and_gate(tmp_path):
    one = _config(tmp_path, tasks=TASKS[:1], name="one.yaml")
    other = _config(tmp_path, tasks=[{**TASKS[0], "max_tokens": 300}], name="other.yaml")
    runs = []
    for config in (one, other):
        with _servers(config, {"accuracy": 0.7}):
            result, run_dir = _run(config)
        runs.append(run_dir)
    compared = run_cli("compare", str(runs[0]), str(runs[1]))
    assert compared.exit_code == 2 and "aime24.max_tokens: candidate 256, baseline 300" in compared.output
    assert "--force" in compared.output
    assert run_cli("gate", str(runs[0]), "--baseline", str(runs[1])).exit_code == 2
    same = run_cli("compare", str(runs[0]), str(runs[0]))
    assert same.exit_code == 0 and "aime24" in same.output
    document = tmp_path / "forced.json"
    forced = run_cli("compare", str(runs[0]), str(runs[1]), "--force", "--json", str(document))
    assert forced.exit_code == 0, forced.output
    recorded = json.loads(document.read_text())
    assert "aime24.max_tokens: candidate 256, baseline 300" in recorded["forced_differences"]
    assert "aime24" in recorded["tasks"]
    gated = run_cli("gate", str(runs[0]), "--baseline", str(runs[1]), "--force", "--margin", "0.5")
    assert gated.exit_code in (0, 1) and "gate:" in gated.output


def test_adaptive_sampling_spends_less_and_replays_to_the_same_result(tmp_path):
    config = _config(tmp_path, tasks=ADAPTIVE_AIME, baseline=LIVE_BASELINE, gate={"margin": 0.1})
    with _servers(config, {"accuracy": 0.7}, {"accuracy": 0.7}) as (cand, base):
        result, run_dir = _run(config)
        assert result.exit_code == 0, result.output
        sent = len(cand.requests)
        resumed, _ = _run(config, "--resume", str(run_dir))
        assert resumed.exit_code == 0 and len(cand.requests) == sent  # nothing more is wanted
        again, second_dir = _run(config)
    assert 60 <= sent < 30 * 8 and len(base.requests) == 2 * sent  # two full runs of the baseline
    first = json.loads((run_dir / "comparison.json").read_text())
    second = json.loads((second_dir / "comparison.json").read_text())
    assert first["tasks"] == second["tasks"]  # deterministic seeds: a repeated run gives the same result
    aime = first["tasks"]["aime24"]
    sequential = aime["sequential"]  # the group-sequential design stopped before max_samples
    assert sequential["stopped_at"] < 8 and sequential["looks_taken"][-1]["verdict"] == aime["verdict"] == "pass"
    assert aime["p_value"] == sequential["adjusted"]["p_value"] <= 0.05
    gated = run_cli("gate", str(run_dir))
    assert gated.exit_code == 0 and f"{100 * aime['delta']:+.1f}" in gated.output


def test_an_adaptive_run_cut_after_its_first_stage_resumes_to_the_uninterrupted_result(tmp_path):
    config = _config(tmp_path, tasks=ADAPTIVE_AIME, baseline=LIVE_BASELINE, gate={"margin": 0.05})
    with _servers(config, {"accuracy": 0.6}, {"accuracy": 0.7}) as (cand, _):
        result, run_dir = _run(config)
        full = len(cand.requests)
        # simulate a crash after the first stage: keep only samples 0 and 1 in both journals
        for side in ("candidate", "baseline"):
            journal = run_dir / side / "journal.jsonl"
            kept = [line for line in journal.read_text().splitlines() if json.loads(line)["sample_index"] < 2]
            journal.write_text("\n".join(kept) + "\n")
        expected = json.loads((run_dir / "comparison.json").read_text())
        resumed, _ = _run(config, "--resume", str(run_dir))
    assert resumed.exit_code == result.exit_code, resumed.output
    assert full > 60 and len(cand.requests) == 2 * full - 60  # only the later stages were sent again
    assert json.loads((run_dir / "comparison.json").read_text())["tasks"] == expected["tasks"]


def test_gate_refuses_tasks_the_baseline_lacks_and_records_command_line_overrides(tmp_path):
    fp8 = _config(tmp_path, tasks=TASKS[:1], name="fp8.yaml")  # the stored baseline has aime24 only
    with _servers(fp8, {"accuracy": 0.75}):
        result, fp8_run = _run(fp8)
    registry = tmp_path / "baselines"
    assert run_cli("baseline", "save", str(fp8_run), "--name", "aime-only", "--registry-dir",
                   str(registry)).exit_code == 0
    config = _config(tmp_path, gate={"margin": 0.3})  # aime24 and gpqa_diamond, no baseline of its own
    config_data = yaml.safe_load(config.read_text())
    config_data.pop("gate")
    config.write_text(yaml.safe_dump(config_data))
    with _servers(config, {"accuracy": 0.75}):
        result, run_dir = _run(config)
    assert result.exit_code == 0, result.output
    against = ("--baseline", "aime-only", "--registry-dir", str(registry))
    refused = run_cli("gate", str(run_dir), *against)
    assert refused.exit_code == 2 and "gpqa_diamond" in refused.output and "--allow-missing-tasks" in refused.output
    document_path, junit, report = tmp_path / "gate.json", tmp_path / "gate.xml", tmp_path / "gate.md"
    allowed = run_cli("gate", str(run_dir), *against, "--allow-missing-tasks", "--margin", "0.2",
                      "--json", str(document_path), "--junit", str(junit), "--report", str(report))
    assert allowed.exit_code == 0, allowed.output
    assert "gpqa_diamond: NOT COMPARED" in allowed.output and "override from the command line: margin" in allowed.output
    document = json.loads(document_path.read_text())
    assert set(document["tasks"]) == {"aime24"} and "gpqa_diamond" in document["missing_tasks"]
    assert document["overrides"] == [{"setting": "margin", "command_line": 0.2, "recorded": 0.05,
                                      "recorded_from": "defaults (the run has no gate section)", "tasks": ["aime24"]}]
    assert document["operating_characteristics"]["tasks"]["aime24"]["margin"] == 0.2  # simulated as applied
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.find("properties/property").get("name") == "override.margin"
    assert suite.get("skipped") == "1"  # gpqa_diamond, not compared
    assert "override from the command line" in report.read_text()
    same = run_cli("gate", str(run_dir), *against, "--allow-missing-tasks", "--margin", "0.05", "--json",
                   str(document_path))
    assert same.exit_code in (0, 1) and "overrides" not in json.loads(document_path.read_text())


def test_plan_uses_the_stored_baseline_variance_and_leaderboard_lists_runs(tmp_path):
    registry = _fp8_baseline(tmp_path)
    config = _config(tmp_path, baseline={"registry": "r1-fp8", "registry_dir": str(registry)},
                     gate={"margin": 0.1})
    planned = run_cli("plan", str(config))
    assert planned.exit_code == 0, planned.output
    assert "registry:r1-fp8" in planned.output and "within" in planned.output
    assert "aime24" in planned.output and "gpqa_diamond" in planned.output
    assert "P(exit 0 | candidate identical to the baseline)" in planned.output
    assert "beta-binomial" in planned.output  # the simulated rates come from the stored per-question outcomes
    as_json = run_cli("plan", str(config), "--json", "--sims", "50")
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.stdout)  # one JSON object and nothing else
    oc = document["operating_characteristics"]
    assert 0.0 <= oc["p_exit0_identical"] <= 1.0
    for figures in oc["tasks"].values():
        assert set(figures["p_pass_at_margin"]) == {"proportional", "logit", "broken_subset"}
        assert set(figures["p_fail_at_margin_plus"]) >= {"points", "p"}
    assert document["budget"]["per_side"]["requests"] == 30 * 4 + 40 * 2
    assert document["budget"]["sides"] == "candidate only (stored baseline)"
    worst = run_cli("plan", str(_config(tmp_path, name="alone.yaml", output_dir=str(tmp_path / "none"))))
    assert worst.exit_code == 0 and "worst case" in worst.output

    board = run_cli("leaderboard", str(tmp_path))
    assert board.exit_code == 0, board.output
    text = (tmp_path / "leaderboard.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 2 and rows[1].startswith("| baseline:r1-fp8 |")  # the fp8 run and its registry entry
    assert "<svg" in (tmp_path / "leaderboard.html").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"gate": {"margin": 0.1}}, "gate: needs a baseline"),
        ({"baseline": {"registry": "nope", "registry_dir": "/nonexistent"}}, "baseline 'nope' not found"),
        ({"baseline": {"label": "x", "model": "m"}}, "baseline.endpoint: Value error, give base_url"),
        ({"baseline": LIVE_BASELINE, "gate": {"tasks": {"mmlu": {"margin": 0.1}}}}, "gate.tasks: ['mmlu']"),
    ],
)
def test_config_errors_exit_2_naming_the_field(tmp_path, extra, message):
    result, _ = _run(_config(tmp_path, **extra))
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "runs").exists()


def test_run_adds_itself_to_a_leaderboard_folder_that_holds_no_runs(tmp_path):
    board = tmp_path / "board"  # missing: created; the run lives elsewhere and is listed all the same
    config = _config(tmp_path, tasks=TASKS[:1], leaderboard=str(board), output_dir=str(tmp_path / "runs"))
    with _servers(config, {"accuracy": 0.7}):
        result, run_dir = _run(config)
    assert result.exit_code == 0, result.output
    rows = [line for line in (board / "leaderboard.md").read_text().splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 1 and rows[0].startswith(f"| {run_dir.name} |")


def test_dry_run_states_the_gate_operating_characteristics_and_budget(tmp_path):
    config = _config(tmp_path, baseline=LIVE_BASELINE, gate={"margin": 0.2})
    result = run_cli("run", str(config), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "P(exit 0 | candidate identical to the baseline)" in result.output
    assert "budget: 200 requests per side (candidate and baseline)" in result.output
    assert not (tmp_path / "runs").exists()
