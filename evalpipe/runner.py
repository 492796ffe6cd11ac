"""`evalpipe run`: plan, preflight, evaluate one side into its journal, summarize.

A side (the candidate, and a live baseline) is evaluated on a plan shared by all sides, into
`<run_dir>/<side>/journal.jsonl` and `<run_dir>/<side>/summary.json`. `execute_run` strings the steps together
for every side of the config: `plan_from_config` -> `preflight_side` for each side (sends pilots, writes
nothing) -> `create_run_dir` -> `evaluate_side` for each side -> `write_side_results` -> report.md. The sides'
preflights and evaluations run concurrently, each against its own server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalpipe.cards import load_card
from evalpipe.client import EndpointPool, GenerationParams, Outcome
from evalpipe.config import RunConfig, ServedSide, TaskEntry, load_config
from evalpipe.data import load_questions, resolve_data_dir, select_questions
from evalpipe.errors import EndpointError, UserError
from evalpipe.journal import JournalWriter, latest_by_key, read_journal
from evalpipe.metrics import summarize_side
from evalpipe.progress import RunProgress
from evalpipe.records import SampleRecord, Usage
from evalpipe.render.run_report import report_markdown, truncation_warnings
from evalpipe.run_files import (
    BASELINE,
    CANDIDATE,
    REPORT,
    RESOLVED_CONFIG,
    SideDetails,
    SideSummary,
    details_path,
    journal_path,
    read_resolved_config,
    saved_run_id,
    summary_path,
    write_config_file,
    write_file,
)
from evalpipe.stats import questions_needed
from evalpipe.scoring import LOGLIKELIHOOD_RULE, continuation_logprob, loglikelihood_choice, score_response
from evalpipe.task_plan import SampleRequest, TaskPlan, build_task_plan
from evalpipe.version import __version__

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Plan


def plan_from_config(config: RunConfig | str | Path) -> tuple[RunConfig, list[TaskPlan]]:
    """Validate the config, load cards and data, and build every task's plan. Sends nothing, writes nothing."""
    if not isinstance(config, RunConfig):
        config = load_config(config)
    data_dir = resolve_data_dir(config.data_dir)
    plans = []
    for i, entry in enumerate(config.tasks):
        if not isinstance(entry, TaskEntry):  # the divergence probe has no card (evalpipe.divergence_probe)
            continue
        where = f"tasks.{i}"
        try:
            card = load_card(entry.task)
        except UserError as exc:
            raise UserError(f"{where}.task: {exc}") from None
        card = card.with_sampling(
            temperature=entry.temperature, top_p=entry.top_p, max_tokens=entry.max_tokens,
            samples=entry.planned_samples,
        )
        questions = load_questions(card, data_dir)
        limit = auto_limit(config, entry, card.sampling.samples, where) if entry.limit == "auto" else entry.limit
        questions = select_questions(card, questions, limit=limit, subjects=entry.subjects, where=where,
                                     offset=entry.offset, max_question_chars=entry.max_question_chars)
        plans.append(build_task_plan(card, questions, samples=card.sampling.samples, seed=entry.seed))
    return config, plans


