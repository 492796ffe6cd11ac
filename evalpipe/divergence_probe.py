"""The `divergence` task: the baseline's own generations scored teacher-forced on both servers.

Generations come from this run's baseline journal, or from a registry entry's `generations.jsonl` (written by
`evalpipe baseline save`; prompts are rebuilt from the data, never stored). Each one is sent to both servers as
one `/v1/completions` request with `echo: true`, `logprobs: k` and `max_tokens: 1`, which any server that returns
prompt logprobs answers (vLLM, SGLang, ours). With a tokenizer (the baseline's launched model, or the task's
`tokenizer:`) the prompt is the chat-templated conversation plus the generation, sent as token ids, so the scored
positions are exactly the generated tokens; without one it is sent as plain text (messages joined by blank
lines) and the scored positions are found from the returned token texts.

Writes `<run_dir>/divergence/scores.jsonl` (per generation: per-position KL, top-1 agreement, logprob change)
and `<run_dir>/divergence/summary.json` (the statistics of evalpipe.divergence with their intervals, and the
baseline's calibrated null when the config names one).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evalpipe.cards import load_card
from evalpipe.client import EndpointPool, Outcome
from evalpipe.comparison import overall_verdict
from evalpipe.config import DIVERGENCE, DivergenceEntry, GateConfig, GateOverride, RunConfig, ServedSide
from evalpipe.data import load_questions, question_order_key, resolve_data_dir
from evalpipe.divergence import (
    KL_APPROXIMATION,
    DivergenceNull,
    DivergenceSummary,
    ScoredPosition,
    SequenceScores,
    divergence_verdict,
    against_null,
    calibrate_null,
    null_means,
    score_sequence,
    summarize,
)
from evalpipe.errors import UserError
from evalpipe.gate import ProbeOutcome
from evalpipe.journal import latest_by_key, read_journal
from evalpipe.launch import resolve_model
from evalpipe.records import SampleRecord
from evalpipe.registry import load_divergence_null, registry_path
from evalpipe.run_files import (
    BASELINE,
    CANDIDATE,
    DIVERGENCE_DIR,
    DIVERGENCE_SCORES,
    GENERATIONS_FILE,
    DivergenceSummaryFile,
    divergence_scores_path,
    divergence_summary_path,
    journal_path,
    read_file,
    read_resolved_config,
    write_file,
)
from evalpipe.task_plan import TaskPlan, prompt_hash, render_messages

log = logging.getLogger(__name__)

_TEXT_CHARS_PER_TOKEN = 8  # text prompts are cut to max_tokens * this many characters before tokenization


@dataclass(frozen=True)
class Generation:
    """One baseline answer and the conversation it answered."""

    task: str
    question_id: str
    sample_index: int
    messages: tuple[dict[str, str], ...]
    text: str


def generated_text(content: str | None, reasoning: str | None) -> str:
    """What the model generated: reasoning and answer joined by `</think>` as DeepSeek-R1 emits them (a server's
    reasoning parser had split them), else the content as is."""
    if reasoning:
        return reasoning + ("</think>" + content if content else "")
    return content or ""


def _interleave(per_task: dict[str, list[Generation]], limit: int) -> list[Generation]:
    """Round robin over tasks (each already in its fixed order), up to `limit` generations."""
    chosen: list[Generation] = []
    queues = [list(items) for items in per_task.values()]
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return chosen


def run_generations(entry: DivergenceEntry, plans: Sequence[TaskPlan], records: Sequence[SampleRecord]
                    ) -> list[Generation]:
    """The baseline's answers in this run, per task in (sample, question) order, interleaved across tasks."""
    wanted = entry.tasks or [p.name for p in plans]
    requests = {r.key: r for p in plans if p.name in wanted for r in p.requests}
    per_task: dict[str, list[Generation]] = {task: [] for task in wanted}
    latest = latest_by_key(list(records))
    for key in sorted(latest, key=lambda k: (k[2], question_order_key(latest[k].task, k[1]))):
        record, request = latest[key], requests.get(key)
        text = generated_text(record.content, record.reasoning)
        if request is None or record.outcome == "error" or not text:
            continue
        per_task[record.task].append(Generation(record.task, record.question_id, record.sample_index,
                                                request.messages, text))
    return _interleave(per_task, entry.limit)


