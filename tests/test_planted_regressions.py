"""The quickstart pipeline (configs/quickstart.yaml, shrunk to CI size) with real servers of our runtime on the
demo model: the clean W4AFP8 candidate passes, a candidate with a planted fault fails on the divergence probe
(at this size, 4 MMLU questions, accuracy cannot tell; the full quickstart's 96 short ones fail it by accuracy too), and the
baseline against itself (A/A) passes with zero divergence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orch_helpers import REPO, needs_shared_data, run_cli

pytestmark = [needs_shared_data, pytest.mark.slow]

FAULT = "clip_act_scale:29:64"  # the last layer's FP8 activation scales 64x too small: activations saturate


def shrunk_quickstart(tmp_path: Path, name: str, variant: str = "w4afp8", fault: str = "") -> Path:
    """configs/quickstart.yaml with CI-sized subsets: two tasks, a few questions, short answers."""
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config.update(name=name, output_dir=str(tmp_path / "runs"), leaderboard=str(tmp_path / "runs"),
                  data_dir=str(REPO.parent / "shared" / "datasets"))
    config["candidate"]["launch"]["model"] = f"demo:{variant}"
    config["candidate"]["launch"]["env"]["EVALPIPE_FAULT"] = fault
    config["tasks"] = [
        {"task": "mmlu", "samples": 1, "limit": 4, "max_tokens": 16},
        {"task": "math500", "samples": 1, "limit": 8, "max_tokens": 48},
        {"task": "divergence", "tasks": ["math500"], "limit": 8, "max_tokens": 48},
    ]
    names = {task["task"] for task in config["tasks"]}
    config["gate"]["tasks"] = {task: rule for task, rule in config["gate"].get("tasks", {}).items() if task in names}
    # 4 questions cannot show a candidate within the margin: the full quickstart's fail-closed MMLU rule would fail
    # every one, so at this size MMLU counts as pass when undecided and the probe decides
    config["gate"]["tasks"].pop("mmlu", None)
    config.pop("planning", None)  # its priors name the full quickstart's tasks
    config["preflight"] = {"enabled": False}  # no pilot batch: one decode pass less
    # 384 scored positions instead of the quickstart's 2,048 give wider intervals: gate between the clean build
    # (measured mean KLD 0.27, upper bound 0.54 on the CPU's oneDNN kernels; 0.29 and 0.46 before them: 8 short
    # answers, spread skewed) and the planted fault (0.99, lower bound 0.85; 0.97 and 0.85 before).
    config["gate"]["max_kld"] = 0.65
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path) -> tuple[int, dict, str]:
    result = run_cli("run", str(config), "--no-progress")
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    comparison = json.loads((run_dir / "comparison.json").read_text())
    divergence = comparison["divergence"]["statistics"]
    print(f"{config.stem}: exit {result.exit_code}, mean KLD {divergence['mean_kld']}, top-1 "
          f"{divergence['top1_agreement']}, positions {divergence['n_positions']}")
    return result.exit_code, comparison, result.output


def test_clean_candidate_passes(tmp_path: Path) -> None:
    code, comparison, output = run(shrunk_quickstart(tmp_path, "clean"))
    assert code == 0, output
    assert comparison["gate"]["tasks"]["divergence"]["status"] == "pass"
    kld = comparison["divergence"]["statistics"]["mean_kld"]["value"]
    assert 0.05 < kld < comparison["divergence"]["max_kld"]  # quantization moves the distribution, within limits
    assert (tmp_path / "runs" / "leaderboard.md").is_file()


def test_planted_fault_fails_on_the_divergence_probe(tmp_path: Path) -> None:
    code, comparison, output = run(shrunk_quickstart(tmp_path, "faulty", fault=FAULT))
    assert code == 1, output
    gate = comparison["gate"]["tasks"]
    assert gate["divergence"]["status"] == "fail" and comparison["divergence"]["verdict"] == "fail"
    assert all(gate[task]["status"] == "pass" for task in ("mmlu", "math500"))  # 4 questions cannot see it
    servers = Path(comparison["candidate"]["source"]).parent / "servers"
    assert "PLANTED FAULT" in (servers / "candidate.log").read_text()
    assert "PLANTED FAULT" not in (servers / "baseline.log").read_text()


def test_baseline_against_itself_passes_with_zero_divergence(tmp_path: Path) -> None:
    code, comparison, output = run(shrunk_quickstart(tmp_path, "a-a", variant="fp8"))
    assert code == 0, output
    stats = comparison["divergence"]["statistics"]
    assert stats["mean_kld"]["value"] == 0.0 and stats["top1_agreement"]["value"] == 1.0
    assert all(task["delta"] == 0.0 for task in comparison["tasks"].values())
