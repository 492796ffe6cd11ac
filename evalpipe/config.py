"""Run configuration (`evalpipe run CONFIG`), validated with pydantic; every error names its field path.

Relative paths (output_dir, data_dir) are relative to the working directory the command runs in. String values
may refer to environment variables as ${VAR} or ${VAR:-default}.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from evalpipe.adaptive import SpendingShape
from evalpipe.errors import UserError
from evalpipe.validation import read_yaml, validated


# ---------------------------------------------------------------------------------------------------------
# The gate's settings (`gate:`; evalpipe.gate applies them)

# truncation_margin: a fraction, "margin" (the task's accuracy margin) or "off" (YAML's bare `off` reads as false).
TruncationMargin = Annotated[float, Field(ge=0.0, le=1.0)] | Literal["margin", "off"]


DIVERGENCE = "divergence"  # the task name of the teacher-forced divergence probe


def _off(value: object) -> object:
    return "off" if value is False else value


class GateOverride(BaseModel):
    """Per-task settings that replace the gate-wide ones."""

    model_config = ConfigDict(extra="forbid")

    margin: float | None = Field(default=None, ge=0.0, le=1.0)
    alpha: float | None = Field(default=None, gt=0.0, lt=1.0)
    on_inconclusive: Literal["fail", "pass"] | None = None
    on_uninformative: Literal["fail", "pass"] | None = None
    truncation_margin: TruncationMargin | None = None
    max_truncation_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    max_error_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    max_kld: float | None = Field(default=None, ge=0.0)
    min_top1_agreement: float | None = Field(default=None, ge=0.0, le=1.0)

    _truncation_off = field_validator("truncation_margin", mode="before")(_off)


RULE_FIELDS = ("margin", "alpha", "on_inconclusive", "on_uninformative", "truncation_margin", "max_truncation_rate",
               "max_error_rate", "max_kld", "min_top1_agreement")
DIVERGENCE_FIELDS = ("max_kld", "min_top1_agreement")
# Settings `evalpipe gate` / `compare` may replace from the command line (recorded as overrides).
COMMAND_LINE_FIELDS = ("margin", "alpha", "on_inconclusive")


@dataclass(frozen=True)
class TaskGate:
    margin: float
    alpha: float
    on_inconclusive: Literal["fail", "pass"]
    max_truncation_rate: float | None  # optional hard cap on each side's observed rate (None: none)
    max_error_rate: float
    max_kld: float | None = None  # the divergence task's limits (None: not gated on that statistic)
    min_top1_agreement: float | None = None
    on_uninformative: Literal["fail", "pass"] | None = None  # None: as on_inconclusive
    truncation_margin: float | None = None  # resolved: None means the truncation test is off

    @property
    def uninformative_counts_as(self) -> Literal["fail", "pass"]:
        return self.on_uninformative or self.on_inconclusive


class GateConfig(BaseModel):
    """Config `gate:`. margin is an absolute accuracy drop as a fraction (0.05 = 5 points).

    truncation_margin: how many points more truncation than the baseline the candidate may have ("margin":
    the task's accuracy margin; "off": reported, not gated), judged by a one-sided test at alpha.
    max_truncation_rate: an optional hard cap on each side's observed truncation rate (off by default: an
    observed rate is noisy). identical_pass_rate: the design target for P(exit 0 | candidate identical to the
    baseline); `evalpipe plan` splits it over the tasks and checks it by simulation (it decides nothing).
    """

    model_config = ConfigDict(extra="forbid")

    margin: float = Field(default=0.05, ge=0.0, le=1.0)
    alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    on_inconclusive: Literal["fail", "pass"] = "fail"
    on_uninformative: Literal["fail", "pass"] | None = Field(
        default=None, description="how a task with both sides at 0% (or 100%) counts; default: as on_inconclusive")
    truncation_margin: TruncationMargin = "margin"
    max_truncation_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    max_error_rate: float = Field(default=0.02, ge=0.0, le=1.0)
    identical_pass_rate: float = Field(default=0.95, gt=0.0, lt=1.0,
                                       description="design target: P(exit 0) for a candidate identical to the "
                                                   "baseline, checked by `evalpipe plan`")
    max_kld: float | None = Field(default=None, ge=0.0, description="divergence: mean KL divergence limit (nats)")
    min_top1_agreement: float | None = Field(default=None, ge=0.0, le=1.0,
                                             description="divergence: lowest share of positions with the same top-1")
    tasks: dict[str, GateOverride] = Field(default_factory=dict)

    _truncation_off = field_validator("truncation_margin", mode="before")(lambda value: "off" if value in (False, None)
                                                                          else value)

    def for_task(self, task: str) -> TaskGate:
        override = self.tasks.get(task, GateOverride())
        chosen = {
            name: getattr(override, name) if getattr(override, name) is not None else getattr(self, name)
            for name in RULE_FIELDS
        }
        truncation = chosen["truncation_margin"]
        chosen["truncation_margin"] = (chosen["margin"] if truncation == "margin" else
                                       None if truncation == "off" else float(truncation))
        return TaskGate(**chosen)

    def divergence_keys(self) -> list[str]:
        """The divergence limits set anywhere in this gate."""
        sections = [self, *self.tasks.values()]
        return [name for name in DIVERGENCE_FIELDS if any(getattr(s, name) is not None for s in sections)]


# ---------------------------------------------------------------------------------------------------------
# The run config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LaunchSpec(_Strict):
    """A server the orchestrator starts for a side (evalpipe.launch): on a free loopback port, its log in the run
    dir, stopped when the run ends, fails or is interrupted."""

    engine: Literal["evalpipe", "sglang", "vllm"] = "evalpipe"
    model: str = Field(min_length=1, description="checkpoint directory (or hub id, for sglang / vllm)")
    tp: int = Field(default=1, ge=1, le=64, description="tensor-parallel ranks")
    args: list[str] = Field(default_factory=list, description="extra command-line arguments, appended")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables")
    python: str | None = Field(default=None, description="interpreter that runs the server (default: this one)")
    startup_timeout: float = Field(default=600.0, gt=0, description="seconds to wait for the server to be healthy")


class ServedSide(_Strict):
    """A side served over the OpenAI API: already running at `base_url` (one URL or a list of replicas of one
    model), or started by the orchestrator from `launch:` (evalpipe.launch fills base_url in once it is up).
    """

    label: str = Field(min_length=1)
    model: str = Field(min_length=1, description="the model id the server lists (a launched server serves it so)")
    base_url: list[str] | None = None
    launch: LaunchSpec | None = None
    api_key: str | None = None
    quantization: str | None = Field(default=None, description="e.g. fp8-block, w4afp8 (leaderboard column)")
    engine: str | None = Field(default=None, description="e.g. sglang 0.5.2, TP8 (leaderboard column)")

    @model_validator(mode="before")
    @classmethod
    def _endpoint_given(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = [key for key in ("base_url", "launch") if data.get(key) is not None]
            if not given:
                raise ValueError("give base_url (the server's OpenAI-compatible /v1 URL, or a list of replicas) "
                                 "or launch: (a server for evalpipe to start)")
            if len(given) == 2:
                raise ValueError("give either base_url or launch:, not both")
        return data

    @field_validator("base_url", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("base_url")
    @classmethod
    def _http_urls(cls, urls: list[str] | None) -> list[str] | None:
        if urls is None:
            return None
        if not urls:
            raise ValueError("give at least one URL")
        for url in urls:
            if not re.match(r"^https?://[^/\s]+", url):
                raise ValueError(f"'{url}' is not an http(s) URL")
        if len(set(urls)) != len(urls):
            raise ValueError("replica URLs must be distinct")
        return [u.rstrip("/") for u in urls]

    @property
    def urls(self) -> list[str]:
        """The endpoint URLs; a launched side has them only once its server is up (evalpipe.launch)."""
        if self.base_url is None:
            raise RuntimeError(f"side {self.label!r}: its server has not been launched")
        return self.base_url


REGISTRY_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class RegistrySide(_Strict):
    """A stored baseline (`evalpipe baseline save`): only the candidate is evaluated, against its outcomes."""

    registry: str = Field(pattern=REGISTRY_NAME)
    registry_dir: str = "results/baselines"


def _side_kind(data: Any) -> str:
    if isinstance(data, RegistrySide) or (isinstance(data, dict) and "registry" in data):
        return "registry"
    return "endpoint"


# Error paths read baseline.endpoint.<field> or baseline.registry.<field>.
BaselineSide = Annotated[
    Annotated[ServedSide, Tag("endpoint")] | Annotated[RegistrySide, Tag("registry")], Discriminator(_side_kind)
]

DEFAULT_MIN_SAMPLES, DEFAULT_MAX_SAMPLES = 4, 32
DEFAULT_SPENDING: SpendingShape = "obrien-fleming"


class TaskEntry(_Strict):
    """One task of the run; unset sampling fields take the card's defaults.

    `samples: auto` samples adaptively between min_samples and max_samples (see evalpipe.adaptive).
    """

    task: str
    samples: int | Literal["auto"] | None = None
    min_samples: int | None = Field(default=None, ge=2)
    max_samples: int | None = Field(default=None, ge=2)
    spending: SpendingShape | None = None  # the alpha-spending shape of samples: auto (evalpipe.adaptive)
    max_tokens: int | None = Field(default=None, ge=1)
    # `limit: auto` (one-sample tasks): as many questions as the gate's margin needs at planning.power
    # (evalpipe.stats.questions_needed, with the variance from planning.discordance or planning.accuracy)
    limit: int | Literal["auto"] | None = None
    # skip this many questions of the fixed order (after `subjects`) before `limit`: a later run extends an
    # earlier prefix without repeating it
    offset: int = Field(default=0, ge=0)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0)
    subjects: list[str] | None = Field(default=None, min_length=1)
    # keep only questions whose text and options have at most this many characters (before offset and limit):
    # shorter prompts, cheaper questions, chosen by length alone and never by any model's answers
    max_question_chars: int | None = Field(default=None, ge=1)

    @field_validator("samples", mode="before")
    @classmethod
    def _count_or_auto(cls, value: Any) -> Any:
        count = isinstance(value, int) and not isinstance(value, bool)
        if count and value < 1:
            raise PydanticCustomError("greater_than_equal", "Input should be greater than or equal to 1")
        if value is None or value == "auto" or count:
            return value
        raise PydanticCustomError("samples", "Input should be a positive integer or 'auto', got {value}",
                                  {"value": repr(value)})

    @model_validator(mode="before")
    @classmethod
    def _auto_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("samples") == "auto":
            data = {"min_samples": DEFAULT_MIN_SAMPLES, "max_samples": DEFAULT_MAX_SAMPLES,
                    "spending": DEFAULT_SPENDING, **data}
        return data

    @field_validator("limit", mode="before")
    @classmethod
    def _limit_count_or_auto(cls, value: Any) -> Any:
        count = isinstance(value, int) and not isinstance(value, bool)
        if value is None or value == "auto" or (count and value >= 1):
            return value
        raise PydanticCustomError("limit", "Input should be a positive integer or 'auto', got {value}",
                                  {"value": repr(value)})

    @model_validator(mode="after")
    def _adaptive_bounds(self) -> TaskEntry:
        if self.samples != "auto":
            if self.min_samples is not None or self.max_samples is not None or self.spending is not None:
                raise ValueError("min_samples, max_samples and spending apply only with samples: auto")
        elif self.max_samples < self.min_samples:
            raise ValueError(f"max_samples ({self.max_samples}) is below min_samples ({self.min_samples})")
        return self

    @property
    def adaptive(self) -> bool:
        return self.samples == "auto"

    @property
    def planned_samples(self) -> int | None:
        """Samples per question the plan holds (the most an adaptive task may use); None: the card's."""
        return self.max_samples if self.adaptive else self.samples


