"""Grade responses with an external harness's own answer extraction and grader, inside that harness's environment.

Run by `evalpipe crosscheck` as `<extra env python> -I harness_grader.py evalscope|lm-eval`. It imports only the
standard library and the harness, so it works in an environment where evalpipe itself is not installed, and the
core environment never imports either harness.

Protocol (JSON, one object per line). stdin: a header `{"tasks": {our task: harness task spec}}` (the entry of
evalpipe/interop/harnesses.yaml), then one item per sample: `{"id", "task", "content", "reasoning", "finish_reason",
"gold", "choices", "subject"}`. stdout: a header `{"harness", "version"}`, then one verdict per item, in input order:
`{"id", "extracted", "correct", "details", "error"}` (`correct` is null when the harness could not grade it).
Exit code 3 (one line on stderr) when the harness is not importable here.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Item = dict[str, Any]
Verdict = dict[str, Any]
MISSING_HARNESS_EXIT = 3
# The model id put into the harness's records; nothing is ever sent to a model.
MODEL = "crosscheck"


def _failed(error: str) -> Verdict:
    return {"extracted": None, "correct": None, "details": {}, "error": error}


def canonical_gold(spec: dict[str, Any], gold: str) -> str:
    """The gold as the harness's own dataset stores it (AIME answers are plain integers there, never '025')."""
    return str(int(gold)) if spec.get("gold") == "integer" else gold


# ---------------------------------------------------------------------------------------------------------
# EvalScope: the benchmark adapter's own filter_prediction + match_score (via calculate_metrics), on the message
# EvalScope builds from an OpenAI response (reasoning_content kept apart, a leading <think> block split off).


def evalscope_grader(specs: dict[str, dict[str, Any]]) -> Callable[[list[Item]], list[Verdict]]:
    from evalscope.api.dataset import Sample
    from evalscope.api.evaluator import TaskState
    from evalscope.api.model import ModelOutput
    from evalscope.api.model.model_output import ChatCompletionChoice
    from evalscope.api.registry import get_benchmark
    from evalscope.config import TaskConfig
    from evalscope.models.utils.openai import chat_message_assistant_from_openai
    from openai.types.chat import ChatCompletionMessage

    benchmarks = sorted({spec["task"] for spec in specs.values()})
    # The API URL is required by the config and never contacted: scoring sends nothing.
    config = TaskConfig(model=MODEL, datasets=benchmarks, eval_type="openai_api", api_url="http://127.0.0.1:9/v1")
    adapters = {task: get_benchmark(spec["task"], config) for task, spec in specs.items()}

    def grade_one(index: int, item: Item) -> Verdict:
        spec = specs[item["task"]]
        message = ChatCompletionMessage.model_validate(
            {"role": "assistant", "content": item["content"], "reasoning_content": item["reasoning"]}
        )
        stop_reason = {"stop": "stop", "length": "max_tokens"}.get(item.get("finish_reason") or "", "unknown")
        output = ModelOutput(model=MODEL, choices=[ChatCompletionChoice(
            message=chat_message_assistant_from_openai(MODEL, message, tools=[]), stop_reason=stop_reason)])
        sample = Sample(input="", target=canonical_gold(spec, item["gold"]), choices=item.get("choices"), id=index)
        state = TaskState(model=MODEL, sample=sample, output=output, completed=True)
        score = adapters[item["task"]].calculate_metrics(state).score
        metric = score.main_score_name or next(iter(score.value), None)
        value = score.value.get(metric) if metric else None
        usable = score.status.is_usable and value is not None
        return {"extracted": score.extracted_prediction or None, "correct": bool(value >= 1.0) if usable else None,
                "details": {"metric": metric, "value": value, "status": str(score.status.value),
                            **({"reason": score.metadata["math_reason"]} if "math_reason" in score.metadata else {})},
                "error": None if usable else f"evalscope did not score it: {score.metadata or score.explanation}"}

    def grade(items: list[Item]) -> list[Verdict]:
        verdicts = []
        for index, item in enumerate(items):
            try:
                verdicts.append(grade_one(index, item))
            except Exception as exc:  # noqa: BLE001 - one unscorable sample must not lose the others
                verdicts.append(_failed(f"evalscope raised {type(exc).__name__}: {exc}"))
        return verdicts

    return grade


# ---------------------------------------------------------------------------------------------------------
# lm-eval: the task's own YAML config (filters, process_results, metrics) over docs built from the items, exactly
# as its evaluator applies them to logged responses. lm-eval's chat client keeps `content` only (None -> "").


def _lmeval_doc(kind: str, item: Item, gold: str) -> dict[str, Any]:
    """A document in the shape the lm-eval task expects; prompt fields are empty (nothing is generated)."""
    if kind == "aime":
        return {"ID": "", "Problem": "", "Solution": "", "Answer": int(gold)}
    if kind == "minerva_math":
        # MATH-500's `answer` is the last \boxed{} of its solution; the metric parses that boxed answer.
        return {"problem": "", "solution": f"$\\boxed{{{gold}}}$", "answer": gold}
    if kind == "gpqa_cot":
        choices = list(item["choices"])
        return {"Question": "", **{f"choice{i + 1}": c for i, c in enumerate(choices)}, "choices": choices,
                "answer": f"({gold})"}
    if kind == "mmlu_flan":
        return {"question": "", "subject": item.get("subject") or "", "choices": list(item["choices"]),
                "answer": "ABCDEFGHIJ".index(gold)}
    raise ValueError(f"unknown lm-eval document kind '{kind}'")