def auto_limit(config: RunConfig, entry: TaskEntry, samples: int, where: str) -> int:
    """`limit: auto`: the questions a one-sample task needs for its gate margin at planning.power (a candidate
    as good as the baseline passes with that probability), from the paired difference's variance: the stated
    discordance, else 2 p (1 - p) at the stated prior accuracy, else the worst case p = 0.5."""
    if samples != 1:
        raise UserError(f"{where}.limit: 'auto' chooses questions for one-sample tasks (log-likelihood or greedy); "
                        f"this task takes {samples} samples: set limit and let `evalpipe plan` choose samples")
    assert config.gate is not None  # the config refuses limit: auto without a gate
    rule, planning = config.gate.for_task(entry.task), config.planning
    if entry.task in planning.discordance:
        variance = planning.discordance[entry.task]
        source = f"stated discordance {100 * variance:.1f}%"
    else:
        p = planning.accuracy.get(entry.task, 0.5)
        variance = 2 * p * (1 - p)
        source = (f"two independent sides at the stated prior {100 * p:.1f}%" if entry.task in planning.accuracy
                  else "worst case, two independent sides at p = 0.5")
    if rule.margin <= 0:
        raise UserError(f"{where}.limit: 'auto' needs a positive gate margin for {entry.task}")
    needed = questions_needed(rule.margin, variance, alpha=rule.alpha, power=planning.power)
    if needed is None:
        raise UserError(f"{where}.limit: no number of questions reaches margin {100 * rule.margin:.1f} pts")
    log.info("%s.limit: auto -> %d questions (margin %.1f pts, alpha %g, power %g; variance %.3f: %s%s)", where,
             needed, 100 * rule.margin, rule.alpha, planning.power, variance, source,
             f", {planning.source}" if planning.source else "")
    return needed


def data_source(config: RunConfig) -> str:
    data_dir = resolve_data_dir(config.data_dir)
    return str(data_dir) if data_dir else "hub"


# ---------------------------------------------------------------------------------------------------------
# One request -> one record


def generation_params(plan: TaskPlan, model: str, request: SampleRequest) -> GenerationParams:
    s = plan.card.sampling
    return GenerationParams(model=model, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                            seed=request.seed)


def is_loglikelihood(plan: TaskPlan) -> bool:
    return plan.card.scoring.method == "loglikelihood"


def loglikelihood_prompts(request: SampleRequest) -> list[str]:
    """One prompt per option: the context (the rendered user turn, sent as plain text) then its continuation."""
    context = request.messages[-1]["content"]
    return [context + continuation for continuation in request.continuations]


async def send(pool: EndpointPool, model: str, plan: TaskPlan, request: SampleRequest) -> Outcome:
    if is_loglikelihood(plan):
        return await pool.prompt_logprobs(model, loglikelihood_prompts(request), top_k=1)
    return await pool.complete(list(request.messages), generation_params(plan, model, request))


def _loglikelihood_fields(request: SampleRequest, body: dict[str, Any]) -> dict[str, Any]:
    """The scored fields of a log-likelihood answer (`body`: one echoed choice per option, in letter order)."""
    try:
        read = [continuation_logprob(choice["logprobs"], continuation)
                for choice, continuation in zip(body["choices"], request.continuations, strict=True)]
    except ValueError as exc:
        return {"outcome": "error", "error": f"cannot score the options: {exc}"}
    option_logprobs = [lp for lp, _ in read]
    best, best_norm = loglikelihood_choice(option_logprobs, list(request.continuations))
    letter = request.letters[best]
    return {
        "extracted": letter, "extracted_norm": request.letters[best_norm], "rule": LOGLIKELIHOOD_RULE,
        "outcome": "correct" if letter == request.gold else "wrong", "option_logprobs": option_logprobs,
        "finish_reason": "stop",
        # the longest prompt echoed (context and continuation), as the context check expects one prompt's tokens
        "usage": Usage(prompt_tokens=max(tokens for _, tokens in read)),
    }


def to_record(plan: TaskPlan, request: SampleRequest, outcome: Outcome) -> SampleRecord:
    common = dict(
        task=request.task, card_hash=request.card_hash, question_id=request.question_id,
        sample_index=request.sample_index, seed=request.seed, gold=request.gold, latency_s=round(outcome.latency_s, 4),
        attempts=outcome.attempts, replica=outcome.replica, prompt_hash=request.prompt_hash, labels=request.labels,
    )
    if outcome.body is not None and is_loglikelihood(plan):
        return SampleRecord(**common, **_loglikelihood_fields(request, outcome.body))
    c = outcome.completion
    if c is None:
        return SampleRecord(**common, outcome="error", error=outcome.error)
    scoring = plan.card.scoring
    score = score_response(answer_type=scoring.answer_type, ladder=scoring.extract, gold=request.gold,
                           content=c.content, finish_reason=c.finish_reason, letters=request.letters)
    return SampleRecord(
        **common, content=c.content, reasoning=c.reasoning, finish_reason=c.finish_reason,
        usage=Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                    reasoning_tokens=c.reasoning_tokens),
        extracted=score.extracted, rule=score.rule, outcome=score.outcome,
    )


