"""Shared helpers of the interop tests: the harness environments, and a small run against the styled fake server."""

from __future__ import annotations

from pathlib import Path

import pytest

from evalpipe.errors import UserError
from evalpipe.interop.harnesses import harness_python
from evalpipe.runner import plan_from_config
from evalpipe.testing.answer_styles import StyledServer, known_questions
from orch_helpers import run_cli, write_config


def harness_available(name: str) -> bool:
    try:
        harness_python(name)
    except UserError:
        return False
    return True


def needs_harness(name: str) -> pytest.MarkDecorator:
    extra = {"evalscope": "evalscope", "lm-eval": "lmeval"}[name]
    return pytest.mark.skipif(
        not harness_available(name),
        reason=f"{name} environment absent: run scripts/setup_extra.sh {extra} (scripts/test.sh does)",
    )


SMALL_RUN = [
    {"task": "aime24", "samples": 2, "max_tokens": 2048, "limit": 10},
    {"task": "math500", "samples": 1, "max_tokens": 2048, "limit": 30},
    {"task": "gpqa_diamond", "samples": 1, "max_tokens": 2048, "limit": 20},
    {"task": "mmlu", "samples": 1, "max_tokens": 2048, "limit": 40},
]


# Truncated answers are rare in the default mix; the tests want a few of each kind.
TEST_WEIGHTS = {"truncated_after_box": 15, "truncated_after_marker": 15}


def styled_run(tmp_path: Path, tasks: list[dict] = SMALL_RUN, accuracy: float = 0.8) -> Path:
    """A finished `evalpipe run` against the styled fake server; returns its run directory."""
    config = write_config(tmp_path / "run.yaml", "http://127.0.0.1:1/v1", tasks,
                          preflight={"max_truncation_rate": None})
    _, plans = plan_from_config(config)
    with StyledServer(known_questions(plans), {"accuracy": accuracy}, TEST_WEIGHTS) as server:
        config.write_text(config.read_text().replace("http://127.0.0.1:1/v1", server.base_url))
        result = run_cli("run", str(config), "--no-progress")
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1])