def _lmeval_extracted(spec: dict[str, Any], task: Any, text: str, filtered: str) -> str | None:
    """What the verdict was computed from: the filtered response, or, for tasks whose process_results extracts
    internally, the same extraction done with that task's own helpers."""
    kind = spec.get("extractor")
    if kind == "math_verify":
        from math_verify import parse

        parsed = parse(text)
        return str(parsed[1]) if len(parsed) > 1 else None
    if kind == "aime_answer":
        helpers = task.config.process_results.__globals__
        dollars = [i for i, ch in enumerate(text) if ch == "$"]
        answer = text[dollars[0] + 1 : dollars[-1]] if len(dollars) > 1 else text
        boxed = helpers["last_boxed_only_string"](text)
        if boxed is not None:
            try:
                answer = helpers["remove_boxed"](boxed)
            except (AssertionError, IndexError):
                pass
        return answer
    return None if filtered in ("[invalid]", "[invalidanswer]") else filtered


def lmeval_grader(specs: dict[str, dict[str, Any]]) -> Callable[[list[Item]], list[Verdict]]:
    import datasets
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    datasets.disable_progress_bars()
    tasks_root = Path(lm_eval.__file__).parent / "tasks"

    def build_task(spec: dict[str, Any], config_path: str, docs: list[dict[str, Any]]) -> Any:
        config = load_yaml(tasks_root / config_path, resolve_func=True)
        for key in ("tag", "group", "task_list"):
            config.pop(key, None)
        # Every split the config names (zero-shot tasks still name a few-shot split) holds the same documents.
        splits = {config.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")}
        config["custom_dataset"] = lambda **_: {s: datasets.Dataset.from_list(docs) for s in splits if s}
        config.pop("dataset_kwargs", None)
        if spec.get("docs_processed"):  # the docs are already in post-process_docs shape (e.g. options shuffled)
            config["process_docs"] = None
        return ConfigurableTask(config=config)

    def grade_group(spec: dict[str, Any], config_path: str, items: list[Item]) -> list[Verdict]:
        golds = [canonical_gold(spec, item["gold"]) for item in items]
        task = build_task(spec, config_path, [_lmeval_doc(spec["doc"], i, g) for i, g in zip(items, golds)])
        docs = list(task.eval_docs)
        texts = [item["content"] or "" for item in items]
        instances = []
        for i, (doc, text) in enumerate(zip(docs, texts)):
            instance = Instance(request_type="generate_until", doc=doc, arguments=("", {}), idx=0,
                                metadata=(spec["task"], i, 1))
            instance.resps = [text]
            instances.append(instance)
        task._instances = instances
        task.apply_filters()
        verdicts = []
        for doc, text, instance in zip(docs, texts, instances):
            per_filter = {name: {"extracted": filtered, **task.process_results(doc, [filtered])}
                          for name, filtered in instance.filtered_resps.items()}
            chosen = per_filter[spec["filter"]]
            value = chosen.get(spec["metric"])
            verdicts.append({
                "extracted": _lmeval_extracted(spec, task, text, chosen["extracted"]),
                "correct": None if value is None else bool(value),
                "details": {"filter": spec["filter"], "metric": spec["metric"], "filters": per_filter},
                "error": None if value is not None else f"metric {spec['metric']} missing from lm-eval's results",
            })
        return verdicts

    def grade(items: list[Item]) -> list[Verdict]:
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            spec = specs[item["task"]]
            groups[(item["task"], spec["config"].format(subject=item.get("subject") or ""))].append(index)
        verdicts: list[Verdict | None] = [None] * len(items)
        for (task_name, config_path), indices in groups.items():
            try:
                group = grade_group(specs[task_name], config_path, [items[i] for i in indices])
            except Exception as exc:  # noqa: BLE001 - a task that cannot be built must not lose the others
                group = [_failed(f"lm-eval {config_path}: {type(exc).__name__}: {exc}")] * len(indices)
            for index, verdict in zip(indices, group):
                verdicts[index] = verdict
        return verdicts  # type: ignore[return-value]

    return grade


GRADERS = {"evalscope": ("evalscope", evalscope_grader), "lm-eval": ("lm_eval", lmeval_grader)}


def _read(lines: Iterable[str]) -> tuple[dict[str, Any], list[Item]]:
    rows = [json.loads(line) for line in lines if line.strip()]
    return rows[0], rows[1:]


def main() -> int:
    harness = sys.argv[1] if len(sys.argv) == 2 else ""
    if harness not in GRADERS:
        print(f"usage: harness_grader.py {'|'.join(GRADERS)}", file=sys.stderr)
        return 2
    # Verdicts get the real stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    package, make_grader = GRADERS[harness]
    header, items = _read(sys.stdin)
    try:
        grade = make_grader(header["tasks"])
    except ImportError as exc:
        print(f"{harness} is not importable in {sys.prefix}: {exc}", file=sys.stderr)
        return MISSING_HARNESS_EXIT
    version = importlib.metadata.version(package)
    verdicts = grade(items)
    out.write(json.dumps({"harness": harness, "version": version}) + "\n")
    for item, verdict in zip(items, verdicts, strict=True):
        out.write(json.dumps({"id": item["id"], **verdict}, ensure_ascii=False) + "\n")
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
