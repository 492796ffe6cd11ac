"""Shared helpers of the orchestrator tests: paths, config writing, in-process CLI runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from evalpipe.cli import app

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "datasets"
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "PROVENANCE.md").is_file(), reason=f"benchmark data not found at {SHARED_DATA}"
)


def write_config(path: Path, base_url: str | list[str], tasks: list[dict[str, Any]], **extra: Any) -> Path:
    config = {
        "name": "t",
        "output_dir": str(path.parent / "runs"),
        "data_dir": str(SHARED_DATA),
        "concurrency": 8,
        "candidate": {"label": "fake", "base_url": base_url, "model": "fake-model"},
        "tasks": tasks,
        "client": {"backoff_initial": 0.01, "backoff_max": 0.05, "max_retries": 2},
        **extra,
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)
