"""The files a run leaves behind: where each lies, its typed shape, and the one way to read and write it.

A run directory:

    <run_dir>/config.yaml                  the config as run (defaults filled in, secrets removed, card hashes)
    <run_dir>/report.md                    the human-readable report
    <run_dir>/crosscheck.json              `evalpipe crosscheck`: other harnesses' graders on the same answers
    <run_dir>/comparison.json              a run with a baseline: the comparison, the gate's decision
    <run_dir>/<side>/journal.jsonl         side = candidate | baseline: one SampleRecord per finished sample
    <run_dir>/<side>/summary.json          the side's per-task results (the contract other tools read)
    <run_dir>/<side>/details.json          outcome counts, extraction rules, pass@k, breakdowns, the endpoint
    <run_dir>/divergence/scores.jsonl      the divergence probe: per generation, per-position scores
    <run_dir>/divergence/summary.json      the probe's statistics
    <run_dir>/servers/<side>.log           servers launched by the run
    <run_dir>/export/                      `evalpipe export`: the run's tables as csv or parquet

A baseline registry entry: `<registry_dir>/<NAME>/baseline.json`, with `generations.jsonl` and
`divergence_null.json` beside it.

Every JSON file written here starts with `schema_version`. A file without one was written before the field
existed and has the shape of version 1; a file of another version, or one whose fields do not fit (an older or a
foreign file), is refused with a message naming the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from evalpipe.errors import UserError
from evalpipe.validation import format_validation_error

SCHEMA_VERSION = 1

CANDIDATE = "candidate"
BASELINE = "baseline"
SIDES = (CANDIDATE, BASELINE)

RESOLVED_CONFIG = "config.yaml"
REPORT = "report.md"
CROSSCHECK = "crosscheck.json"  # `evalpipe crosscheck`: agreement with other harnesses' graders
COMPARISON = "comparison.json"
JOURNAL = "journal.jsonl"
SUMMARY = "summary.json"
DETAILS = "details.json"
DIVERGENCE_DIR = "divergence"
DIVERGENCE_SCORES = "scores.jsonl"
EXPORT_DIR = "export"  # `evalpipe export` writes its tables here unless told otherwise
SERVER_LOGS = "servers"  # <run_dir>/servers/<side>.log (evalpipe.launch)

REGISTRY_FILE = "baseline.json"
# The answers (no prompts) of the stored side, for the divergence probe (evalpipe.divergence_probe).
GENERATIONS_FILE = "generations.jsonl"
# The divergence probe's null measured for the stored baseline (`evalpipe baseline calibrate-divergence`).
DIVERGENCE_NULL_FILE = "divergence_null.json"


def side_dir(run_dir: Path, side: str) -> Path:
    return run_dir / side


def journal_path(run_dir: Path, side: str) -> Path:
    return run_dir / side / JOURNAL


def summary_path(run_dir: Path, side: str) -> Path:
    return run_dir / side / SUMMARY


def details_path(run_dir: Path, side: str) -> Path:
    return run_dir / side / DETAILS


def divergence_summary_path(run_dir: Path) -> Path:
    return run_dir / DIVERGENCE_DIR / SUMMARY


def divergence_scores_path(run_dir: Path) -> Path:
    return run_dir / DIVERGENCE_DIR / DIVERGENCE_SCORES


# ---------------------------------------------------------------------------------------------------------
# Shapes (field order is the order written)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """A section whose keys vary with what the run measured; read and written as is."""

    model_config = ConfigDict(extra="allow")


class TokenStats(_File):
    mean: float | None
    p50: float | None
    p99: float | None


class TaskSummary(_File):
    """One task of a side's summary.json."""

    card_hash: str
    n_questions: int
    samples: int
    accuracy: float | None
    stderr: float | None
    ci95: list[float] | None
    cons_at_k: float | None
    pass_at_k: float | None
    truncation_rate: float | None
    no_answer_rate: float | None
    error_rate: float | None
    completion_tokens: TokenStats
    acc_norm: float | None = None  # log-likelihood cards only


class SideSummary(_File):
    """<side>/summary.json."""

    schema_version: int = SCHEMA_VERSION
    run_id: str | None
    config_name: str | None
    label: str | None
    tasks: dict[str, TaskSummary | None]


class TaskDetails(_Open):
    n_samples: int
    n_planned: int
    outcomes: dict[str, int]
    rules: dict[str, int]
    pass_at: dict[str, float | None]
    reasoning_tokens: TokenStats
    latency_s: TokenStats
    retried_samples: int
    breakdown: dict[str, dict[str, dict[str, Any]]]


class SideDetails(_File):
    """<side>/details.json."""

    schema_version: int = SCHEMA_VERSION
    run_id: str | None
    label: str | None
    endpoint: dict[str, Any] | None = None
    tasks: dict[str, TaskDetails]


class SideStatsEntry(_File):
    accuracy: float | None
    stderr: float | None
    truncation_rate: float
    error_rate: float
    n_questions: int
    samples: float


class Flipped(_File):
    baseline_only: list[str]  # solved by the baseline only, largest loss first
    candidate_only: list[str]  # solved by the candidate only, largest gain first