class DivergenceEntry(_Strict):
    """The teacher-forced divergence probe (evalpipe.divergence_probe): the baseline's own generations scored on both
    servers through /v1/completions with echo and top-k prompt logprobs."""

    task: Literal["divergence"]
    from_registry: str | None = Field(default=None, pattern=REGISTRY_NAME,
                                      description="take the generations stored with this registry baseline")
    registry_dir: str = "results/baselines"
    null: str | None = Field(default=None, pattern=REGISTRY_NAME,
                             description="registry baseline whose calibrated divergence null (evalpipe baseline "
                                         "calibrate-divergence) is shown with the result and sets the default "
                                         "max_kld: the null's quantile at this probe's size plus its tolerance")
    tasks: list[str] | None = Field(default=None, min_length=1,
                                    description="whose generations (default: every task of the source)")
    limit: int = Field(default=32, ge=1, description="generations scored")
    max_tokens: int = Field(default=1024, ge=1, description="generated tokens scored per generation, at most")
    top_logprobs: int = Field(default=20, ge=1, le=20, description="alternatives per position (k)")
    tokenizer: str | None = Field(default=None, description="renders the chat prompt; default: the baseline's "
                                                            "launched model")
    bootstrap: int = Field(default=1000, ge=100, description="bootstrap resamples of the generations (p99 KL)")
    seed: int = Field(default=0, ge=0)