async def run_requests(
    pool: EndpointPool,
    model: str,
    work: Sequence[tuple[TaskPlan, SampleRequest]],
    concurrency: int,
    on_record: Callable[[SampleRecord, Outcome], None],
) -> None:
    """Send every request with at most `concurrency` in flight; `on_record` sees each as it finishes."""
    queue = iter(work)

    async def worker() -> None:
        for plan, request in queue:  # one shared iterator: each request is taken by exactly one worker
            outcome = await send(pool, model, plan, request)
            on_record(to_record(plan, request, outcome), outcome)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(work)))))


# ---------------------------------------------------------------------------------------------------------
# Preflight


@dataclass
class ServerInfo:
    model_ids: list[str]
    max_model_len: int | None


async def check_endpoint(pool: EndpointPool, side: str, spec: ServedSide, plans: Sequence[TaskPlan]) -> ServerInfo:
    """GET /v1/models on every replica: reachable, serving the model, and with room for max_tokens."""
    lengths = []
    ids: list[str] = []
    for replica in pool.replicas:
        try:
            models = await pool.list_models(replica)
        except Exception as exc:  # noqa: BLE001 - any failure here means the endpoint is not usable
            raise EndpointError(
                f"{side}: cannot reach {replica.url}/models ({type(exc).__name__}: {exc}); is the server up?"
            ) from None
        ids = [str(m.get("id")) for m in models]
        entry = next((m for m in models if m.get("id") == spec.model), None)
        if entry is None:
            raise UserError(f"{side}.model: '{spec.model}' is not served at {replica.url} (it serves: {ids})")
        for name in ("max_model_len", "context_length", "max_context_length"):
            if isinstance(entry.get(name), int):
                lengths.append(entry[name])
                break
    max_len = min(lengths) if lengths else None
    if max_len is not None:
        for plan in plans:
            if plan.card.sampling.max_tokens >= max_len:
                raise UserError(
                    f"{plan.name}: max_tokens {plan.card.sampling.max_tokens} does not fit the server's context "
                    f"of {max_len} tokens (max_model_len); lower max_tokens or serve with a longer context"
                )
    return ServerInfo(model_ids=ids, max_model_len=max_len)


def check_context(plan: TaskPlan, pilot: Sequence[SampleRecord], max_len: int) -> None:
    """Estimate the longest prompt from the pilot's tokens per character and check prompt + max_tokens fits."""
    measured = [(r.usage.prompt_tokens, r.prompt_hash) for r in pilot if r.usage.prompt_tokens]
    if not measured:
        return
    chars_of = {r.prompt_hash: r.prompt_chars for r in plan.requests}
    tokens_per_char = max(tokens / max(chars_of.get(h, 1), 1) for tokens, h in measured)
    longest = max(r.prompt_chars for r in plan.requests)
    estimate = int(longest * tokens_per_char) + 1
    if estimate + plan.card.sampling.max_tokens > max_len:
        raise UserError(
            f"{plan.name}: the longest prompt (~{estimate} tokens, estimated from the pilot) plus max_tokens "
            f"{plan.card.sampling.max_tokens} exceeds the server's max_model_len {max_len}; lower max_tokens "
            f"or serve with a longer context"
        )


