"""The CI gate: turns task comparisons into pass/fail decisions and a process exit code (pure). Its settings
(`gate:`) are `GateConfig` in evalpipe.config, next to the other config models.

Per task, in order:
1. A side whose error rate exceeds `max_error_rate` makes the task an infrastructure error (exit 3): its
   numbers are not trustworthy and rerunning is the fix.
2. FAIL when the accuracy test fails (the candidate is worse by more than `margin`, at confidence 1 - alpha),
   when the truncation test fails (the candidate truncates more than the baseline by more than
   `truncation_margin`, at the same confidence), or when a side is over the optional hard cap
   `max_truncation_rate`.
3. INCONCLUSIVE - uninformative when both sides sit at the floor or the ceiling (both 0% or both 100% over
   every paired sample): the task cannot show a regression. It counts as `on_uninformative` (default: what
   `on_inconclusive` says).
4. INCONCLUSIVE when either test cannot decide; it counts as `on_inconclusive` (default fail).
5. Otherwise PASS.
Every decision records how an inconclusive task was counted ("result" and "counted_as" in its dict), so no line
reads PASS for a task that was not shown to pass. The run's exit code is the worst task's: 3 (infrastructure)
over 1 (regression) over 0 (pass). Exit code 2 is a config or input error, raised before any of this.

The truncation rule is a one-sided non-inferiority test on the paired per-question truncation rates (the same
t machinery as accuracy, evalpipe.stats), not a cut on a noisy observed rate: with a true 4% on both sides a
hard 5% limit blocks a large share of identical candidates (evalpipe.operating shows by how much).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from evalpipe.comparison import TaskComparison
from evalpipe.config import DIVERGENCE, GateConfig, TaskGate
from evalpipe.divergence import DivergenceSummary, divergence_verdict
from evalpipe.stats import Verdict, VerdictName, noninferiority_of

EXIT_PASS = 0
EXIT_REGRESSION = 1
EXIT_CONFIG_ERROR = 2
EXIT_INFRASTRUCTURE = 3

GateStatus = Literal["pass", "fail", "error"]
# What a task's line says: PASS, FAIL, ERROR or INCONCLUSIVE (plain or uninformative), with how it was counted.
GateResultName = Literal["pass", "fail", "error", "inconclusive", "uninformative"]
_EXIT_BY_STATUS: dict[GateStatus, int] = {"pass": EXIT_PASS, "fail": EXIT_REGRESSION, "error": EXIT_INFRASTRUCTURE}


@dataclass(frozen=True)
class TaskDecision:
    task: str
    status: GateStatus  # how the task counts toward the exit code
    verdict: VerdictName  # the statistical verdict before the gate's rules
    summary: str  # the numbers in one line
    reasons: tuple[str, ...]  # why the status is not a plain pass, one line each
    result: GateResultName | None = None  # what the line says; None: derived from status and verdict
    uninformative: str | None = None  # e.g. "both at 0%" when the task cannot show a regression
    truncation: dict | None = None  # the truncation test, when one ran

    @property
    def shown(self) -> GateResultName:
        """PASS / FAIL / ERROR / INCONCLUSIVE as the line shows it."""
        if self.result is not None:
            return self.result
        if self.status != "error" and self.verdict == "inconclusive":
            return "inconclusive"
        return self.status

    @property
    def counted_as(self) -> GateStatus | None:
        """How an inconclusive task counted toward the exit code (None for a decided one)."""
        return self.status if self.shown in ("inconclusive", "uninformative") else None

    def to_dict(self) -> dict:
        return {"status": self.status, "result": self.shown, "counted_as": self.counted_as, "verdict": self.verdict,
                "headline": headline(self.shown, self.counted_as, self.uninformative),
                "uninformative": self.uninformative, "truncation": self.truncation, "summary": self.summary,
                "reasons": list(self.reasons)}


def headline(result: str, counted_as: str | None, uninformative: str | None = None) -> str:
    """What a task's line starts with: PASS, FAIL, ERROR, or INCONCLUSIVE with how it was counted."""
    if result == "uninformative":
        return f"INCONCLUSIVE - uninformative ({uninformative or 'both at the floor or ceiling'}), counted as {counted_as}"
    if result == "inconclusive":
        return f"INCONCLUSIVE (counted as {counted_as})"
    return result.upper()


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