def _task_kind(data: Any) -> str:
    task = data.task if isinstance(data, (TaskEntry, DivergenceEntry)) else (data or {}).get("task")
    return "<divergence>" if task == DIVERGENCE else "<card>"


# The tags route validation only; error paths read tasks.<i>.<field> (evalpipe.validation).
AnyTaskEntry = Annotated[
    Annotated[TaskEntry, Tag("<card>")] | Annotated[DivergenceEntry, Tag("<divergence>")], Discriminator(_task_kind)
]


class ClientConfig(_Strict):
    stream: bool = True
    stall_timeout: float = Field(default=300.0, gt=0, description="seconds without a token before a retry")
    total_timeout: float = Field(default=3600.0, gt=0, description="seconds for one attempt, whole generation")
    connect_timeout: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=6, ge=0)
    backoff_initial: float = Field(default=1.0, ge=0)
    backoff_max: float = Field(default=60.0, ge=0)
    replica_failure_limit: int = Field(default=3, ge=1, description="consecutive failures that set a replica aside")
    replica_cooldown: float = Field(default=30.0, ge=0, description="seconds a set-aside replica rests (doubles)")


class PreflightConfig(_Strict):
    enabled: bool = True
    pilot_samples: int = Field(default=4, ge=1, description="pilot requests per task before the run proper")
    max_truncation_rate: float | None = Field(default=0.5, ge=0.0, le=1.0)