def check_pilot(plan: TaskPlan, pilot: Sequence[SampleRecord], outcomes: Sequence[Outcome], config: RunConfig,
                where: str) -> None:
    if not pilot:
        return
    failed = [(r, o) for r, o in zip(pilot, outcomes, strict=True) if r.outcome == "error"]
    if len(failed) == len(pilot):
        record, outcome = failed[0]
        if outcome.fatal_status is not None:
            raise UserError(f"preflight: every pilot request of {plan.name} was refused: {record.error}")
        raise EndpointError(f"preflight: every pilot request of {plan.name} failed: {record.error}")
    answered = [r for r in pilot if r.outcome != "error"]
    truncated = sum(r.outcome == "truncated" for r in answered)
    limit = config.preflight.max_truncation_rate
    if limit is not None and truncated / len(answered) > limit:
        raise UserError(
            f"preflight: {truncated} of {len(answered)} pilot answers of {plan.name} hit max_tokens="
            f"{plan.card.sampling.max_tokens} (truncation rate {truncated / len(answered):.0%} > "
            f"preflight.max_truncation_rate {limit:.0%}). Truncated answers score as not correct, so this run "
            f"would understate accuracy: raise {where}.max_tokens (the R1 protocol uses 32768) or, to accept it, "
            f"raise preflight.max_truncation_rate"
        )


async def preflight_side(
    pool: EndpointPool, side: str, spec: ServedSide, plans: Sequence[TaskPlan], config: RunConfig,
    done: set[tuple[str, str, int]],
) -> list[SampleRecord]:
    """Endpoint checks, then a pilot batch per task (its first pending requests). Returns the pilot records
    (part of the run); raises UserError / EndpointError to abort before anything is written."""
    info = await check_endpoint(pool, side, spec, plans)
    if not config.preflight.enabled:
        return []
    work = []
    for plan in plans:
        pending = [r for r in plan.requests if r.key not in done]
        work += [(plan, r) for r in pending[: config.preflight.pilot_samples]]
    results: list[tuple[SampleRecord, Outcome]] = []
    await run_requests(pool, spec.model, work, config.concurrency, lambda rec, out: results.append((rec, out)))
    for i, plan in enumerate(plans):
        mine = [(r, o) for r, o in results if r.task == plan.name]
        check_pilot(plan, [r for r, _ in mine], [o for _, o in mine], config, f"tasks.{i}")
        if info.max_model_len:
            check_context(plan, [r for r, _ in mine], info.max_model_len)
    return [r for r, _ in results]


# ---------------------------------------------------------------------------------------------------------
# Run directory


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def resolved_config(config: RunConfig, plans: Sequence[TaskPlan], run_id: str) -> dict[str, Any]:
    """The config as run: defaults filled in, secrets removed, each task's protocol and card hash."""
    raw = config.model_dump(mode="json")
    for side, _ in sides_of(config):
        if raw[side].get("api_key"):
            raw[side]["api_key"] = "***"
    raw["resolved"] = {
        "run_id": run_id,
        "evalpipe_version": __version__,
        "data_source": data_source(config),
        "tasks": {
            p.name: {"card_hash": p.card_hash, "samples": p.samples, "seed": p.seed, "n_questions": len(p.questions),
                     "sampling": p.card.sampling.model_dump()}
            for p in plans
        },
    }
    return raw


def write_resolved_config(run_dir: Path, config: RunConfig, plans: Sequence[TaskPlan], run_id: str) -> None:
    write_config_file(run_dir, resolved_config(config, plans, run_id))


def new_run_dir(config: RunConfig) -> Path:
    """Where a new run goes: <output_dir>/<name>/<run_id> (not created here)."""
    return Path(config.output_dir) / config.name / new_run_id()


def create_run_dir(config: RunConfig, plans: Sequence[TaskPlan], run_dir: Path | None = None) -> Path:
    """Create the run dir (a new one, or `run_dir`, which may exist already holding only server logs) and write
    the resolved config into it."""
    run_dir = run_dir or new_run_dir(config)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / RESOLVED_CONFIG).exists():
            raise UserError(f"output_dir: {run_dir} already holds a run")
        write_resolved_config(run_dir, config, plans, run_dir.name)
    except OSError as exc:
        raise UserError(f"output_dir: cannot create the run directory {run_dir}: {exc.strerror or exc}") from None
    return run_dir


