"""Run configuration (`evalpipe run CONFIG`), validated with pydantic; every error names its field path.

Relative paths (output_dir, data_dir) are relative to the working directory the command runs in. String values
may refer to environment variables as ${VAR} or ${VAR:-default}.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from evalpipe.errors import UserError
from evalpipe.gate import GateConfig
from evalpipe.validation import read_yaml, validated


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServedSide(_Strict):
    """A side whose server is already running at `base_url` (one URL or a list of replicas of one model).

    Sides are discriminated by how their endpoint is given; a `launch:` variant (the orchestrator starts the
    server) and a `registry:` variant (a stored baseline) slot in beside this one.
    """

    label: str = Field(min_length=1)
    model: str = Field(min_length=1)
    base_url: list[str] = Field(min_length=1)
    api_key: str | None = None
    quantization: str | None = Field(default=None, description="e.g. fp8-block, w4afp8 (leaderboard column)")
    engine: str | None = Field(default=None, description="e.g. sglang 0.5.2, TP8 (leaderboard column)")

    @model_validator(mode="before")
    @classmethod
    def _endpoint_given(cls, data: Any) -> Any:
        if isinstance(data, dict) and "base_url" not in data:
            if "launch" in data:
                raise ValueError("`launch:` (starting the server) is not available in this version; give base_url")
            raise ValueError("give base_url (the server's OpenAI-compatible /v1 URL, or a list of replicas)")
        return data

    @field_validator("base_url", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("base_url")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not re.match(r"^https?://[^/\s]+", url):
                raise ValueError(f"'{url}' is not an http(s) URL")
        if len(set(urls)) != len(urls):
            raise ValueError("replica URLs must be distinct")
        return [u.rstrip("/") for u in urls]


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


class TaskEntry(_Strict):
    """One task of the run; unset sampling fields take the card's defaults.

    `samples: auto` samples adaptively between min_samples and max_samples (see evalpipe.adaptive).
    """

    task: str
    samples: int | Literal["auto"] | None = None
    min_samples: int | None = Field(default=None, ge=2)
    max_samples: int | None = Field(default=None, ge=2)
    max_tokens: int | None = Field(default=None, ge=1)
    limit: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0)
    subjects: list[str] | None = Field(default=None, min_length=1)

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
            data = {"min_samples": DEFAULT_MIN_SAMPLES, "max_samples": DEFAULT_MAX_SAMPLES, **data}
        return data

    @model_validator(mode="after")
    def _adaptive_bounds(self) -> TaskEntry:
        if self.samples != "auto":
            if self.min_samples is not None or self.max_samples is not None:
                raise ValueError("min_samples and max_samples apply only with samples: auto")
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


class RunConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output_dir: str = "results/runs"
    data_dir: str | None = None
    concurrency: int = Field(default=64, ge=1, le=4096)
    candidate: ServedSide
    baseline: BaselineSide | None = None
    tasks: list[TaskEntry] = Field(min_length=1)
    gate: GateConfig | None = None
    client: ClientConfig = Field(default_factory=ClientConfig)
    preflight: PreflightConfig = Field(default_factory=PreflightConfig)

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
            if entry.adaptive and self.baseline is None:
                raise ValueError(f"tasks.{i}.samples: 'auto' needs a baseline (its verdict decides when to stop)")
        if self.gate is not None:
            if self.baseline is None:
                raise ValueError("gate: needs a baseline to compare against (add baseline:)")
            unknown = sorted(set(self.gate.tasks) - set(names))
            if unknown:
                raise ValueError(f"gate.tasks: {unknown} are not tasks of this run ({names})")
        return self


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
