"""The `divergence` task end to end against two fake OpenAI servers over loopback (text prompts, echo + top-k
logprobs), the registry source of generations, `evalpipe gate` on a stored run, the leaderboard columns, and
which positions of an echo response are scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evalpipe.divergence import KL_APPROXIMATION
from evalpipe.divergence_probe import Generation, ProbeItem, build_item, scored_positions
from test_paired_run import LIVE_BASELINE, _config, _run, _servers
from orch_helpers import needs_shared_data, run_cli

TASKS = [{"task": "math500", "samples": 1, "max_tokens": 256, "limit": 12},
         {"task": "gpqa_diamond", "samples": 1, "max_tokens": 256, "limit": 6}]
PROBE = {"task": "divergence", "limit": 10, "max_tokens": 64, "bootstrap": 200}


def probe_run(tmp_path: Path, candidate_noise: float, gate: dict, probe: dict = PROBE, tasks=TASKS, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = _config(tmp_path, tasks=[*tasks, probe], baseline=LIVE_BASELINE,
                     gate={"margin": 0.5, "on_inconclusive": "pass", **gate}, **extra)
    with _servers(config, {"accuracy": 0.7, "logprob_noise": candidate_noise}, {"accuracy": 0.7}) as (cand, base):
        result, run_dir = _run(config)
    return result, run_dir, cand, base


@needs_shared_data
def test_a_diverging_candidate_fails_the_gate_on_the_probe(tmp_path: Path) -> None:
    result, run_dir, cand, base = probe_run(tmp_path, 1.5, {"max_kld": 0.01, "min_top1_agreement": 0.9})
    assert result.exit_code == 1, result.output
    comparison = json.loads((run_dir / "comparison.json").read_text())
    section = comparison["divergence"]
    stats = section["statistics"]
    assert section["verdict"] == "fail" and comparison["verdict"] == "fail"
    assert stats["n_sequences"] == 10 and stats["mean_kld"]["value"] > 0.01
    assert stats["top1_agreement"]["value"] < 1.0
    for name in ("mean_kld", "p99_kld", "top1_agreement", "mean_abs_logprob_change"):
        lo, hi = stats[name]["ci95"]
        assert lo <= stats[name]["value"] <= hi
    assert section["approximation"] == KL_APPROXIMATION and section["prompt_format"] == "plain text"
    assert comparison["gate"]["tasks"]["divergence"]["status"] == "fail"
    assert comparison["gate"]["tasks"]["math500"]["status"] == "pass"
    # the probe's requests: echo, top-k logprobs, one token, on both servers, math500 answers before gpqa's
    echoed = [r for r in cand.requests if r.get("endpoint") == "completions"]
    assert len(echoed) == 10 and len([r for r in base.requests if r.get("endpoint") == "completions"]) == 10
    rows = [json.loads(line) for line in (run_dir / "divergence" / "scores.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows[:4]] == ["math500", "gpqa_diamond"] * 2
    assert all(len(r["kld"]) == len(r["top1_agree"]) == len(r["logprob_delta"]) > 0 for r in rows)
    assert all(len(r["kld"]) <= 64 for r in rows)
    report = (run_dir / "report.md").read_text()
    assert "### Divergence probe (teacher-forced)" in report and "mean KLD" in report
    assert "divergence: FAIL" in result.stdout

    # `evalpipe gate` on the stored run reaches the same decision from divergence/scores.jsonl
    junit = tmp_path / "gate.xml"
    gated = run_cli("gate", str(run_dir), "--junit", str(junit))
    assert gated.exit_code == 1 and "divergence: FAIL" in gated.stdout
    assert '<testcase classname="evalpipe.gate" name="divergence">' in junit.read_text()
    assert "over the limit: mean KLD" in junit.read_text()


@needs_shared_data
def test_a_b_within_limits_and_a_a_pass(tmp_path: Path) -> None:
    result, run_dir, _, _ = probe_run(tmp_path / "ab", 0.05, {"max_kld": 0.5, "min_top1_agreement": 0.5})
    assert result.exit_code == 0, result.output
    ab = json.loads((run_dir / "comparison.json").read_text())["divergence"]
    assert ab["verdict"] == "pass" and 0 < ab["statistics"]["mean_kld"]["value"] < 0.5

    result, run_dir, _, _ = probe_run(tmp_path / "aa", 0.0, {"max_kld": 0.001, "min_top1_agreement": 0.999})
    assert result.exit_code == 0, result.output
    aa = json.loads((run_dir / "comparison.json").read_text())["divergence"]["statistics"]
    assert aa["mean_kld"]["value"] == 0.0 and aa["mean_kld"]["ci95"] == [0.0, 0.0]
    assert aa["top1_agreement"]["value"] == 1.0 and aa["mean_abs_logprob_change"]["value"] == 0.0


@needs_shared_data
def test_generations_from_a_registry_entry(tmp_path: Path) -> None:
    """`baseline save` stores the answers (no prompts, no GPQA); a later probe rebuilds the prompts and scores
    those answers without generating anything."""
    result, run_dir, _, _ = probe_run(tmp_path / "first", 0.0, {})
    assert result.exit_code == 0, result.output
    registry = tmp_path / "baselines"
    saved = run_cli("baseline", "save", str(run_dir), "--name", "fake-fp8", "--side", "baseline",
                    "--registry-dir", str(registry))
    assert saved.exit_code == 0, saved.output
    rows = [json.loads(line) for line in (registry / "fake-fp8" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {r["task"] for r in rows} == {"math500"}  # GPQA answers are never stored
    assert all("prompt" not in r and r["prompt_hash"] for r in rows)

    probe = {**PROBE, "from_registry": "fake-fp8", "registry_dir": str(registry), "limit": 5}
    tasks = [{"task": "math500", "samples": 1, "max_tokens": 256, "limit": 2}]
    result, run_dir, cand, _ = probe_run(tmp_path / "second", 0.5, {"max_kld": 100.0}, probe=probe, tasks=tasks)
    assert result.exit_code == 0, result.output
    section = json.loads((run_dir / "comparison.json").read_text())["divergence"]
    assert section["source"] == "registry:fake-fp8" and section["statistics"]["n_sequences"] == 5
    assert len([r for r in cand.requests if r.get("endpoint") == "completions"]) == 5


@needs_shared_data
def test_leaderboard_shows_the_probe(tmp_path: Path) -> None:
    result, _, _, _ = probe_run(tmp_path, 0.3, {"max_kld": 5.0}, leaderboard=str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    board = (tmp_path / "runs" / "leaderboard.md").read_text()
    assert "divergence KLD [95% CI] (verdict)" in board and "(pass)" in board
    assert "top-1 agree %" in (tmp_path / "runs" / "leaderboard.html").read_text()


@pytest.mark.parametrize("entry, message", [
    ({"task": "divergence", "limit": 0}, "tasks.1.limit"),
    ({"task": "divergence", "top_logprobs": 50}, "tasks.1.top_logprobs"),
    ({"task": "divergence", "tasks": ["aime24"]}, "tasks.1.tasks: ['aime24'] are not accuracy tasks"),
])
def test_probe_config_errors(tmp_path: Path, entry: dict, message: str) -> None:
    config = _config(tmp_path, tasks=[TASKS[0], entry], baseline=LIVE_BASELINE)
    result = run_cli("run", str(config), "--dry-run")
    assert result.exit_code == 2 and message in result.stderr


def test_probe_needs_a_live_baseline_and_gate_keys_need_the_probe(tmp_path: Path) -> None:
    config = _config(tmp_path, tasks=[TASKS[0], PROBE], baseline={"registry": "x"})
    result = run_cli("run", str(config), "--dry-run")
    assert result.exit_code == 2 and "the baseline must be a live endpoint" in result.stderr
    config = _config(tmp_path, tasks=[TASKS[0]], baseline=LIVE_BASELINE, gate={"max_kld": 0.1})
    result = run_cli("run", str(config), "--dry-run")
    assert result.exit_code == 2 and "['max_kld'] apply to the divergence task" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Which positions are scored


def echo_body(tokens: list[str], prompt_tokens: int | None = None) -> dict:
    return {"choices": [{"logprobs": {"tokens": tokens, "token_logprobs": [None] + [-1.0] * (len(tokens) - 1),
                                      "top_logprobs": [None] + [{t: -1.0} for t in tokens[1:]]}}],
            "usage": {"prompt_tokens": prompt_tokens}}


GENERATION = Generation("math500", "q", 0, ({"role": "user", "content": "What is 1+1?"},), " It is 2.")


def test_token_id_prompts_score_exactly_the_generated_tokens(tokenizer) -> None:
    item = build_item(GENERATION, tokenizer, max_tokens=3)
    generated = tokenizer.encode(" It is 2.", add_special_tokens=False)[:3]
    assert item.prompt[item.scored_from:] == generated
    tokens = [f"t{i}" for i in range(len(item.prompt))] + ["<next>"]  # the echo plus one generated token
    scored = scored_positions(echo_body(tokens), item, max_tokens=3)
    assert [p.token for p in scored] == tokens[item.scored_from:len(item.prompt)]


def test_text_prompts_find_the_answer_after_a_leading_special_token() -> None:
    item = build_item(GENERATION, None, max_tokens=10)
    assert item.prompt == "What is 1+1?\n\n It is 2." and item.scored_from == len("What is 1+1?\n\n")
    tokens = ["<s>", "What", " is", " 1", "+", "1", "?", "\n\n", " It", " is", " 2", ".", "<gen>"]
    scored = scored_positions(echo_body(tokens, prompt_tokens=12), item, max_tokens=10)
    assert [p.token for p in scored] == [" It", " is", " 2", "."]
    assert [p.token for p in scored_positions(echo_body(tokens, 12), ProbeItem(GENERATION, item.prompt,
                                                                               item.scored_from), 2)] == [" It", " is"]


@needs_shared_data
def test_calibrated_null_sets_the_limit_and_is_shown_against_the_candidate(tmp_path: Path) -> None:
    registry = tmp_path / "baselines"
    # the A/A run: the same model on both sides, scored with a small drift (another batch composition)
    _, aa_dir, _, _ = probe_run(tmp_path / "aa", 0.02, {})
    assert run_cli("baseline", "save", str(aa_dir), "--name", "fake-fp8", "--side", "baseline",
                   "--registry-dir", str(registry)).exit_code == 0
    stored = run_cli("baseline", "calibrate-divergence", str(aa_dir), "--name", "fake-fp8", "--tolerance", "0.05",
                     "--registry-dir", str(registry))
    assert stored.exit_code == 0, stored.output
    null = json.loads((registry / "fake-fp8" / "divergence_null.json").read_text())
    assert len(null["per_answer_kld"]) == 10 and null["answers"] == 10 and null["tolerance"] == 0.05
    assert null["max_kld"] == pytest.approx(null["null_kld"] + 0.05) and null["null_kld"] > 0.0
    again = run_cli("baseline", "calibrate-divergence", str(aa_dir), "--name", "fake-fp8", "--tolerance", "0.05",
                    "--registry-dir", str(registry))
    assert again.exit_code == 2 and "--force" in again.output

    # a diverging candidate, gated on the limit its null implies (no max_kld in the config)
    probe = {**PROBE, "null": "fake-fp8", "registry_dir": str(registry)}
    result, run_dir, _, _ = probe_run(tmp_path / "ab", 1.5, {}, probe=probe)
    assert result.exit_code == 1, result.output
    section = json.loads((run_dir / "comparison.json").read_text())["divergence"]
    limit = yaml.safe_load((run_dir / "config.yaml").read_text())["gate"]["tasks"]["divergence"]["max_kld"]
    assert section["max_kld"] == limit == pytest.approx(null["max_kld"], rel=1e-4)
    assert section["null"]["candidate"]["share_of_null_at_or_above"] == 0.0 and section["verdict"] == "fail"
    assert "null (baseline vs itself, 1 A/A runs, 10 answers)" in (run_dir / "report.md").read_text()


@needs_shared_data
def test_calibration_refuses_what_is_not_an_a_a_run_and_a_missing_null(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "divergence").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"candidate": {"quantization": "w4afp8"},
                                                         "baseline": {"quantization": "fp8"}}))
    (run_dir / "divergence" / "summary.json").write_text(json.dumps({
        "source": "b", "tokenizer": None, "prompt_format": "plain text", "top_k": 20, "limit": 2, "max_tokens": 8,
        "bootstrap": 100, "seed": 0}))
    (run_dir / "divergence" / "scores.jsonl").write_text(json.dumps(
        {"task": "t", "question_id": "q", "sample_index": 0, "kld": [0.1], "top1_agree": [1], "logprob_delta": [0]}))
    refused = run_cli("baseline", "calibrate-divergence", str(run_dir), "--name", "x", "--tolerance", "0.1",
                      "--registry-dir", str(tmp_path))
    assert refused.exit_code == 2 and "not an A/A run" in refused.output and "quantization" in refused.output
    config = _config(tmp_path, tasks=[TASKS[0], {**PROBE, "null": "none", "registry_dir": str(tmp_path)}],
                     baseline=LIVE_BASELINE, gate={"margin": 0.5})
    missing = run_cli("run", str(config), "--no-progress")
    assert missing.exit_code == 2 and "baseline 'none' has no divergence null" in missing.output
