"""Typed records shared by the orchestrator, the gate and the importers.

One `SampleRecord` per finished request is appended to `<run_dir>/<side>/journal.jsonl`; a sample is keyed by
(card_hash, question_id, sample_index). Field names are a contract: the gate, the leaderboard, `crosscheck`
and `import` all read them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Outcome = Literal["correct", "wrong", "no_answer", "truncated", "error"]
OUTCOMES: tuple[Outcome, ...] = ("correct", "wrong", "no_answer", "truncated", "error")


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None


class SampleRecord(BaseModel):
    """What one request produced and how it was scored."""

    model_config = ConfigDict(extra="forbid")

    task: str
    card_hash: str
    question_id: str
    sample_index: int = Field(ge=0)
    seed: int | None = None
    gold: str = Field(description="reference answer as scored (for multiple choice: the letter after shuffling)")
    content: str | None = None
    reasoning: str | None = None
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)
    latency_s: float | None = None
    attempts: int = 0
    extracted: str | None = None
    rule: str | None = Field(default=None, description="which extraction rule fired, e.g. 'boxed_last'")
    outcome: Outcome
    error: str | None = None
    replica: str | None = None
    prompt_hash: str | None = Field(default=None, description="sha256 prefix of the exact messages sent")
    labels: dict[str, str] = Field(default_factory=dict, description="question labels for breakdowns, e.g. subject")
    option_logprobs: list[float] | None = Field(
        default=None, description="log-likelihood cards: each option's continuation log-likelihood, in letter order")
    extracted_norm: str | None = Field(
        default=None, description="log-likelihood cards: the letter whose log-likelihood per byte is highest (acc_norm)")

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.card_hash, self.question_id, self.sample_index)
