"""Stored results as comparable sides: one side of a run directory, or an entry of the baseline registry.

Registry layout: `<registry_dir>/<NAME>/baseline.json` (registry_dir defaults to results/baselines), written by
`evalpipe baseline save`. It holds, per task, the card hash, the sampling settings, the seed, the side's
summary.json entry (accuracy, rates, completion-token statistics) and per question one outcome code per sample
(c correct, w wrong, n no answer, t truncated, e error, . never issued), plus the endpoint's metadata. It holds
no prompts or responses, so a baseline built on GPQA stores nothing of the encrypted data.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalpipe.comparison import TaskResult
from evalpipe.config import DEFAULT_SPENDING, REGISTRY_NAME
from evalpipe.data import question_order_key
from evalpipe.divergence import DivergenceNull
from evalpipe.errors import UserError
from evalpipe.journal import latest_by_key, read_journal
from evalpipe.outcomes import SideOutcomes, outcome_codes
from evalpipe.records import SampleRecord
from evalpipe.run_files import (
    CANDIDATE,
    DIVERGENCE_NULL_FILE,
    GENERATIONS_FILE,
    REGISTRY_FILE,
    SCHEMA_VERSION,
    SIDES,
    RegistryEntry,
    SideSummary,
    check_schema_version,
    file_payload,
    journal_path,
    read_document,
    read_file,
    read_resolved_config,
    read_summary,
    write_file,
    write_json,
)
from evalpipe.version import __version__

log = logging.getLogger(__name__)

DEFAULT_REGISTRY_DIR = "results/baselines"
# GPQA's terms forbid putting its text where crawlers can read it, and answers quote the question, so its answers
# are not stored in generations.jsonl.
UNSTORED_TASKS = ("gpqa_diamond",)
REGISTRY_FORMAT = 1
# Sampling settings that must agree between compared sides (samples may differ: the comparison pairs means).
COMPARED_SAMPLING = ("temperature", "top_p", "max_tokens")
ENDPOINT_FIELDS = ("model", "base_url", "quantization", "engine")


@dataclass(frozen=True)
class StoredSide:
    source: str  # where it was read from, for messages and reports
    label: str
    run_id: str | None
    endpoint: dict[str, Any]  # model, base_url, quantization, engine (what is known)
    summary: dict[str, Any]  # summary.json shape
    tasks: dict[str, TaskResult]


def _compared_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    return {name: sampling.get(name) for name in COMPARED_SAMPLING}


@dataclass(frozen=True)
class _RunSide:
    saved: dict[str, Any]  # the resolved config
    spec: dict[str, Any]  # the side's config section
    records: list[SampleRecord]
    summary: dict[str, Any]


def _read_run_side(run_dir: Path, side: str) -> _RunSide:
    if side not in SIDES:
        raise UserError(f"side must be one of {SIDES}, got {side!r}")
    saved = read_resolved_config(run_dir)
    spec = saved.get(side) or {}
    if not spec:
        raise UserError(f"{run_dir} has no {side} side")
    journal = journal_path(run_dir, side)
    records = read_journal(journal)
    if not records:
        raise UserError(f"{journal}: no results (journal missing or empty)")
    return _RunSide(saved, spec, records, file_payload(read_summary(run_dir, side)))


def load_run_side(run_dir: Path, side: str = CANDIDATE) -> StoredSide:
    """One side of a run directory; a run's baseline side that came from the registry loads that entry."""
    saved = read_resolved_config(run_dir)
    spec = saved.get(side) or {}
    if side == "baseline" and "registry" in spec:
        return load_registry(spec["registry"], spec.get("registry_dir") or DEFAULT_REGISTRY_DIR)
    run = _read_run_side(run_dir, side)
    entries = {entry["task"]: entry for entry in saved.get("tasks", [])}
    tasks = {}
    for task, (ids, rows) in outcome_codes(run.records).items():
        info = saved.get("resolved", {}).get("tasks", {}).get(task)
        if info is None:
            continue
        entry = entries.get(task, {})
        adaptive = ((entry["min_samples"], entry["max_samples"], entry.get("spending") or DEFAULT_SPENDING)
                    if entry.get("samples") == "auto" else None)
        tasks[task] = TaskResult(info["card_hash"], _compared_sampling(info["sampling"]),
                                 SideOutcomes.from_codes(ids, rows), adaptive)
    return StoredSide(
        source=f"{run_dir}/{side}", label=run.spec.get("label") or side,
        run_id=saved.get("resolved", {}).get("run_id"), endpoint={k: run.spec.get(k) for k in ENDPOINT_FIELDS},
        summary=run.summary, tasks=tasks,
    )


def registry_path(name: str, registry_dir: str | Path = DEFAULT_REGISTRY_DIR) -> Path:
    if not re.match(REGISTRY_NAME, name):
        raise UserError(f"baseline name {name!r} must match {REGISTRY_NAME}")
    return Path(registry_dir) / name / REGISTRY_FILE


def registry_names(registry_dir: str | Path = DEFAULT_REGISTRY_DIR) -> list[str]:
    return sorted(p.parent.name for p in Path(registry_dir).glob(f"*/{REGISTRY_FILE}"))


