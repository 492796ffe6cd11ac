"""`evalpipe import evalscope DIR` and `evalpipe import lm-eval DIR`: another harness's per-sample outputs as an
evalpipe run directory, so its runs sit on the leaderboard and go through `compare` and `gate` like ours.

Read without importing either harness (plain JSON/YAML): EvalScope's `reviews/` (its verdict, extracted answer and
the messages) joined with `predictions/` (stop reason, usage, latency) and `configs/task_config*.yaml`; lm-eval's
`results_<time>.json` (task configs, versions, settings) and the `samples_<task>_<time>.jsonl` that `--log_samples`
writes.

Each sample keeps the harness's own verdict, so the imported accuracy is the score that harness reported: a sample
it counted correct is `correct` (even when the response was truncated: finish_reason "length" is kept); otherwise
`truncated` when it was cut at max_tokens, `no_answer` when the harness extracted nothing, else `wrong`; a sample
the harness excluded from scoring is `error`. Tasks matching one of our cards take our task name (harnesses.yaml),
others keep theirs. Each task's protocol (the harness, its version, the task config as run, the generation
settings and which result is the verdict) is hashed into the task's card_hash: it never equals one of our cards'
hashes, so comparing an imported run with one of ours, or with another protocol, is refused like any comparison
across protocols. Paths and the number of samples are left out of that hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evalpipe.errors import UserError
from evalpipe.interop.harnesses import harnesses
from evalpipe.journal import JournalWriter
from evalpipe.metrics import summarize_task
from evalpipe.outcomes import question_order
from evalpipe.records import Outcome, SampleRecord, Usage
from evalpipe.render.run_report import report_markdown
from evalpipe.run_files import (
    CANDIDATE,
    REPORT,
    SideDetails,
    SideSummary,
    details_path,
    journal_path,
    summary_path,
    write_config_file,
    write_file,
)
from evalpipe.runner import new_run_id
from evalpipe.task_plan import prompt_hash
from evalpipe.version import __version__

SIDE = CANDIDATE


@dataclass
class ImportedTask:
    task: str  # our task name when the harness task maps to one of our cards, else the harness's
    harness_task: str
    protocol: dict[str, Any]  # what card_hash is computed from
    sampling: dict[str, Any]  # temperature, top_p, max_tokens as the harness ran
    records: list[SampleRecord] = field(default_factory=list)

    @property
    def card_hash(self) -> str:
        return protocol_hash(self.protocol)


@dataclass
class ImportedRun:
    harness: str
    version: str
    source: Path
    model: str
    tasks: dict[str, ImportedTask]


def protocol_hash(protocol: dict[str, Any]) -> str:
    canonical = json.dumps(protocol, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def imported_outcome(correct: bool | None, finish_reason: str | None, answered: bool) -> Outcome:
    """Our outcome for a sample the harness graded `correct` (None: it did not score the sample)."""
    if correct is None:
        return "error"
    if correct:
        return "correct"
    if finish_reason == "length":
        return "truncated"
    return "wrong" if answered else "no_answer"


def _our_task(harness: str, their_task: str) -> tuple[str, dict[str, str]]:
    """(our task name, labels) of a harness task: mapped per harnesses.yaml ({subject} tasks give a label)."""
    for ours, spec in harnesses()[harness].tasks.items():
        pattern = "^" + re.escape(spec.task).replace(re.escape("{subject}"), "(?P<subject>.+)") + "$"
        match = re.match(pattern, their_task)
        if match:
            return ours, match.groupdict()
    return their_task, {}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    return rows


def _field(row: dict[str, Any], dotted: str, where: str) -> Any:
    value: Any = row
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise UserError(f"{where}: missing field '{dotted}'")
        value = value[key]
    return value


# ---------------------------------------------------------------------------------------------------------
# EvalScope


_STOP_REASONS = {"max_tokens": "length", "model_length": "length", "stop": "stop", "tool_calls": "tool_calls"}


def _evalscope_run_dir(path: Path) -> Path:
    """The output directory of one EvalScope run: `path` itself or its single timestamped subdirectory."""
    if list(path.glob("configs/task_config*.yaml")):
        return path
    runs = sorted(p.parent.parent for p in path.glob("*/configs/task_config*.yaml"))
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise UserError(f"{path}: not an EvalScope output directory (no configs/task_config*.yaml in it or in a "
                        f"subdirectory); give the directory `evalscope eval` printed as 'Output directory'")
    raise UserError(f"{path} holds {len(runs)} EvalScope runs ({', '.join(p.name for p in runs)}); give one of them")


def _text_and_reasoning(content: Any) -> tuple[str | None, str | None]:
    """An EvalScope assistant message's visible text and reasoning (content: a string or a list of parts)."""
    if content is None or isinstance(content, str):
        return content, None
    texts = [part.get("text", "") for part in content if part.get("type") == "text"]
    reasoning = [part.get("reasoning", "") for part in content if part.get("type") == "reasoning"]
    return ("\n".join(texts) if texts else None), ("\n".join(reasoning) if reasoning else None)