def registry_generations(entry: DivergenceEntry, data_dir: Path | None) -> list[Generation]:
    """A registry entry's stored answers with their prompts rebuilt from the data; an answer whose rebuilt
    prompt differs from the one it answered (prompt_hash) is refused."""
    path = registry_path(entry.from_registry, entry.registry_dir).parent / GENERATIONS_FILE
    if not path.is_file():
        raise UserError(f"divergence.from_registry: {path} not found; baselines saved by this version of "
                        "`evalpipe baseline save` store their generations")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    wanted = entry.tasks or sorted({row["task"] for row in rows})
    per_task: dict[str, list[Generation]] = {task: [] for task in wanted}
    mismatched = 0
    for task in wanted:
        card = load_card(task)
        questions = {q.id: q for q in load_questions(card, data_dir)}
        for row in (r for r in rows if r["task"] == task):
            question = questions.get(row["question_id"])
            if question is None:
                continue
            messages, _, _ = render_messages(card, question, row["sample_index"])
            if row.get("prompt_hash") and prompt_hash(messages) != row["prompt_hash"]:
                mismatched += 1
                continue
            per_task[task].append(Generation(task, row["question_id"], row["sample_index"], messages,
                                             generated_text(row.get("content"), row.get("reasoning"))))
    if mismatched:
        log.warning("divergence: %d stored generations answered a prompt the current cards no longer render; "
                    "left out", mismatched)
    return _interleave(per_task, entry.limit)


# ---------------------------------------------------------------------------------------------------------
# What is sent and which positions are scored


@dataclass(frozen=True)
class ProbeItem:
    generation: Generation
    prompt: str | list[int]
    scored_from: int  # token-id prompt: index of the first generated token; text prompt: character offset


def build_item(generation: Generation, tokenizer: Any | None, max_tokens: int) -> ProbeItem:
    if tokenizer is not None:
        from runtime.server.tokenizer import render_chat

        prompt_ids = render_chat(tokenizer, list(generation.messages), True, {})
        generated_ids = tokenizer.encode(generation.text, add_special_tokens=False)[:max_tokens]
        return ProbeItem(generation, prompt_ids + generated_ids, len(prompt_ids))
    prefix = "\n\n".join(m["content"] for m in generation.messages) + "\n\n"
    return ProbeItem(generation, prefix + generation.text[: max_tokens * _TEXT_CHARS_PER_TOKEN], len(prefix))


def scored_positions(body: dict[str, Any], item: ProbeItem, max_tokens: int) -> list[ScoredPosition]:
    """The generated positions of an echo response: token, its logprob and top-k, for each."""
    choice = (body.get("choices") or [{}])[0]
    block = choice.get("logprobs") or {}
    tokens, logprobs, tops = block.get("tokens") or [], block.get("token_logprobs") or [], block.get("top_logprobs")
    tops = tops or [None] * len(tokens)
    if isinstance(item.prompt, list):
        start, end = item.scored_from, len(item.prompt)
    else:
        prompt_tokens = (body.get("usage") or {}).get("prompt_tokens") or len(tokens) - 1
        # Characters a server adds in front (a BOS token's text) shift every token's offset.
        extra = max(0, sum(len(t) for t in tokens[:prompt_tokens]) - len(item.prompt))
        offset, start = 0, prompt_tokens
        for i, token in enumerate(tokens[:prompt_tokens]):
            if offset >= item.scored_from + extra:
                start = i
                break
            offset += len(token)
        end = min(prompt_tokens, start + max_tokens)
    if end > len(tokens):
        raise ValueError(f"the server echoed {len(tokens)} tokens for a prompt of {end}")
    return [ScoredPosition(tokens[i], float(logprobs[i]), tops[i] or {})
            for i in range(start, end) if logprobs[i] is not None]


