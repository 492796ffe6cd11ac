"""The CI gate: turns task comparisons into pass/fail decisions and a process exit code (pure).

Per task, in order:
1. A side whose error rate exceeds `max_error_rate` makes the task an infrastructure error (exit 3): its
   numbers are not trustworthy and rerunning is the fix.
2. A side whose truncation rate exceeds `max_truncation_rate` cannot pass: truncation, not the model, may be
   what is measured, and the message says to raise max_tokens.
3. Otherwise the non-inferiority verdict decides; "inconclusive" becomes `on_inconclusive` (default fail).
The run's exit code is the worst task's: 3 (infrastructure) over 1 (regression) over 0 (pass). Exit code 2 is
a config error, raised before any of this.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from evalpipe.comparison import TaskComparison
from evalpipe.divergence import DivergenceSummary, divergence_verdict
from evalpipe.stats import VerdictName

EXIT_PASS = 0
EXIT_REGRESSION = 1
EXIT_CONFIG_ERROR = 2
EXIT_INFRASTRUCTURE = 3

GateStatus = Literal["pass", "fail", "error"]
DIVERGENCE = "divergence"  # the task name of the teacher-forced divergence probe
_EXIT_BY_STATUS: dict[GateStatus, int] = {"pass": EXIT_PASS, "fail": EXIT_REGRESSION, "error": EXIT_INFRASTRUCTURE}

class GateOverride(BaseModel):
    """Per-task settings that replace the gate-wide ones."""

    model_config = ConfigDict(extra="forbid")

    margin: float | None = Field(default=None, ge=0.0, le=1.0)
    alpha: float | None = Field(default=None, gt=0.0, lt=1.0)
    on_inconclusive: Literal["fail", "pass"] | None = None
    max_truncation_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    max_error_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    max_kld: float | None = Field(default=None, ge=0.0)
    min_top1_agreement: float | None = Field(default=None, ge=0.0, le=1.0)


RULE_FIELDS = ("margin", "alpha", "on_inconclusive", "max_truncation_rate", "max_error_rate", "max_kld",
               "min_top1_agreement")
DIVERGENCE_FIELDS = ("max_kld", "min_top1_agreement")


@dataclass(frozen=True)
class TaskGate:
    margin: float
    alpha: float
    on_inconclusive: Literal["fail", "pass"]
    max_truncation_rate: float
    max_error_rate: float
    max_kld: float | None = None  # the divergence task's limits (None: not gated on that statistic)
    min_top1_agreement: float | None = None


class GateConfig(BaseModel):
    """Config `gate:`. margin is an absolute accuracy drop as a fraction (0.05 = 5 points)."""

    model_config = ConfigDict(extra="forbid")

    margin: float = Field(default=0.05, ge=0.0, le=1.0)
    alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    on_inconclusive: Literal["fail", "pass"] = "fail"
    max_truncation_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    max_error_rate: float = Field(default=0.02, ge=0.0, le=1.0)
    max_kld: float | None = Field(default=None, ge=0.0, description="divergence: mean KL divergence limit (nats)")
    min_top1_agreement: float | None = Field(default=None, ge=0.0, le=1.0,
                                             description="divergence: lowest share of positions with the same top-1")
    tasks: dict[str, GateOverride] = Field(default_factory=dict)

    def for_task(self, task: str) -> TaskGate:
        override = self.tasks.get(task, GateOverride())
        chosen = {
            name: getattr(override, name) if getattr(override, name) is not None else getattr(self, name)
            for name in RULE_FIELDS
        }
        return TaskGate(**chosen)

    def divergence_keys(self) -> list[str]:
        """The divergence limits set anywhere in this gate."""
        sections = [self, *self.tasks.values()]
        return [name for name in DIVERGENCE_FIELDS if any(getattr(s, name) is not None for s in sections)]


@dataclass(frozen=True)
class TaskDecision:
    task: str
    status: GateStatus
    verdict: VerdictName  # the statistical verdict before the gate's rules
    summary: str  # the numbers in one line
    reasons: tuple[str, ...]  # why the status is not a plain pass, one line each

    def to_dict(self) -> dict:
        return {"status": self.status, "verdict": self.verdict, "summary": self.summary, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class GateResult:
    decisions: dict[str, TaskDecision]

    @property
    def exit_code(self) -> int:
        return max((_EXIT_BY_STATUS[d.status] for d in self.decisions.values()), default=EXIT_PASS)

    @property
    def status(self) -> GateStatus:
        return {EXIT_PASS: "pass", EXIT_REGRESSION: "fail", EXIT_INFRASTRUCTURE: "error"}[self.exit_code]

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "tasks": {task: decision.to_dict() for task, decision in self.decisions.items()},
        }


def points(value: float | None) -> str:
    """A fraction as signed percentage points, for messages."""
    return "n/a" if value is None else f"{100 * value:+.1f} pts"


def describe(comparison: TaskComparison) -> str:
    """One line with the numbers a reviewer needs: delta, its 95% CI, the one-sided bound and the margin."""
    test = comparison.test
    if test.n_questions == 0:
        return "no question has outcomes on both sides"
    lo, hi = comparison.ci95
    return (
        f"candidate {100 * comparison.candidate.accuracy:.1f}% vs baseline "
        f"{100 * comparison.baseline.accuracy:.1f}%, delta {points(test.delta)} "
        f"(95% CI {points(lo)} to {points(hi)}; one-sided {100 * (1 - test.alpha):.1f}% bounds "
        f"{points(test.lower)} to {points(test.upper)}) vs margin {points(-test.margin)} over "
        f"{test.n_questions} questions: {test.verdict}"
    )


def decide_task(comparison: TaskComparison, rule: TaskGate) -> TaskDecision:
    reasons: list[str] = []
    sides = {"candidate": comparison.candidate, "baseline": comparison.baseline}
    errored = [f"{name} error rate {100 * side.error_rate:.1f}% exceeds max_error_rate "
               f"{100 * rule.max_error_rate:.1f}%: the endpoint failed requests; fix it and rerun"
               for name, side in sides.items() if side.error_rate > rule.max_error_rate]
    truncated = [f"{name} truncated {100 * side.truncation_rate:.1f}% of samples, above max_truncation_rate "
                 f"{100 * rule.max_truncation_rate:.1f}%: it cannot pass; raise max_tokens"
                 for name, side in sides.items() if side.truncation_rate > rule.max_truncation_rate]
    verdict = comparison.verdict
    if errored:
        status: GateStatus = "error"
        reasons += errored
    elif verdict == "fail":
        status = "fail"
        reasons.append(f"regression: the upper bound {points(comparison.test.upper)} is below the margin "
                       f"{points(-rule.margin)}")
    elif verdict == "inconclusive":
        status = rule.on_inconclusive
        reasons.append(f"inconclusive (counted as {rule.on_inconclusive}): add samples or widen the margin; "
                       "`evalpipe plan` shows what is needed")
    else:
        status = "pass"
    if truncated and status == "pass":
        status = "fail"
    reasons += truncated
    return TaskDecision(comparison.task, status, verdict, describe(comparison), tuple(reasons))


def decide_divergence(summary: DivergenceSummary | None, failed: int, attempted: int, rule: TaskGate,
                      task: str = DIVERGENCE) -> TaskDecision:
    """The divergence probe's decision: its limits at the one-sided bounds; "inconclusive" becomes
    on_inconclusive; more failed generations than max_error_rate (or none scored) is an infrastructure error.
    Without limits the probe is reported and passes."""
    error_rate = failed / attempted if attempted else 1.0
    if summary is None or error_rate > rule.max_error_rate:
        return TaskDecision(task, "error", "inconclusive", f"{failed} of {attempted} generations could not be scored",
                            (f"error rate {100 * error_rate:.1f}% exceeds max_error_rate "
                             f"{100 * rule.max_error_rate:.1f}%: a server did not return prompt logprobs; see "
                             "divergence/summary.json",))
    verdict, checks = divergence_verdict(summary, rule.max_kld, rule.min_top1_agreement)
    numbers = (f"mean KLD {summary.mean_kld.value:.4g} nats, p99 {summary.p99_kld.value:.4g}, top-1 agreement "
               f"{100 * summary.top1_agreement.value:.2f}%, mean |Δ logprob| "
               f"{summary.mean_abs_logprob_change.value:.4g} over {summary.n_positions} positions of "
               f"{summary.n_sequences} generations: {verdict}")
    if not checks:
        return TaskDecision(task, "pass", verdict, numbers, ("no max_kld or min_top1_agreement: reported only",))
    reasons = [f"over the limit: {line}" for state, line in checks if state == "broken"]
    if verdict == "fail":
        status: GateStatus = "fail"
    elif verdict == "inconclusive":
        status = rule.on_inconclusive
        unsure = [line for state, line in checks if state == "unsure"] or ["fewer than two generations scored"]
        reasons = [f"inconclusive (counted as {rule.on_inconclusive}): {line}; score more generations (limit) or "
                   "tokens (max_tokens)" for line in unsure]
    else:
        status = "pass"
    return TaskDecision(task, status, verdict, numbers, tuple(reasons))


@dataclass(frozen=True)
class ProbeOutcome:
    """What the gate needs of a divergence probe."""

    summary: DivergenceSummary | None
    failed: int
    attempted: int


def apply_gate(comparisons: Mapping[str, TaskComparison], config: GateConfig,
               divergence: ProbeOutcome | None = None) -> GateResult:
    decisions = {task: decide_task(c, config.for_task(task)) for task, c in comparisons.items()}
    if divergence is not None:
        decisions[DIVERGENCE] = decide_divergence(divergence.summary, divergence.failed, divergence.attempted,
                                                  config.for_task(DIVERGENCE))
    return GateResult(decisions)