def load_resumable(run_dir: Path, config: RunConfig, plans: Sequence[TaskPlan], side: str) -> list[SampleRecord]:
    """Records already in a run being resumed, after checking the config still describes the same run."""
    if not (run_dir / RESOLVED_CONFIG).is_file():
        raise UserError(f"--resume: {run_dir} is not an evalpipe run directory (no {RESOLVED_CONFIG})")
    saved = read_resolved_config(run_dir)
    problems = []
    if saved.get(side, {}).get("model") != getattr(config, side).model:
        problems.append(f"{side}.model was '{saved.get(side, {}).get('model')}'")
    saved_tasks = saved.get("resolved", {}).get("tasks", {})
    for plan in plans:
        before = saved_tasks.get(plan.name)
        if before is None:
            continue
        if before["card_hash"] != plan.card_hash:
            problems.append(f"{plan.name}: protocol changed (card_hash {before['card_hash']} -> {plan.card_hash}; "
                            f"sampling was {before.get('sampling')})")
        if before["seed"] != plan.seed:
            problems.append(f"{plan.name}: seed was {before['seed']}")
    if problems:
        raise UserError(f"--resume: the config does not match the run in {run_dir}: " + "; ".join(problems))
    return read_journal(journal_path(run_dir, side), repair=True)


def answered_keys(records: Sequence[SampleRecord]) -> set[tuple[str, str, int]]:
    """Keys that need no new request: their latest record is not a transport error."""
    return {key for key, r in latest_by_key(list(records)).items() if r.outcome != "error"}


# ---------------------------------------------------------------------------------------------------------
# Evaluate a side


async def evaluate_side(
    pool: EndpointPool,
    spec: ServedSide,
    plans: Sequence[TaskPlan],
    config: RunConfig,
    journal_path: Path,
    done: set[tuple[str, str, int]],
    pilot: Sequence[SampleRecord],
    on_record: Callable[[SampleRecord], None],
) -> None:
    """Journal the pilot records, then send every request whose key is neither done nor piloted."""
    with JournalWriter(journal_path) as journal:
        for record in pilot:
            journal.append(record)
            on_record(record)
        skip = done | {r.key for r in pilot}
        work = [(p, r) for p in plans for r in p.requests if r.key not in skip]
        by_sample = sorted(range(len(work)), key=lambda i: work[i][1].sample_index)  # sample-major across tasks

        def record_done(record: SampleRecord, _: Outcome) -> None:
            journal.append(record)
            on_record(record)

        await run_requests(pool, spec.model, [work[i] for i in by_sample], config.concurrency, record_done)


# ---------------------------------------------------------------------------------------------------------
# A whole run


def sides_of(config: RunConfig) -> list[tuple[str, ServedSide]]:
    """The sides a config evaluates, each on the same plan: the candidate and a live baseline endpoint (a
    stored `registry:` baseline is not evaluated)."""
    sides = [(CANDIDATE, config.candidate)]
    if isinstance(config.baseline, ServedSide):
        sides.append((BASELINE, config.baseline))
    return sides


@dataclass
class RunResult:
    run_dir: Path
    sides: dict[str, tuple[dict[str, Any], dict[str, Any]]]  # side -> (summary.json, details.json)
    warnings: list[str]
    exit_code: int


# Stages of a run: given the run dir, yields the plans (cut to the requests wanted) to evaluate in turn; each is
# computed after the previous stage's samples are journaled (adaptive sampling, evalpipe.adaptive_stages).
Stages = Callable[[Path], Iterable[list[TaskPlan]]]


