"""The command line's reporter: rich progress bars on stderr, stage rules and narration.

This is the default implementation of the library's ``embedstore.progress.Reporter``; the
library itself only ever sees the protocol. Bars are switched off by ``EMBEDSTORE_NO_PROGRESS``
(the per-step summary lines stay).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from embedstore.cli import render
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from embedstore.progress import Bar, NullBar

__all__ = ["RichBar", "RichReporter"]


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        # Average over the whole task: bursty updates (batches) make rich's windowed speed jumpy.
        elapsed = task.elapsed or 0.0
        speed = task.completed / elapsed if elapsed > 0 and task.completed else None
        if not speed:
            return Text("-/s", style="cyan")
        return Text(f"{speed / 1000:.1f}k/s" if speed >= 1000 else f"{speed:.1f}/s", style="cyan")


class RichBar:
    """One rich bar; ``status`` data is shown through ``render.progress_status``."""

    def __init__(self, progress: Progress, task: TaskID):
        self._p, self._t = progress, task

    def update(self, completed: float | None = None, *, total: float | None = None,
               status: object = None) -> None:
        kw: dict[str, object] = {}
        if completed is not None:
            kw["completed"] = completed
        if total is not None:
            kw["total"] = total
        if status is not None:
            kw["info"] = render.progress_status(status)
        self._p.update(self._t, **kw)  # type: ignore[arg-type]

    def advance(self, n: float = 1) -> None:
        self._p.advance(self._t, n)


def _bars_enabled() -> bool:
    return not os.environ.get("EMBEDSTORE_NO_PROGRESS") and sys.stderr is not None


class RichReporter:
    """Stages as rules and narration on stdout; bars and finished steps on stderr."""

    def stage(self, i: int, n: int, title: str) -> None:
        render.stage(i, n, title)

    def message(self, text: str) -> None:
        render.message(text)

    @contextmanager
    def bar(self, description: str, total: float | None = None) -> Iterator[Bar]:
        """A bar with count, rate, elapsed time and ETA; a no-op one when bars are off."""
        if not _bars_enabled():
            yield NullBar()
            return
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        with Progress(*columns, console=render.err_console, transient=False) as p:
            task = p.add_task(description, total=total, info="")
            yield RichBar(p, task)

    def done(self, result: object) -> None:
        render.step_done(result)