class PlanningConfig(_Strict):
    """Assumptions `evalpipe plan` (and the operating characteristics stated with every run) use where no baseline
    data exist; the output names them. With a registry entry or an earlier run, its measurements are used."""

    source: str | None = Field(default=None, description="where the prior accuracies come from (cited in the plan)")
    accuracy: dict[str, float] = Field(default_factory=dict,
                                       description="per task: the baseline's expected accuracy, a fraction")
    truncation_rate: float = Field(default=0.04, ge=0.0, le=1.0,
                                   description="truncation assumed on both sides when none is measured")
    discordance: dict[str, float] = Field(
        default_factory=dict, description="per one-sample task: the expected share of questions the candidate and "
                                          "the baseline answer differently (what `limit: auto` plans with)")
    power: float = Field(default=0.8, gt=0.0, lt=1.0,
                         description="limit: auto: P(pass) for a candidate as good as the baseline")

    @field_validator("accuracy", "discordance")
    @classmethod
    def _fractions(cls, accuracy: dict[str, float]) -> dict[str, float]:
        bad = {task: value for task, value in accuracy.items() if not 0.0 <= value <= 1.0}
        if bad:
            raise ValueError(f"accuracies are fractions in [0, 1], got {bad}")
        return accuracy


class RunConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output_dir: str = "results/runs"
    data_dir: str | None = None
    concurrency: int = Field(default=64, ge=1, le=4096)
    candidate: ServedSide
    baseline: BaselineSide | None = None
    tasks: list[AnyTaskEntry] = Field(min_length=1)
    gate: GateConfig | None = None
    leaderboard: str | None = Field(default=None, description="results folder whose leaderboard.md/.html are "
                                                              "rewritten after the run")
    client: ClientConfig = Field(default_factory=ClientConfig)
    preflight: PreflightConfig = Field(default_factory=PreflightConfig)
    planning: PlanningConfig = Field(default_factory=PlanningConfig)

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[TaskEntry]) -> list[TaskEntry]:
        names = [t.task for t in tasks]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"task(s) listed twice: {duplicated}")
        return tasks

    @model_validator(mode="after")
    def _comparison_settings(self) -> RunConfig:
        names = [t.task for t in self.tasks]
        for i, entry in enumerate(self.tasks):
            if isinstance(entry, DivergenceEntry):
                self._check_divergence(i, entry)
            elif entry.adaptive and self.baseline is None:
                raise ValueError(f"tasks.{i}.samples: 'auto' needs a baseline (its verdict decides when to stop)")
        for field in ("accuracy", "discordance"):
            unknown_prior = sorted(set(getattr(self.planning, field)) - set(names))
            if unknown_prior:
                raise ValueError(f"planning.{field}: {unknown_prior} are not tasks of this run ({names})")
        for i, entry in enumerate(self.tasks):
            if isinstance(entry, TaskEntry) and entry.limit == "auto" and self.gate is None:
                raise ValueError(f"tasks.{i}.limit: 'auto' plans for the gate's margin; add gate:")
        if self.gate is not None:
            if self.baseline is None:
                raise ValueError("gate: needs a baseline to compare against (add baseline:)")
            unknown = sorted(set(self.gate.tasks) - set(names))
            if unknown:
                raise ValueError(f"gate.tasks: {unknown} are not tasks of this run ({names})")
            if self.divergence is None and self.gate.divergence_keys():
                raise ValueError(f"gate: {self.gate.divergence_keys()} apply to the divergence task, which this run "
                                 "does not have (add `- task: divergence` to tasks)")
        return self

    def _check_divergence(self, index: int, entry: DivergenceEntry) -> None:
        if not isinstance(self.baseline, ServedSide):
            raise ValueError(f"tasks.{index}: the divergence probe scores on both servers; the baseline must be a "
                             "live endpoint (base_url or launch:), not a registry entry")
        if entry.from_registry is None:
            if not self.card_tasks:
                raise ValueError(f"tasks.{index}: the divergence probe needs generations: add an accuracy task "
                                 "(the baseline's answers are scored) or set from_registry")
            unknown = sorted(set(entry.tasks or ()) - {t.task for t in self.card_tasks})
            if unknown:
                raise ValueError(f"tasks.{index}.tasks: {unknown} are not accuracy tasks of this run")

    @property
    def card_tasks(self) -> list[TaskEntry]:
        """The accuracy tasks (protocol cards), in config order."""
        return [t for t in self.tasks if isinstance(t, TaskEntry)]

    @property
    def divergence(self) -> DivergenceEntry | None:
        return next((t for t in self.tasks if isinstance(t, DivergenceEntry)), None)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, path: str = "") -> Any:
    """Replace ${VAR} and ${VAR:-default} in string values (e.g. base_url, api_key) from the environment."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{path}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise UserError(
                f"{path}: environment variable {name} is not set (write ${{{name}:-default}} for a default)"
            )
        return default

    return _ENV_REF.sub(substitute, value)


def parse_config(raw: Any, source: str) -> RunConfig:
    return validated(RunConfig, expand_env(raw) if isinstance(raw, dict) else raw, source)


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    return parse_config(read_yaml(path), str(path))