def _evalscope_protocol(config: dict[str, Any], benchmark: str) -> dict[str, Any]:
    resolved = dict((config.get("resolved_benchmarks") or {}).get(benchmark) or {})
    dataset = str(resolved.get("dataset_id") or "")
    if dataset.startswith(("/", ".", "~")):  # a local copy: its path says nothing about the protocol
        resolved["dataset_id"] = "local"
    generation = {k: v for k, v in (config.get("generation_config") or {}).items() if k not in ("batch_size",)}
    judge = config.get("judge") or {}
    return {"harness": "evalscope", "harness_version": config.get("evalscope_version"), "benchmark": resolved,
            "generation": generation, "judge": {"strategy": judge.get("strategy"), "models": judge.get("models")},
            "chat_template": config.get("chat_template"),
            "evaluation_version": (((config.get("evaluation_identity") or {}).get("benchmarks") or {})
                                   .get(benchmark) or {}).get("evaluation_version")}


def read_evalscope(path: Path) -> ImportedRun:
    run_dir = _evalscope_run_dir(path)
    config_path = sorted(run_dir.glob("configs/task_config*.yaml"))[0]
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    model = str(config.get("model_id") or config.get("model") or "unknown")
    benchmarks = sorted(config.get("datasets") or [], key=len, reverse=True)
    generation = config.get("generation_config") or {}
    sampling = {"temperature": generation.get("temperature"), "top_p": generation.get("top_p"),
                "max_tokens": generation.get("max_tokens")}
    review_files = sorted((run_dir / "reviews").glob("*/*.jsonl"))
    if not review_files:
        raise UserError(f"{run_dir}: no reviews/<model>/*.jsonl (did the evaluation finish its review stage?)")
    tasks: dict[str, ImportedTask] = {}
    for review_file in review_files:
        # <benchmark>_<subset>.jsonl; benchmark names contain underscores too (math_500), so match known names.
        benchmark = next((b for b in benchmarks if review_file.stem.startswith(f"{b}_")), None)
        if benchmark is None:
            raise UserError(f"{review_file}: not a review of a configured benchmark ({sorted(benchmarks)})")
        subset = review_file.stem[len(benchmark) + 1:]
        ours, _ = _our_task("evalscope", benchmark)
        if ours not in tasks:
            tasks[ours] = ImportedTask(ours, benchmark, _evalscope_protocol(config, benchmark), sampling)
        task = tasks[ours]
        prediction_file = run_dir / "predictions" / review_file.parent.name / review_file.name
        outputs = {row.get("index"): row.get("model_output") or {}
                   for row in (_read_jsonl(prediction_file) if prediction_file.is_file() else [])}
        for number, row in enumerate(_read_jsonl(review_file), 1):
            task.records.append(_evalscope_record(row, outputs, task, subset, f"{review_file}:{number}"))
    return ImportedRun("evalscope", str(config.get("evalscope_version")), run_dir, model, tasks)


def _evalscope_record(row: dict[str, Any], outputs: dict[Any, dict], task: ImportedTask, subset: str,
                      where: str) -> SampleRecord:
    sample = _field(row, "sample_score", where)
    score = _field(sample, "score", where)
    messages = _field(row, "messages", where)
    user = [{"role": "user", "content": m["content"]} for m in messages if m.get("role") == "user"]
    assistant = next((m for m in reversed(messages) if m.get("role") == "assistant"), {})
    content, reasoning = _text_and_reasoning(assistant.get("content"))
    output = outputs.get(row.get("index"), {})
    choice = (output.get("choices") or [{}])[0]
    finish_reason = _STOP_REASONS.get(choice.get("stop_reason"), choice.get("stop_reason"))
    usage = output.get("usage") or {}
    metric = score.get("main_score_name") or next(iter(score.get("value") or {}), None)
    value = (score.get("value") or {}).get(metric)
    usable = score.get("status", "success") in ("success", "degraded") and value is not None
    extracted = score.get("extracted_prediction") or None
    target = row.get("target")
    gold = ",".join(map(str, target)) if isinstance(target, list) else str(target)
    prompt = prompt_hash(tuple(user))
    question_id = str((sample.get("sample_metadata") or {}).get("question_id") or f"q-{prompt}")
    return SampleRecord(
        task=task.task, card_hash=task.card_hash, question_id=question_id,
        sample_index=int(sample.get("generation_index") or 0), gold=gold, content=content, reasoning=reasoning,
        finish_reason=finish_reason, latency_s=output.get("time"), attempts=1, extracted=extracted,
        usage=Usage(prompt_tokens=usage.get("input_tokens"), completion_tokens=usage.get("output_tokens"),
                    reasoning_tokens=usage.get("reasoning_tokens")),
        rule=f"evalscope:{metric}", outcome=imported_outcome(value >= 1.0 if usable else None, finish_reason,
                                                             extracted is not None),
        error=None if usable else f"evalscope did not score it ({score.get('status')}): {score.get('metadata')}",
        prompt_hash=prompt, labels={"subset": subset} if subset and subset != "default" else {},
    )


