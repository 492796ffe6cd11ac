"""Live progress on stderr: one bar per task with done/total, output tokens per second and ETA."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from evalpipe.records import SampleRecord
from evalpipe.task_plan import TaskPlan


class TokensPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.fields.get("tokens", 0) / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} tok/s", style="progress.data.speed")


class RunProgress:
    """Context manager: one bar per (side, task); `advance(side, record)` after each finished sample."""

    def __init__(self, plans: Sequence[TaskPlan], sides: Sequence[str], enabled: bool = True):
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TokensPerSecond(),
            TextColumn("errors {task.fields[errors]}"), TimeRemainingColumn(),
            console=Console(stderr=True), disable=not enabled, transient=False,
        )
        self._ids = {(side, p.name): self._progress.add_task(f"{side}/{p.name}", total=len(p.requests), tokens=0,
                                                             errors=0)
                     for side in sides for p in plans}
        self._tokens: Counter[tuple[str, str]] = Counter()
        self._errors: Counter[tuple[str, str]] = Counter()

    def already_done(self, side: str, task: str, count: int) -> None:
        self._progress.update(self._ids[(side, task)], completed=count)

    def advance(self, side: str, record: SampleRecord) -> None:
        key = (side, record.task)
        self._tokens[key] += record.usage.completion_tokens or 0
        self._errors[key] += record.outcome == "error"
        self._progress.update(self._ids[key], advance=1, tokens=self._tokens[key], errors=self._errors[key])

    def __enter__(self) -> RunProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
