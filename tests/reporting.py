"""A Reporter that records what the library tells it (tests of the progress seam)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class RecordedBar:
    description: str
    total: float | None
    updates: list[tuple[float | None, float | None, object]] = field(default_factory=list)
    advanced: float = 0
    closed: bool = False

    def update(self, completed: float | None = None, *, total: float | None = None,
               status: object = None) -> None:
        self.updates.append((completed, total, status))

    def advance(self, n: float = 1) -> None:
        self.advanced += n


@dataclass
class RecordingReporter:
    stages: list[tuple[int, int, str]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    bars: list[RecordedBar] = field(default_factory=list)
    results: list[object] = field(default_factory=list)

    def stage(self, i: int, n: int, title: str) -> None:
        self.stages.append((i, n, title))

    def message(self, text: str) -> None:
        self.messages.append(text)

    @contextmanager
    def bar(self, description: str, total: float | None = None) -> Iterator[RecordedBar]:
        b = RecordedBar(description, total)
        self.bars.append(b)
        try:
            yield b
        finally:
            b.closed = True

    def done(self, result: object) -> None:
        self.results.append(result)
