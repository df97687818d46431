"""Progress bars and consoles shared by the CLI and the demo (rich, on stderr)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["console", "err_console", "progress_bar", "Bar"]

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        # Average over the whole task: bursty updates (batches) make rich's windowed speed jumpy.
        elapsed = task.elapsed or 0.0
        speed = task.completed / elapsed if elapsed > 0 and task.completed else None
        if not speed:
            return Text("-/s", style="cyan")
        return Text(f"{speed / 1000:.1f}k/s" if speed >= 1000 else f"{speed:.1f}/s", style="cyan")


class Bar:
    """Handle of one progress bar: ``update(completed, **fields)``; ``advance(n)``."""

    def __init__(self, progress: Progress | None, task: int | None):
        self._p, self._t = progress, task

    def update(self, completed: float | None = None, *, total: float | None = None,
               info: str | None = None) -> None:
        if self._p is None or self._t is None:
            return
        kw: dict[str, object] = {}
        if completed is not None:
            kw["completed"] = completed
        if total is not None:
            kw["total"] = total
        if info is not None:
            kw["info"] = info
        self._p.update(self._t, **kw)  # type: ignore[arg-type]

    def advance(self, n: float = 1) -> None:
        if self._p is not None and self._t is not None:
            self._p.advance(self._t, n)


def _enabled(requested: bool) -> bool:
    return requested and not os.environ.get("EMBEDSTORE_NO_PROGRESS") and sys.stderr is not None


@contextmanager
def progress_bar(description: str, total: float | None, *, enabled: bool = True) -> Iterator[Bar]:
    """A rich bar with count, rate and ETA on stderr; a no-op when disabled."""
    if not _enabled(enabled):
        yield Bar(None, None)
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
    with Progress(*columns, console=err_console, transient=False) as p:
        task = p.add_task(description, total=total, info="")
        yield Bar(p, task)
