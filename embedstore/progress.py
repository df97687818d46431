"""How long library calls report progress: a small protocol and its no-op default.

The library never prints. A long call (``synthesize_cohort``, ``train_classifier``, ``run_demo``
...) takes a ``reporter`` and tells it what happens; what the user sees is the reporter's
business. The command line passes a rich implementation (``embedstore.cli.progress``); a script
passes nothing and gets :data:`NULL_REPORTER`, which ignores everything.

What a reporter receives is data, not text to print: a bar's ``status`` is whatever the step knows
at that moment (an ``ExtractSummary`` during extraction, a training-log row ``{"epoch",
"train_loss", "val_auc", ...}`` after each epoch), and ``done`` receives a finished step's
result (an ``ExtractSummary``, a ``Run``). Only :meth:`Reporter.message` carries prose, for the
demo's narration between stages.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

__all__ = ["Bar", "Reporter", "NullBar", "NullReporter", "NULL_REPORTER", "reporter_or_null"]


class Bar(Protocol):
    """Handle of one progress bar, valid inside its ``with reporter.bar(...)`` block."""

    def update(self, completed: float | None = None, *, total: float | None = None,
               status: object = None) -> None:
        """Set the amount done (and the total, when it became known); ``status`` is data."""

    def advance(self, n: float = 1) -> None:
        """Add ``n`` to the amount done."""


class Reporter(Protocol):
    """Receives the progress of a library call: stages, bars, finished steps, narration."""

    def stage(self, i: int, n: int, title: str) -> None:
        """Stage ``i`` of ``n`` (1-based) begins."""

    def message(self, text: str) -> None:
        """One line of narration between steps (the demo's "reused 3 runs ...")."""

    def bar(self, description: str, total: float | None = None) -> AbstractContextManager[Bar]:
        """A progress bar for one step; ``total`` None when not known yet."""

    def done(self, result: object) -> None:
        """A step finished with this result (an ``ExtractSummary``, a ``Run`` ...)."""


class NullBar:
    """A bar that ignores its updates."""

    def update(self, completed: float | None = None, *, total: float | None = None,
               status: object = None) -> None:
        pass

    def advance(self, n: float = 1) -> None:
        pass


class NullReporter:
    """The default reporter: ignores everything (library calls from scripts stay silent)."""

    def stage(self, i: int, n: int, title: str) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    @contextmanager
    def bar(self, description: str, total: float | None = None) -> Iterator[Bar]:
        yield NullBar()

    def done(self, result: object) -> None:
        pass


NULL_REPORTER = NullReporter()


def reporter_or_null(reporter: Reporter | None) -> Reporter:
    """``reporter``, or the no-op one for None."""
    return NULL_REPORTER if reporter is None else reporter