class TaskComparisonEntry(_File):
    """One task of comparison.json."""

    candidate: SideStatsEntry
    baseline: SideStatsEntry
    delta: float | None
    stderr: float | None
    ci95: list[float | None]
    lower: float | None
    upper: float | None
    p_value: float
    margin: float
    alpha: float
    n_questions: int
    verdict: Literal["pass", "fail", "inconclusive"]
    flipped: Flipped
    both_completed: dict[str, Any]
    unpaired_questions: dict[str, int]
    sequential: dict[str, Any] | None = None  # adaptive tasks only
    truncation_increase: dict[str, Any] | None = None  # absent from files written before the truncation test


class SideReference(_File):
    label: str | None
    source: str
    run_id: str | None


class ComparisonFile(_File):
    """comparison.json (also what `evalpipe compare --json` and `evalpipe gate --json` write)."""

    schema_version: int = SCHEMA_VERSION
    verdict: Literal["pass", "fail", "inconclusive"]
    tasks: dict[str, TaskComparisonEntry]
    candidate: SideReference
    baseline: SideReference
    forced_differences: list[str] | None = None
    missing_tasks: dict[str, str] | None = None
    overrides: list[dict[str, Any]] | None = None
    divergence: _Open | None = None
    gate: _Open | None = None
    operating_characteristics: _Open | None = None


class DivergenceSummaryFile(_Open):
    """divergence/summary.json: the probe's settings and statistics (the comparison's `divergence` section
    before the verdict)."""

    schema_version: int = SCHEMA_VERSION
    source: str
    tokenizer: str | None
    prompt_format: str
    top_k: int
    limit: int
    max_tokens: int
    bootstrap: int
    seed: int


class RegistrySource(_File):
    run_dir: str
    run_id: str | None
    side: str
    config_name: str | None


class RegistryTask(_File):
    card_hash: str
    sampling: dict[str, Any]
    seed: int | None
    summary: TaskSummary | None
    questions: dict[str, str]  # question id -> one outcome code per sample (evalpipe.outcomes)


class RegistryEntry(_File):
    """<registry_dir>/<NAME>/baseline.json."""

    schema_version: int = SCHEMA_VERSION
    format: int
    name: str
    saved_at: str
    evalpipe_version: str
    label: str | None
    endpoint: dict[str, Any]
    source: RegistrySource
    tasks: dict[str, RegistryTask]


# ---------------------------------------------------------------------------------------------------------
# Reading and writing

FileModel = TypeVar("FileModel", bound=BaseModel)


def write_json(path: Path, payload: Any) -> None:
    """Write atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def file_payload(model: BaseModel) -> dict[str, Any]:
    """A model as its file holds it: schema_version first, optional sections only where they were given."""
    body = model.model_dump(exclude_unset=True, exclude={"schema_version"})
    return {"schema_version": SCHEMA_VERSION, **body}


def write_file(path: Path, model: BaseModel) -> None:
    write_json(path, file_payload(model))


def check_schema_version(path: Path, document: dict[str, Any]) -> None:
    version = document.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise UserError(f"{path}: schema_version: {version!r} is not a version this evalpipe reads "
                        f"({SCHEMA_VERSION}); the file was written by another version of evalpipe")


def parse_file(path: Path, document: Any, model: type[FileModel]) -> FileModel:
    """`document` (read from `path`) as `model`; UserError naming the file and the field when it does not fit."""
    if not isinstance(document, dict):
        raise UserError(f"{path}: not a {model.__name__} (a JSON object is expected, found {type(document).__name__})")
    check_schema_version(path, document)
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise UserError(f"{path}: {format_validation_error(exc)} (not a {model.__name__} as this evalpipe writes "
                        "it: an older or a foreign file?)") from None


def read_document(path: Path, missing: str) -> Any:
    """The JSON in `path`; `missing` says why it may be absent."""
    if not path.is_file():
        raise UserError(f"{path} not found: {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def read_file(path: Path, model: type[FileModel], missing: str = "no such file") -> FileModel:
    return parse_file(path, read_document(path, missing), model)


def read_summary(run_dir: Path, side: str = CANDIDATE) -> SideSummary:
    return read_file(summary_path(run_dir, side), SideSummary, "the run did not finish; complete it with --resume")


def read_details(run_dir: Path, side: str = CANDIDATE) -> SideDetails:
    return read_file(details_path(run_dir, side), SideDetails, "the run did not finish; complete it with --resume")


def read_comparison(run_dir: Path) -> ComparisonFile | None:
    """The run's comparison.json, None when the run has no baseline."""
    path = run_dir / COMPARISON
    return read_file(path, ComparisonFile) if path.is_file() else None


def read_resolved_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RESOLVED_CONFIG
    if not path.is_file():
        raise UserError(f"{run_dir} is not an evalpipe run directory (no {RESOLVED_CONFIG})")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def write_config_file(run_dir: Path, resolved: dict[str, Any]) -> None:
    """config.yaml: the config as run (evalpipe.runner.resolved_config)."""
    (run_dir / RESOLVED_CONFIG).write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True),
                                           encoding="utf-8")


def saved_run_id(run_dir: Path) -> str:
    return read_resolved_config(run_dir)["resolved"]["run_id"]