# ---------------------------------------------------------------------------------------------------------
# lm-eval


_INVALID = ("[invalid]", "[invalidanswer]")
_UNHASHED_LMEVAL = ("dataset_kwargs", "metadata", "repeats")


def _lmeval_results(path: Path) -> Path:
    if path.is_file() and path.name.startswith("results_") and path.suffix == ".json":
        return path
    found = sorted(path.rglob("results_*.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"{path}: no lm-eval results_*.json in it (give the --output_path of an lm-eval run)")
    raise UserError(f"{path} holds {len(found)} lm-eval runs; give one results file: "
                    + ", ".join(str(p.relative_to(path)) for p in found))


def _without_addresses(value: Any) -> Any:
    """lm-eval logs some functions as '<function f at 0x7f...>': the address changes with every process."""
    if isinstance(value, dict):
        return {k: _without_addresses(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_addresses(v) for v in value]
    return re.sub(r" at 0x[0-9a-f]+>", ">", value) if isinstance(value, str) else value


def _lmeval_protocol(results: dict[str, Any], task: str, verdict: dict[str, str]) -> dict[str, Any]:
    config = {k: _without_addresses(v) for k, v in (results.get("configs") or {}).get(task, {}).items()
              if k not in _UNHASHED_LMEVAL}
    config.pop("task", None)  # per-subject MMLU tasks share one protocol
    config.pop("dataset_name", None)
    config.pop("description", None)
    settings = results.get("config") or {}
    return {"harness": "lm-eval", "harness_version": results.get("lm_eval_version"), "task_config": config,
            "task_version": (results.get("versions") or {}).get(task),
            "n_shot": (results.get("n-shot") or {}).get(task),
            "gen_kwargs": settings.get("gen_kwargs"), "chat_template_sha": results.get("chat_template_sha"),
            "system_instruction_sha": results.get("system_instruction_sha"),
            "fewshot_as_multiturn": results.get("fewshot_as_multiturn"), "verdict": verdict}


def _lmeval_sampling(results: dict[str, Any], task: str) -> dict[str, Any]:
    kwargs = {**((results.get("configs") or {}).get(task, {}).get("generation_kwargs") or {}),
              **((results.get("config") or {}).get("gen_kwargs") or {})}
    return {"temperature": kwargs.get("temperature"), "top_p": kwargs.get("top_p"),
            "max_tokens": kwargs.get("max_gen_toks")}


def _lmeval_verdict(task: str, ours: str, rows: list[dict[str, Any]]) -> dict[str, str]:
    """The filter and metric whose value is the verdict: harnesses.yaml's for our tasks, else the first logged."""
    spec = harnesses()["lm-eval"].tasks.get(ours)
    if spec is not None and spec.filter and spec.metric:
        return {"filter": spec.filter, "metric": spec.metric}
    first = rows[0]
    metrics = first.get("metrics") or []
    if not metrics:
        raise UserError(f"lm-eval task {task}: its samples name no metric")
    return {"filter": str(first.get("filter")), "metric": str(metrics[0])}


def read_lmeval(path: Path) -> ImportedRun:
    results_path = _lmeval_results(path)
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{results_path}: not valid JSON ({exc.msg})") from None
    stamp = results_path.stem[len("results_"):]
    model = str((results.get("config") or {}).get("model_args", {}).get("model") or results.get("model_name")
                or "unknown")
    tasks: dict[str, ImportedTask] = {}
    for their_task in sorted(results.get("configs") or {}):
        samples_path = results_path.parent / f"samples_{their_task}_{stamp}.jsonl"
        if not samples_path.is_file():
            raise UserError(f"{samples_path} is missing: lm-eval writes per-sample files only with --log_samples")
        rows = _read_jsonl(samples_path)
        if not rows:
            continue
        ours, labels = _our_task("lm-eval", their_task)
        verdict = _lmeval_verdict(their_task, ours, rows)
        protocol = _lmeval_protocol(results, their_task, verdict)
        if ours in tasks and tasks[ours].protocol != protocol:
            raise UserError(f"lm-eval tasks {tasks[ours].harness_task} and {their_task} both map to {ours} but "
                            f"were run under different settings")
        spec = harnesses()["lm-eval"].tasks.get(ours)
        task = tasks.setdefault(ours, ImportedTask(ours, spec.task if spec else their_task, protocol,
                                                   _lmeval_sampling(results, their_task)))
        id_field = spec.id if spec else None
        chosen = [row for row in rows if row.get("filter") == verdict["filter"]]
        if not chosen:
            raise UserError(f"{samples_path}: no sample under filter '{verdict['filter']}'")
        for number, row in enumerate(chosen, 1):
            task.records.append(_lmeval_record(row, task, verdict, labels, id_field, f"{samples_path}:{number}"))
    if not tasks:
        raise UserError(f"{results_path}: no task with logged samples")
    return ImportedRun("lm-eval", str(results.get("lm_eval_version")), results_path.parent, model, tasks)


def _lmeval_record(row: dict[str, Any], task: ImportedTask, verdict: dict[str, str], labels: dict[str, str],
                   id_field: str | None, where: str) -> SampleRecord:
    doc = _field(row, "doc", where)
    value = _field(row, verdict["metric"], where)
    responses = _field(row, "resps", where)
    content = responses[0][0] if responses and responses[0] else None
    # What the verdict's filter passed to the metric ("none": the whole response), or None when it found nothing.
    filtered = (row.get("filtered_resps") or [None])[0]
    extracted = None if filtered in _INVALID else filtered
    question_id = str(doc.get(id_field)) if id_field and doc.get(id_field) is not None else \
        f"doc-{str(_field(row, 'doc_hash', where))[:16]}"
    return SampleRecord(
        task=task.task, card_hash=task.card_hash, question_id=question_id, sample_index=0,
        gold=str(row.get("target")), content=content, attempts=1, extracted=extracted,
        rule=f"lm-eval:{verdict['filter']}:{verdict['metric']}",
        outcome=imported_outcome(bool(value), None, bool(extracted)),
        prompt_hash=str(row.get("prompt_hash", ""))[:16] or None,
        labels=labels,
    )


# ---------------------------------------------------------------------------------------------------------
# An imported run as a run directory


READERS = {"evalscope": read_evalscope, "lm-eval": read_lmeval}


def write_imported_run(run: ImportedRun, output_dir: Path, name: str, label: str | None) -> tuple[Path, dict]:
    """`<output_dir>/<name>/<run_id>/` with config.yaml, candidate/{journal.jsonl,summary.json,details.json} and
    report.md, in the shapes `evalpipe run` writes; returns (run dir, summary)."""
    run_id = new_run_id()
    run_dir = output_dir / name / run_id
    try:
        (run_dir / SIDE).mkdir(parents=True, exist_ok=False)
    except OSError as exc:
        raise UserError(f"--output-dir: cannot create {run_dir}: {exc.strerror or exc}") from None
    label = label or f"{run.model} ({run.harness})"
    tasks = {}
    for t in run.tasks.values():
        ids = question_order(t.task, (r.question_id for r in t.records))
        samples = 1 + max(r.sample_index for r in t.records)
        tasks[t.task] = {"card_hash": t.card_hash, "samples": samples, "seed": None, "n_questions": len(ids),
                         "sampling": t.sampling, "harness_task": t.harness_task, "protocol": t.protocol}
    resolved = {
        "name": name,
        "imported": {"harness": run.harness, "harness_version": run.version, "source": str(run.source)},
        SIDE: {"label": label, "model": run.model},
        "tasks": [{"task": task, "samples": info["samples"]} for task, info in tasks.items()],
        "resolved": {"run_id": run_id, "evalpipe_version": __version__, "tasks": tasks},
    }
    write_config_file(run_dir, resolved)
    with JournalWriter(journal_path(run_dir, SIDE)) as journal:
        for t in run.tasks.values():
            for record in t.records:
                journal.append(record)
    summary = {"run_id": run_id, "config_name": name, "label": label, "tasks": {}}
    details: dict[str, Any] = {"run_id": run_id, "label": label,
                               "endpoint": {"imported from": f"{run.harness} {run.version}: {run.source}",
                                            "model": run.model},
                               "tasks": {}}
    for t in run.tasks.values():
        info = tasks[t.task]
        entry, more = summarize_task(t.records, task=t.task, card_hash=t.card_hash,
                                     question_ids=question_order(t.task, (r.question_id for r in t.records)),
                                     samples=info["samples"])
        summary["tasks"][t.task] = entry
        details["tasks"][t.task] = {**more, "harness_task": t.harness_task, "protocol": t.protocol}
    write_file(summary_path(run_dir, SIDE), SideSummary.model_validate(summary))
    write_file(details_path(run_dir, SIDE), SideDetails.model_validate(details))
    (run_dir / REPORT).write_text(
        report_markdown(config_name=name, run_dir=run_dir, sides={SIDE: (summary, details)}, warnings=[],
                        config_path=None), encoding="utf-8")
    return run_dir, summary
