"""Protocol cards: the declarative, hashed description of one benchmark (tasks/<name>.yaml).

A card pins the data (hub id + revision, local layout + sha256), the prompt, the sampling defaults and the
answer contract (extraction ladder + grader). Code reading it is generic. `card_hash` is a digest of every field
that can move a score; fields that only describe or label are left out, and so are the number of samples and
the seed (they are part of each journal key instead, so that adding samples later keeps earlier ones valid).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evalpipe.errors import UserError
from evalpipe.scoring import EXTRACTION_RULES, SCORING_VERSION
from evalpipe.validation import read_yaml, validated

TASKS_DIR_ENV = "EVALPIPE_TASKS_DIR"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REVISION = re.compile(r"^[0-9a-f]{40}$")

# Dotted paths left out of the hash: they describe the card or group results, they cannot move a score.
UNHASHED_FIELDS = ("description", "dataset.notes", "fields.labels", "derived_labels", "sampling.samples")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalSource(_Strict):
    """Files under the data directory (laid out like shared/datasets) and their expected sha256."""

    files: dict[str, str] = Field(min_length=1, description="path relative to the data dir -> sha256")
    member: str | None = Field(default=None, description="zip member to read (encrypted archives)")
    member_sha256: str | None = None
    password: str | None = Field(default=None, description="published password of an encrypted zip")

    @field_validator("files")
    @classmethod
    def _hex_digests(cls, files: dict[str, str]) -> dict[str, str]:
        for path, digest in files.items():
            if not _SHA256.match(digest):
                raise ValueError(f"{path}: sha256 must be 64 lowercase hex digits")
        return files


class HubSource(_Strict):
    path: str
    revision: str = Field(description="40-hex commit of the dataset repository")
    name: str | None = Field(default=None, description="dataset config name")
    split: str

    @field_validator("revision")
    @classmethod
    def _pinned(cls, revision: str) -> str:
        if not _REVISION.match(revision):
            raise ValueError("revision must be a 40-hex commit id, not a branch or tag")
        return revision


class DatasetSpec(_Strict):
    format: Literal["jsonl", "mmlu_csv", "gpqa_zip"]
    local: LocalSource
    hub: HubSource
    notes: str = ""


class FieldMap(_Strict):
    """Where each part of a question lives in a source row."""

    id: str
    id_pattern: str | None = Field(default=None, description="regex applied to the id field; its groups joined by '-'")
    question: str
    answer: str | None = Field(default=None, description="gold answer, or the correct letter for letter-keyed choices")
    options: list[str] | None = Field(default=None, description="fields holding the options, in source order")
    correct_option: int | None = Field(default=None, description="index in `options` of the correct one")
    labels: dict[str, str] = Field(default_factory=dict, description="label name -> field (for breakdowns)")

    @model_validator(mode="after")
    def _answer_given(self) -> FieldMap:
        if self.answer is None and self.correct_option is None:
            raise ValueError("give `answer` or `correct_option`")
        if self.correct_option is not None and not self.options:
            raise ValueError("`correct_option` needs `options`")
        return self


class PromptSpec(_Strict):
    """One user turn. `{question}` and `{options}` are replaced; everything else is sent verbatim."""

    system: str | None = None
    template: str
    option_format: str = "{letter}) {text}"
    shuffle_options: bool = False
    shuffle_salt: str = ""
    continuation: str | None = Field(
        default=None,
        description="log-likelihood cards: the text scored after the prompt for each option ({letter}, {text})",
    )

    @field_validator("template")
    @classmethod
    def _has_question(cls, template: str) -> str:
        if "{question}" not in template:
            raise ValueError("template must contain {question}")
        return template


class SamplingSpec(_Strict):
    temperature: float = Field(ge=0.0)
    top_p: float = Field(gt=0.0, le=1.0)
    max_tokens: int = Field(ge=1)
    samples: int = Field(ge=1)


class ScoringSpec(_Strict):
    answer_type: Literal["math", "integer", "multiple_choice"]
    # generate: a chat completion, graded by the extraction ladder. loglikelihood: no generation; each option's
    # continuation is scored by its log-likelihood after the prompt (/v1/completions, echo + logprobs), the way
    # lm-eval scores multiple choice; the most likely option is the answer.
    method: Literal["generate", "loglikelihood"] = "generate"
    extract: list[str] = Field(default_factory=list, description="extraction ladder (generate): the last answer "
                                                                 "statement any rule finds wins")

    @field_validator("extract")
    @classmethod
    def _known_rules(cls, rules: list[str]) -> list[str]:
        unknown = [r for r in rules if r not in EXTRACTION_RULES]
        if unknown:
            raise ValueError(f"unknown extraction rule(s) {unknown}; known: {sorted(EXTRACTION_RULES)}")
        return rules

    @model_validator(mode="after")
    def _ladder_for_generation_only(self) -> ScoringSpec:
        if self.method == "generate" and not self.extract:
            raise ValueError("extract: a generate card needs an extraction ladder")
        if self.method == "loglikelihood" and self.extract:
            raise ValueError("extract: a loglikelihood card extracts nothing; leave the ladder out")
        if self.method == "loglikelihood" and self.answer_type != "multiple_choice":
            raise ValueError("method: loglikelihood scores options, so answer_type must be multiple_choice")
        return self


class DerivedLabel(_Strict):
    source: str = Field(description="label the mapping reads")
    mapping: dict[str, str]


class TaskCard(_Strict):
    name: str
    version: int = Field(ge=1)
    description: str = ""
    dataset: DatasetSpec
    fields: FieldMap
    prompt: PromptSpec
    sampling: SamplingSpec
    scoring: ScoringSpec
    derived_labels: dict[str, DerivedLabel] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _choices_consistent(self) -> TaskCard:
        is_mc = self.scoring.answer_type == "multiple_choice"
        if is_mc != bool(self.fields.options):
            raise ValueError("multiple_choice cards need fields.options, other cards must not have them")
        loglik = self.scoring.method == "loglikelihood"
        if loglik != (self.prompt.continuation is not None):
            raise ValueError("prompt.continuation is given exactly for scoring.method loglikelihood")
        if loglik and self.prompt.system is not None:
            raise ValueError("prompt.system: a loglikelihood prompt is sent as plain text, without a chat template")
        # A cloze card (continuation = the option's text) need not list the options in the prompt.
        needs_listing = is_mc and not (loglik and "{text}" in (self.prompt.continuation or ""))
        if needs_listing and "{options}" not in self.prompt.template:
            raise ValueError("multiple_choice template must contain {options}")
        return self

    def with_sampling(self, **overrides: Any) -> TaskCard:
        """The card as run: sampling defaults replaced by the config's per-task values (None keeps the default)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return self
        sampling = SamplingSpec(**{**self.sampling.model_dump(), **given})
        return self.model_copy(update={"sampling": sampling})

    def hashed_view(self) -> dict[str, Any]:
        """The score-moving fields, as hashed."""
        view = self.model_dump(mode="json")
        for dotted in UNHASHED_FIELDS:
            *parents, leaf = dotted.split(".")
            node = view
            for key in parents:
                node = node[key]
            node.pop(leaf, None)
        view["scoring_version"] = SCORING_VERSION
        return view

    @property
    def card_hash(self) -> str:
        canonical = json.dumps(self.hashed_view(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def tasks_dir() -> Path:
    override = os.environ.get(TASKS_DIR_ENV)
    return Path(override) if override else Path(__file__).resolve().parent.parent / "tasks"


def available_tasks() -> list[str]:
    return sorted(p.stem for p in tasks_dir().glob("*.yaml"))


def load_card(name_or_path: str) -> TaskCard:
    """A card by task name (tasks/<name>.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = tasks_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(f"unknown task '{name_or_path}'; available: {', '.join(available_tasks()) or 'none'}")
    elif not path.is_file():
        raise UserError(f"task card not found: {path}")
    return validated(TaskCard, read_yaml(path), str(path))