def save_baseline(
    run_dir: Path, name: str, *, side: str = CANDIDATE, registry_dir: str | Path = DEFAULT_REGISTRY_DIR,
    force: bool = False,
) -> Path:
    """Store one side of a finished run under the registry; refuse to overwrite unless `force`."""
    path = registry_path(name, registry_dir)
    if path.exists() and not force:
        raise UserError(f"baseline {name!r} exists at {path}; pass --force to replace it")
    run = _read_run_side(run_dir, side)
    if "registry" in run.spec:
        raise UserError(f"{run_dir}: the {side} side already comes from the registry ({run.spec['registry']})")
    resolved = run.saved.get("resolved", {})
    adaptive = [e["task"] for e in run.saved.get("tasks", []) if e.get("samples") == "auto"]
    if adaptive:
        raise UserError(f"{run_dir}: {adaptive} were sampled adaptively (samples: auto), which leaves per-question "
                        "sample counts that depend on the other side; save a baseline from a run with fixed samples")
    codes = outcome_codes(run.records)
    tasks = {}
    for task, info in resolved.get("tasks", {}).items():
        if task not in codes:
            continue
        ids, rows = codes[task]
        tasks[task] = {
            "card_hash": info["card_hash"], "sampling": info["sampling"], "seed": info.get("seed"),
            "summary": run.summary.get("tasks", {}).get(task), "questions": dict(zip(ids, rows, strict=True)),
        }
    document = RegistryEntry(
        format=REGISTRY_FORMAT, name=name, saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        evalpipe_version=__version__, label=run.spec.get("label"),
        endpoint={k: run.spec.get(k) for k in ENDPOINT_FIELDS},
        source={"run_dir": str(run_dir), "run_id": resolved.get("run_id"), "side": side,
                "config_name": run.saved.get("name")},
        tasks=tasks,
    )
    write_file(path, document)
    rows = generation_rows(run.records)
    (path.parent / GENERATIONS_FILE).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                                               encoding="utf-8")
    return path


def generation_rows(records: list[SampleRecord]) -> list[dict[str, Any]]:
    """generations.jsonl: each answered sample's content and reasoning with its key and prompt_hash (no prompt),
    per task in (sample, question) order; GPQA left out."""
    latest = latest_by_key(records)
    rows = []
    for key in sorted(latest, key=lambda k: (latest[k].task, k[2], question_order_key(latest[k].task, k[1]))):
        r = latest[key]
        if r.task in UNSTORED_TASKS or r.outcome == "error" or not (r.content or r.reasoning):
            continue
        rows.append({"task": r.task, "question_id": r.question_id, "sample_index": r.sample_index,
                     "card_hash": r.card_hash, "prompt_hash": r.prompt_hash, "content": r.content,
                     "reasoning": r.reasoning, "finish_reason": r.finish_reason})
    return rows


def load_registry(name: str, registry_dir: str | Path = DEFAULT_REGISTRY_DIR) -> StoredSide:
    path = registry_path(name, registry_dir)
    if not path.is_file():
        known = registry_names(registry_dir)
        raise UserError(f"baseline {name!r} not found in {registry_dir} (stored: {known or 'none'}); "
                        "create it with `evalpipe baseline save RUN_DIR --name NAME`")
    document = read_file(path, RegistryEntry)
    if document.format != REGISTRY_FORMAT:
        raise UserError(f"{path}: unsupported registry format {document.format!r}")
    tasks = {
        task: TaskResult(entry.card_hash, _compared_sampling(entry.sampling),
                         SideOutcomes.from_codes(list(entry.questions), list(entry.questions.values())))
        for task, entry in document.tasks.items()
    }
    summary = file_payload(SideSummary(
        run_id=document.source.run_id, config_name=document.source.config_name, label=document.label,
        tasks={task: entry.summary for task, entry in document.tasks.items() if entry.summary}))
    return StoredSide(source=f"registry:{name}", label=document.label or name, run_id=document.source.run_id,
                      endpoint=document.endpoint, summary=summary, tasks=tasks)


def resolve_side(reference: str, registry_dir: str | Path = DEFAULT_REGISTRY_DIR) -> StoredSide:
    """A run directory (its candidate side) or a registry name."""
    path = Path(reference)
    if path.is_dir():
        return load_run_side(path, CANDIDATE)
    if "/" in reference or reference.startswith("."):
        raise UserError(f"{reference}: no such run directory")
    return load_registry(reference, registry_dir)


def save_divergence_null(null: DivergenceNull, name: str, registry_dir: str | Path = DEFAULT_REGISTRY_DIR,
                         force: bool = False) -> Path:
    """Store the divergence null next to the registry baseline `name` (which must exist)."""
    entry = registry_path(name, registry_dir)
    if not entry.is_file():
        raise UserError(f"baseline {name!r} not found in {registry_dir}; save it first with "
                        "`evalpipe baseline save RUN_DIR --name NAME` (the null is stored with it)")
    path = entry.parent / DIVERGENCE_NULL_FILE
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to replace it")
    write_json(path, {"schema_version": SCHEMA_VERSION, "format": REGISTRY_FORMAT, "name": name,
                      "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **null.to_dict()})
    return path


def load_divergence_null(name: str, registry_dir: str | Path = DEFAULT_REGISTRY_DIR) -> DivergenceNull:
    path = registry_path(name, registry_dir).parent / DIVERGENCE_NULL_FILE
    if not path.is_file():
        raise UserError(f"baseline {name!r} has no divergence null ({path} not found); measure it with "
                        "`evalpipe baseline calibrate-divergence RUN_DIR ... --name NAME`")
    document = read_document(path, "a divergence null")
    check_schema_version(path, document)
    try:
        return DivergenceNull.from_dict(document)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not a divergence null ({exc})") from None