def gate_outcome(accuracy, truncation, uninformative, errored, capped, on_inconclusive: str,
                 on_uninformative: str) -> tuple[np.ndarray, np.ndarray]:
    """The gate's rule on verdict names, elementwise (scalars or arrays of simulated runs alike): (result, status).

    accuracy: the accuracy test's verdict; truncation: the truncation test's verdict, or "off"; uninformative,
    errored, capped (a side over max_truncation_rate): booleans. The one rule behind decide_task and the
    operating-characteristics simulator.
    """
    accuracy, truncation = np.asarray(accuracy), np.asarray(truncation)
    errored, capped, uninformative = np.asarray(errored, bool), np.asarray(capped, bool), np.asarray(uninformative, bool)
    failed = (accuracy == "fail") | (truncation == "fail") | capped
    unsure = (accuracy == "inconclusive") | (truncation == "inconclusive")
    result = np.select([errored, failed, uninformative, unsure], ["error", "fail", "uninformative", "inconclusive"],
                       "pass")
    status = np.select([result == "error", result == "fail", result == "uninformative", result == "inconclusive"],
                       ["error", "fail", on_uninformative, on_inconclusive], "pass")
    return result, status


def truncation_test(comparison: TaskComparison, rule: TaskGate) -> Verdict | None:
    """The one-sided test that the candidate truncates at most truncation_margin more than the baseline, on the
    paired per-question completion rates (None when the test is off or nothing pairs)."""
    if rule.truncation_margin is None or comparison.truncation is None:
        return None
    return noninferiority_of(comparison.truncation, rule.truncation_margin, rule.alpha)


def uninformative_reason(comparison: TaskComparison) -> str | None:
    """'both at 0%' / 'both at 100%' when every paired sample of both sides is wrong / right."""
    cand, base = comparison.candidate.accuracy, comparison.baseline.accuracy
    if comparison.test.n_questions == 0 or cand is None or base is None or cand != base or cand not in (0.0, 1.0):
        return None
    return f"both at {100 * cand:.0f}%"


def _truncation_numbers(comparison: TaskComparison, test: Verdict | None, rule: TaskGate) -> dict | None:
    if test is None:
        return None
    return {"candidate": comparison.candidate.truncation_rate, "baseline": comparison.baseline.truncation_rate,
            "increase": -test.delta, "upper": -test.lower, "lower": -test.upper, "margin": rule.truncation_margin,
            "alpha": rule.alpha, "verdict": test.verdict}


def decide_task(comparison: TaskComparison, rule: TaskGate) -> TaskDecision:
    reasons: list[str] = []
    sides = {"candidate": comparison.candidate, "baseline": comparison.baseline}
    errored = [f"{name} error rate {100 * side.error_rate:.1f}% exceeds max_error_rate "
               f"{100 * rule.max_error_rate:.1f}%: the endpoint failed requests; fix it and rerun"
               for name, side in sides.items() if side.error_rate > rule.max_error_rate]
    capped = [f"{name} truncated {100 * side.truncation_rate:.1f}% of samples, above max_truncation_rate "
              f"{100 * rule.max_truncation_rate:.1f}%: it cannot pass; raise max_tokens"
              for name, side in sides.items()
              if rule.max_truncation_rate is not None and side.truncation_rate > rule.max_truncation_rate]
    verdict = comparison.verdict
    truncation = truncation_test(comparison, rule)
    empty = uninformative_reason(comparison)
    result, status = (str(x) for x in gate_outcome(
        verdict, truncation.verdict if truncation else "off", empty is not None, bool(errored), bool(capped),
        rule.on_inconclusive, rule.uninformative_counts_as))
    reasons += errored
    if verdict == "fail":
        reasons.append(f"regression: the upper bound {points(comparison.test.upper)} is below the margin "
                       f"{points(-rule.margin)}")
    if truncation is not None and truncation.verdict != "pass":
        numbers = (f"candidate {100 * comparison.candidate.truncation_rate:.1f}% vs baseline "
                   f"{100 * comparison.baseline.truncation_rate:.1f}% truncated, increase {points(-truncation.delta)} "
                   f"(one-sided bounds {points(-truncation.upper)} to {points(-truncation.lower)}) vs "
                   f"truncation_margin {points(rule.truncation_margin)}")
        if truncation.verdict == "fail":
            reasons.append(f"truncation: {numbers}: the candidate runs out of tokens more often; raise max_tokens "
                           "or find why its answers got longer")
        else:
            reasons.append(f"truncation inconclusive: {numbers}")
    reasons += capped
    if result == "uninformative":
        reasons.insert(len(errored), f"uninformative ({empty}): the task cannot show a regression here (counted as "
                                     f"{status}, on_uninformative); choose a task where the models score")
    elif result == "inconclusive" and verdict == "inconclusive":
        reasons.insert(len(errored), f"inconclusive (counted as {status}): the bounds straddle the margin; add "
                                     "questions (or samples, where answers are sampled) or widen the margin; "
                                     "`evalpipe plan` shows what is needed")
    elif result == "inconclusive":
        reasons.append(f"counted as {status} (on_inconclusive)")
    return TaskDecision(comparison.task, status, verdict, describe(comparison), tuple(reasons), result,  # type: ignore[arg-type]
                        empty, _truncation_numbers(comparison, truncation, rule))


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
