"""comparison.json assembled in one place, for `evalpipe run`, `evalpipe compare` and `evalpipe gate`.

The per-task comparisons (evalpipe.comparison), the divergence probe's section, the two sides' references, what
the caller records about how the comparison was made (forced differences, tasks not compared, command-line
overrides, the operating characteristics) and, when a gate is given, the gate's decision (evalpipe.gate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evalpipe.comparison import TaskComparison, comparison_document
from evalpipe.config import GateConfig
from evalpipe.divergence_probe import ProbeResult, add_probe_section
from evalpipe.gate import GateResult, apply_gate
from evalpipe.run_files import ComparisonFile, SideReference


@dataclass(frozen=True)
class Decision:
    document: ComparisonFile
    gate: GateResult | None  # None: no gate was applied, nothing is decided

    @property
    def exit_code(self) -> int:
        """The gate's exit code (0 pass, 1 regression or inconclusive counted as fail); 0 without a gate."""
        return self.gate.exit_code if self.gate is not None else 0


def decide(
    comparisons: Mapping[str, TaskComparison], candidate: SideReference, baseline: SideReference, *,
    gate: GateConfig | None = None, probe: ProbeResult | None = None, forced_differences: Sequence[str] = (),
    missing_tasks: Mapping[str, str] | None = None, overrides: Sequence[dict[str, Any]] = (),
    operating: dict[str, Any] | None = None,
) -> Decision:
    """The comparison document and, when `gate` is given, the gate applied to it. The probe's limits are the
    gate's (its defaults without one); `operating` is the gate's operating characteristics as stated."""
    document = comparison_document(comparisons)
    probe_outcome = add_probe_section(document, probe, gate) if probe is not None else None
    document["candidate"] = candidate.model_dump()
    document["baseline"] = baseline.model_dump()
    if forced_differences:
        document["forced_differences"] = list(forced_differences)
    if missing_tasks:
        document["missing_tasks"] = dict(missing_tasks)
    if overrides:
        document["overrides"] = list(overrides)
    result = None
    if gate is not None:
        result = apply_gate(comparisons, gate, probe_outcome)
        document["gate"] = result.to_dict()
    if operating is not None:
        document["operating_characteristics"] = operating
    return Decision(ComparisonFile.model_validate(document), result)