# ---------------------------------------------------------------------------------------------------------
# Running the probe


@dataclass
class ProbeResult:
    settings: dict[str, Any]
    scores: list[tuple[Generation, SequenceScores]] = field(default_factory=list)
    failures: list[tuple[Generation, str]] = field(default_factory=list)
    null: DivergenceNull | None = None  # the baseline's calibrated null, when the config names one

    @property
    def attempted(self) -> int:
        return len(self.scores) + len(self.failures)

    def summary(self, alpha: float) -> DivergenceSummary | None:
        """The statistics with one-sided bounds at `alpha`, or None when nothing was scored."""
        sequences = [s for _, s in self.scores if len(s)]
        if not sequences:
            return None
        return summarize(sequences, alpha=alpha, resamples=self.settings["bootstrap"], seed=self.settings["seed"])

    def document(self, summary: DivergenceSummary | None) -> dict[str, Any]:
        """summary.json of the probe (also the `divergence` section of comparison.json, before the verdict)."""
        document = {**self.settings, "approximation": KL_APPROXIMATION, "attempted": self.attempted,
                    "failed": len(self.failures), "errors": [f"{g.task}/{g.question_id}#{g.sample_index}: {e}"
                                                             for g, e in self.failures[:5]],
                    "statistics": summary.to_dict() if summary else None}
        if self.null is not None:
            document["null"] = {**self.null.to_dict(), **(
                {"candidate": against_null(self.null, summary.mean_kld.value, summary.n_sequences)} if summary else {})}
        return document


@dataclass(frozen=True)
class ProbeSetup:
    """What the probe needs, prepared before any server starts (bad input fails fast)."""

    entry: DivergenceEntry
    tokenizer: Any | None
    tokenizer_source: str | None
    stored: list[Generation] | None  # from the registry; None: this run's baseline journal
    null: DivergenceNull | None = None  # divergence.null's calibrated null


def prepare_probe(config: RunConfig) -> ProbeSetup | None:
    entry = config.divergence
    if entry is None:
        return None
    source = entry.tokenizer
    baseline = config.baseline
    if source is None and isinstance(baseline, ServedSide) and baseline.launch is not None:
        source = resolve_model(baseline.launch.model)
    tokenizer = None
    if source is not None:
        from runtime.server.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(source)
        except (OSError, ValueError) as exc:
            raise UserError(f"divergence.tokenizer: cannot load a tokenizer from {source} "
                            f"({' '.join(str(exc).split())[:200]})") from None
    else:
        log.warning("divergence: no tokenizer (give tasks[].tokenizer or launch the baseline): prompts are sent "
                    "as plain text without the chat template")
    stored = registry_generations(entry, resolve_data_dir(config.data_dir)) if entry.from_registry else None
    if stored is not None and not stored:
        raise UserError(f"divergence.from_registry: {entry.from_registry} holds no usable generations")
    null = load_divergence_null(entry.null, entry.registry_dir) if entry.null else None
    return ProbeSetup(entry, tokenizer, source, stored, null)


def with_null_limit(config: RunConfig, setup: ProbeSetup | None) -> RunConfig:
    """The config with the divergence limit its null implies, when it names a null and its gate sets no max_kld:
    the null's quantile at this probe's size (divergence.limit answers) plus the null's tolerance. Applied
    before the run starts, so the resolved config (and a later `evalpipe gate`) holds the limit used."""
    if setup is None or setup.null is None or config.gate is None:
        return config
    if config.gate.for_task(DIVERGENCE).max_kld is not None:
        return config
    null = setup.null
    limit = float(np.quantile(null_means(null.per_answer_kld, setup.entry.limit), null.quantile)) + null.tolerance
    override = config.gate.tasks.get(DIVERGENCE, GateOverride()).model_copy(update={"max_kld": round(limit, 6)})
    log.info("divergence: max_kld %.4g nats = the null's %g quantile at %d answers + tolerance %g (from %s)",
             limit, null.quantile, setup.entry.limit, null.tolerance, setup.entry.null)
    gate = config.gate.model_copy(update={"tasks": {**config.gate.tasks, DIVERGENCE: override}})
    return config.model_copy(update={"gate": gate})


