"""Progress on stderr, for every command that shows it.

On a terminal, a live ``rich`` bar with the count, the rate and the time
left wherever the total is known (a compaction knows head minus hwm, an
ingest knows its file), and a spinner where it is not. When stderr is not
a terminal (CI logs, ``| tee``), plain lines every few seconds and a last
one at the end. ``quiet`` shows nothing.

A display counts **items** (entries, receipts, vectors: the ``unit``) and
carries named **figures** beside the count (vectors, duplicates, errors),
each shown with its rate. ``note`` adds a line of its own; ``warn`` too,
also when quiet (quiet hides progress, not errors).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from compactor.replay import Progress as ReplayProgress

__all__ = ["ProgressDisplay", "compaction_progress", "shards_progress"]

PLAIN_INTERVAL = 5.0
"""Seconds between two plain lines when stderr is not a terminal."""


class ProgressDisplay:
    """One display: ``with ProgressDisplay("ingest", unit="receipts") as p: p.update(n)``."""

    def __init__(
        self,
        label: str,
        *,
        unit: str,
        total: int | None = None,
        quiet: bool = False,
        stream: IO[str] | None = None,
        interval: float = PLAIN_INTERVAL,
    ) -> None:
        self.label = label
        self.unit = unit
        self.total = total
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.completed = 0
        self.figures: dict[str, int] = {}
        self._started = time.monotonic()
        self._printed = 0.0
        self._shown: str | None = None
        self._live: Progress | None = None
        self._task: TaskID | None = None

    @property
    def live(self) -> bool:
        """True when a live bar is shown (a terminal, not quiet)."""
        return self._live is not None

    def __enter__(self) -> Self:
        self._started = time.monotonic()
        if not self.quiet and self.stream.isatty():
            self._live = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}  {task.fields[figures]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._live.start()
            self._task = self._live.add_task(
                self.label, total=self.total, unit=self.unit, figures=""
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        elif not self.quiet:
            self._print_line()

    def update(self, completed: int, *, total: int | None = None, **figures: int) -> None:
        """The count so far (and the total, once known), with the figures beside it."""
        self.completed = completed
        if total is not None:
            self.total = total
        self.figures.update(figures)
        if self.quiet:
            return
        if self._live is not None and self._task is not None:
            self._live.update(
                self._task, completed=completed, total=self.total, figures=self._figures()
            )
            return
        now = time.monotonic()
        if not self._printed or now - self._printed >= self.interval:
            self._print_line()

    def stage(self, label: str, *, unit: str, total: int | None = None) -> None:
        """Count something else from here on (a command's next step): the count, the
        figures and the rates start again; a plain line shows the step's last count."""
        if self._live is None and not self.quiet and self.completed:
            self._print_line()
        self.label, self.unit, self.total = label, unit, total
        self.completed = 0
        self.figures = {}
        self._started = time.monotonic()
        self._printed = 0.0
        if self._live is not None and self._task is not None:
            self._live.reset(self._task, total=total, description=label, unit=unit, figures="")

    def note(self, message: str) -> None:
        """A line of its own (a skipped input, say), above the bar."""
        if self._live is not None:
            self._live.console.print(message, markup=False, highlight=False)
        elif not self.quiet:
            print(message, file=self.stream, flush=True)

    def warn(self, message: str) -> None:
        """A line of its own that ``quiet`` does not hide (a skipped input's reason):
        quiet hides progress, not errors."""
        if self._live is not None:
            self._live.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=self.stream, flush=True)

    def line(self) -> str:
        """The plain line: ``label: 40/100 entries (12/s), 4,000 vectors (1,200/s)``."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        count = f"{self.completed:,}" + (f"/{self.total:,}" if self.total is not None else "")
        text = f"{self.label}: {count} {self.unit} ({self.completed / elapsed:,.1f}/s)"
        return text + (f", {self._figures()}" if self.figures else "")

    def _figures(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return ", ".join(
            f"{value:,} {name} ({value / elapsed:,.0f}/s)" for name, value in self.figures.items()
        )

    def _print_line(self) -> None:
        self._printed = time.monotonic()
        counts = f"{self.completed}/{self.total}/{sorted(self.figures.items())}"
        if counts == self._shown:
            return  # nothing moved since the last line (the final line repeats none)
        self._shown = counts
        print(self.line(), file=self.stream, flush=True)


def compaction_progress(
    display: ProgressDisplay, head: int | None = None
) -> Callable[[ReplayProgress], None]:
    """A compactor's ``progress`` callback that drives ``display``.

    The count is seqs passed since the run's start (entries and seals); the
    total is ``head`` minus that start, when the head is known.
    """

    def report(progress: ReplayProgress) -> None:
        total = None if head is None else max(head - progress.after, 0)
        display.update(
            progress.seq - progress.after,
            total=total,
            entries=progress.entries,
            vectors=progress.vectors,
        )

    return report


def shards_progress(
    display: ProgressDisplay, head: int | None = None
) -> Callable[[ReplayProgress], None]:
    """``compaction_progress`` for several shards reporting at once: their sums.

    Each shard counts the seqs it passed since its own start; the total is
    what the shards that reported so far have to pass to reach ``head``.
    """
    latest: dict[str | None, ReplayProgress] = {}

    def report(progress: ReplayProgress) -> None:
        latest[progress.shard] = progress
        done = sum(p.seq - p.after for p in latest.values())
        total = None if head is None else sum(max(head - p.after, 0) for p in latest.values())
        display.update(
            done,
            total=total,
            entries=sum(p.entries for p in latest.values()),
            vectors=sum(p.vectors for p in latest.values()),
        )

    return report
