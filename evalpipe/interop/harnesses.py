"""External harnesses (EvalScope, lm-eval): which of their tasks match our cards, where their environments are, and
running their own grader on our responses in that environment.

Neither harness is ever imported here: each lives in its own environment (the optional extras `evalpipe[evalscope]`
and `evalpipe[lmeval]` conflict with each other), made by `scripts/setup_extra.sh <extra>`, and grading runs
harness_grader.py with that environment's python, talking JSON lines over pipes (so no benchmark text, GPQA
included, is written to disk on the way).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from evalpipe.errors import UserError

log = logging.getLogger(__name__)

HarnessName = Literal["evalscope", "lm-eval"]
HARNESS_NAMES: tuple[HarnessName, ...] = ("evalscope", "lm-eval")
GRADER_SCRIPT = Path(__file__).with_name("harness_grader.py")
MISSING_HARNESS_EXIT = 3  # harness_grader.py's exit code when the harness is not importable


class HarnessError(UserError):
    """The external harness failed while grading (its environment is broken or it crashed): exit code 4."""

    exit_code = 4


class HarnessTask(BaseModel):
    """How one of our tasks maps to a task of the harness (fields described in harnesses.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    id: str | None = None
    gold: Literal["integer"] | None = None
    config: str | None = None
    doc: str | None = None
    docs_processed: bool = False
    filter: str | None = None
    metric: str | None = None
    extractor: str | None = None


class Harness(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    package: str
    extra: str
    tasks: dict[str, HarnessTask]

    @property
    def python_env_var(self) -> str:
        return f"EVALPIPE_{self.extra.upper()}_PYTHON"


@functools.cache
def harnesses() -> dict[str, Harness]:
    raw = yaml.safe_load(Path(__file__).with_name("harnesses.yaml").read_text(encoding="utf-8"))
    return {name: Harness.model_validate(raw[name]) for name in HARNESS_NAMES}


def missing_extra_message(name: str) -> str:
    harness = harnesses()[name]
    return (
        f"the {name} grader needs {harness.package} in its own environment (it cannot share one with the other "
        f"harness). Create it with `bash scripts/setup_extra.sh {harness.extra}` (installs evalpipe[{harness.extra}] "
        f"on top of this environment, in {sys.prefix}-{harness.extra}), or set {harness.python_env_var} to a python "
        f"that has it"
    )


def harness_python(name: str) -> Path:
    """The interpreter of the harness's environment: ${EVALPIPE_<EXTRA>_PYTHON}, else the one scripts/setup_extra.sh
    makes next to this environment (<this venv>-<extra>, e.g. .venv-lmeval)."""
    harness = harnesses()[name]
    configured = os.environ.get(harness.python_env_var)
    python = Path(configured) if configured else Path(f"{sys.prefix}-{harness.extra}") / "bin" / "python"
    if not python.is_file():
        raise UserError(missing_extra_message(name))
    return python


def run_harness_grader(name: str, tasks: Sequence[str], items: Sequence[dict[str, Any]]) -> tuple[str, list[dict]]:
    """(harness version, one verdict per item in order) from harness_grader.py in the harness's environment."""
    harness = harnesses()[name]
    python = harness_python(name)
    header = {"tasks": {t: harness.tasks[t].model_dump(exclude_none=True) for t in tasks}}
    payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in [header, *items])
    # Scoring reads nothing from the hub: fail fast rather than wait on network timeouts.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log.info("grading %d samples with %s (%s)", len(items), name, python)
    proc = subprocess.run([str(python), "-I", str(GRADER_SCRIPT), name], input=payload, capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode == MISSING_HARNESS_EXIT:
        raise UserError(f"{proc.stderr.strip().splitlines()[-1]}; {missing_extra_message(name)}")
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
        raise HarnessError(f"the {name} grader ({python}) failed with exit code {proc.returncode}: {tail}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if not rows or len(rows) != len(items) + 1:
        raise HarnessError(f"the {name} grader returned {max(len(rows) - 1, 0)} verdicts for {len(items)} samples")
    return rows[0]["version"], rows[1:]