async def _score_side(pool: EndpointPool, model: str, items: Sequence[ProbeItem], top_k: int, concurrency: int,
                      advance) -> list[Outcome]:
    results: list[Outcome | None] = [None] * len(items)
    queue = iter(range(len(items)))

    async def worker() -> None:
        for i in queue:
            results[i] = await pool.prompt_logprobs(model, items[i].prompt, top_k)
            advance()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(items)))))
    return results  # type: ignore[return-value]


async def _score_both(config: RunConfig, items: Sequence[ProbeItem], top_k: int, progress: Progress
                      ) -> dict[str, list[Outcome]]:
    sides = {CANDIDATE: config.candidate, BASELINE: config.baseline}
    pools = {name: EndpointPool(spec.urls, spec.api_key, config.client) for name, spec in sides.items()}
    bars = {name: progress.add_task(f"divergence/{name}", total=len(items)) for name in sides}
    try:
        outcomes = await asyncio.gather(*(
            _score_side(pools[name], spec.model, items, top_k, config.concurrency,
                        lambda name=name: progress.advance(bars[name]))
            for name, spec in sides.items()))
    finally:
        for pool in pools.values():
            await pool.aclose()
    return dict(zip(sides, outcomes, strict=True))


def run_probe(config: RunConfig, setup: ProbeSetup, plans: Sequence[TaskPlan], run_dir: Path,
              show_progress: bool) -> ProbeResult:
    """Score the generations on both (live) servers and write divergence/scores.jsonl and summary.json."""
    entry = setup.entry
    if setup.stored is not None:
        generations, source = setup.stored, f"registry:{entry.from_registry}"
    else:
        generations = run_generations(entry, plans, read_journal(journal_path(run_dir, BASELINE)))
        source = f"{run_dir}/{BASELINE}"
    items = [build_item(g, setup.tokenizer, entry.max_tokens) for g in generations]
    settings = {"source": source, "tokenizer": setup.tokenizer_source,
                "prompt_format": "chat template, token ids" if setup.tokenizer is not None else "plain text",
                "top_k": entry.top_logprobs, "limit": entry.limit, "max_tokens": entry.max_tokens,
                "bootstrap": entry.bootstrap, "seed": entry.seed}
    result = ProbeResult(settings, null=setup.null)
    log.info("divergence: scoring %d baseline generations on both servers (echo, top-%d logprobs)", len(items),
             entry.top_logprobs)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), disable=not show_progress) as progress:
        outcomes = asyncio.run(_score_both(config, items, entry.top_logprobs, progress))
    for i, item in enumerate(items):
        cand, base = outcomes[CANDIDATE][i], outcomes[BASELINE][i]
        failed = next((f"{name}: {o.error}" for name, o in ((BASELINE, base), (CANDIDATE, cand)) if o.body is None),
                      None)
        if failed is None:
            try:
                scores = score_sequence(scored_positions(base.body, item, entry.max_tokens),
                                        scored_positions(cand.body, item, entry.max_tokens))
                result.scores.append((item.generation, scores))
                continue
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                failed = f"unusable logprobs: {exc}"
        result.failures.append((item.generation, failed))
    write_probe(run_dir, result, (config.gate or GateConfig()).for_task(DIVERGENCE).alpha)
    return result


def add_probe_section(document: dict[str, Any], result: ProbeResult, gate: GateConfig | None) -> ProbeOutcome:
    """Add the `divergence` section (statistics, limits, verdict) to a comparison document, fold its verdict into
    the document's, and return what the gate needs."""
    rule = (gate or GateConfig()).for_task(DIVERGENCE)
    summary = result.summary(rule.alpha)
    verdict = divergence_verdict(summary, rule.max_kld, rule.min_top1_agreement)[0] if summary else "inconclusive"
    document[DIVERGENCE] = {**result.document(summary), "max_kld": rule.max_kld,
                            "min_top1_agreement": rule.min_top1_agreement, "verdict": verdict}
    document["verdict"] = overall_verdict([*(t["verdict"] for t in document["tasks"].values()), verdict])
    return ProbeOutcome(summary, len(result.failures), result.attempted)