async def execute_run(
    config: RunConfig, plans: list[TaskPlan], config_path: str, resume: Path | None, show_progress: bool,
    stages: Stages | None = None, new_dir: Path | None = None,
) -> RunResult:
    """Preflight every side, then evaluate each into the run dir and write its results and report.md.

    Without `stages` the whole plan is one stage. A new run goes to `new_dir` when given (evalpipe.launch has
    put the server logs there), else to a fresh directory."""
    sides = sides_of(config)
    pools = {name: EndpointPool(spec.urls, spec.api_key, config.client) for name, spec in sides}
    done: dict[str, set[tuple[str, str, int]]] = {}
    pilots: dict[str, list[SampleRecord]] = {}
    try:
        for name, _ in sides:
            done[name] = answered_keys(load_resumable(resume, config, plans, name) if resume else [])

        async def preflight(name: str, spec: ServedSide) -> list[SampleRecord]:
            if resume:  # the pilot ran when the run started; only check the endpoint again
                await check_endpoint(pools[name], name, spec, plans)
                return []
            return await preflight_side(pools[name], name, spec, plans, config, done[name])

        # Sides run at the same time (each has its own server); a failure is reported for the first side in order.
        checked = await asyncio.gather(*(preflight(name, spec) for name, spec in sides), return_exceptions=True)
        for (name, _), outcome in zip(sides, checked, strict=True):
            if isinstance(outcome, BaseException):
                raise outcome
            pilots[name] = outcome
        if resume:  # record tasks or samples the config may have added since
            write_resolved_config(resume, config, plans, saved_run_id(resume))
        run_dir = resume or create_run_dir(config, plans, new_dir)
        log.info("run dir: %s", run_dir)
        for stage in stages(run_dir) if stages else [plans]:
            with RunProgress(stage, [name for name, _ in sides], enabled=show_progress) as bar:
                for name, _ in sides:
                    for plan in stage:
                        bar.already_done(name, plan.name, sum(r.key in done[name] for r in plan.requests))
                await asyncio.gather(*(
                    evaluate_side(pools[name], spec, stage, config, journal_path(run_dir, name), done[name],
                                  pilots[name], functools.partial(bar.advance, name))
                    for name, spec in sides))
            for name, _ in sides:
                # issued now, answered or not: a later stage must not send them again
                done[name] |= {r.key for p in stage for r in p.requests} | {r.key for r in pilots[name]}
                pilots[name] = []
        sent = {name: {r.url: r.sent for r in pool.replicas} for name, pool in pools.items()}
    finally:
        for pool in pools.values():
            await pool.aclose()

    run_id = saved_run_id(run_dir)
    results, warnings, all_failed = {}, [], True
    for name, spec in sides:
        records = read_journal(journal_path(run_dir, name))
        endpoint = {"model": spec.model, "base_url": spec.urls, "concurrency": config.concurrency,
                    "requests_sent_this_invocation": sent[name]}
        results[name] = write_side_results(run_dir, name, records, plans, run_id=run_id, config_name=config.name,
                                           label=spec.label, endpoint=endpoint)
        warnings += [f"{name}: {w}" for w in truncation_warnings(results[name][0], plans)]
        latest = latest_by_key(records)
        all_failed &= bool(latest) and all(r.outcome == "error" for r in latest.values())
    (run_dir / REPORT).write_text(
        report_markdown(config_name=config.name, run_dir=run_dir, sides=results, warnings=warnings,
                        config_path=config_path),
        encoding="utf-8",
    )
    return RunResult(run_dir, results, warnings, EndpointError.exit_code if all_failed else 0)


def write_side_results(
    run_dir: Path, side: str, records: Sequence[SampleRecord], plans: Sequence[TaskPlan], *, run_id: str, config_name: str,
    label: str, endpoint: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """summary.json and details.json of a side, computed from its whole journal."""
    summary, details = summarize_side(records, plans, run_id=run_id, config_name=config_name, label=label,
                                      extra_details={"endpoint": endpoint})
    write_file(summary_path(run_dir, side), SideSummary.model_validate(summary))
    write_file(details_path(run_dir, side), SideDetails.model_validate(details))
    return summary, details