def write_probe(run_dir: Path, result: ProbeResult, alpha: float) -> None:
    (run_dir / DIVERGENCE_DIR).mkdir(parents=True, exist_ok=True)
    with open(divergence_scores_path(run_dir), "w", encoding="utf-8") as out:
        for generation, scores in result.scores:
            out.write(json.dumps({"task": generation.task, "question_id": generation.question_id,
                                  "sample_index": generation.sample_index, **scores.to_dict()}) + "\n")
        for generation, error in result.failures:
            out.write(json.dumps({"task": generation.task, "question_id": generation.question_id,
                                  "sample_index": generation.sample_index, "error": error}) + "\n")
    write_file(divergence_summary_path(run_dir),
               DivergenceSummaryFile.model_validate(result.document(result.summary(alpha))))


def load_probe(run_dir: Path) -> ProbeResult | None:
    """A finished run's probe, from its files (None when the run had none)."""
    if not divergence_summary_path(run_dir).is_file():
        return None
    document = read_file(divergence_summary_path(run_dir), DivergenceSummaryFile)
    settings = document.model_dump(include={"source", "tokenizer", "prompt_format", "top_k", "limit",
                                            "max_tokens", "bootstrap", "seed"})
    null = getattr(document, "null", None)
    result = ProbeResult(settings, null=DivergenceNull.from_dict(null) if null else None)
    for line in divergence_scores_path(run_dir).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        generation = Generation(row["task"], row["question_id"], row["sample_index"], (), "")
        if "error" in row:
            result.failures.append((generation, row["error"]))
        else:
            result.scores.append((generation, SequenceScores.from_dict(row)))
    return result


def calibrate_from_runs(run_dirs: Sequence[Path], tolerance: float, quantile: float, answers: int | None
                        ) -> DivergenceNull:
    """The null from A/A runs: runs whose candidate is the baseline model (same quantization and launched model)
    under another batch composition, request order or seed, each with a divergence probe. `answers` (default:
    the runs' probe limit) is the probe size the quantile is computed for."""
    per_answer: list[float] = []
    runs: list[dict] = []
    limits = set()
    for run_dir in run_dirs:
        saved = read_resolved_config(run_dir)
        probe = load_probe(run_dir)
        if probe is None or not probe.scores:
            raise UserError(f"{run_dir}: no divergence probe scores ({DIVERGENCE_DIR}/{DIVERGENCE_SCORES}); run an A/A config "
                            "with a `- task: divergence` entry, e.g. configs/quickstart_null.yaml")
        cand, base = saved.get("candidate") or {}, saved.get("baseline") or {}
        differing = [key for key in ("quantization",) if cand.get(key) != base.get(key)]
        cand_launch, base_launch = cand.get("launch") or {}, base.get("launch") or {}
        if cand_launch.get("model") != base_launch.get("model"):
            differing.append("launch.model")
        if differing:
            raise UserError(f"{run_dir}: not an A/A run, candidate and baseline differ in {differing}; the null is "
                            "the baseline against itself")
        values = [float(scores.kld.mean()) for _, scores in probe.scores if len(scores)]
        per_answer += values
        limits.add(probe.settings["limit"])
        runs.append({"source": str(run_dir), "run_id": (saved.get("resolved") or {}).get("run_id"),
                     "candidate_args": cand_launch.get("args"), "baseline_args": base_launch.get("args"),
                     "answers": len(values), "mean_kld": float(np.mean(values))})
    size = answers if answers is not None else max(limits)
    return calibrate_null(per_answer, runs, size, tolerance, quantile)
