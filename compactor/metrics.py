"""The compactor's figures, named once for CloudWatch and for Prometheus.

A **figure** is one number a compaction run reports about a log: its name
as a CloudWatch metric (what the Lambda handlers emit as Embedded Metric
Format) and as a Prometheus metric (what ``compact --follow
--metrics-port`` serves), its unit, its kind and what it means. Both
exporters take their figures from ``run_figures`` / ``failure_figures`` /
``lag_figures`` here, so the two never disagree.

- **lag**: entries reserved but not compacted yet, ``head - hwm`` (a gauge);
- **entries applied**, **vectors applied** (upserted), **bytes published**
  (snapshot bytes uploaded), **run seconds** (the replay's duration);
- **busy runs** (the lease was held elsewhere: a success), **lost leases**
  (the run was fenced: nothing committed), **poison entries** (the run
  stopped at an entry it cannot read);
- **checkpoint bytes** and **tail bytes** (gauges): the committed state's
  size after a run, so its growth toward the compactor's disk and memory
  shows before a run fails for lack of them.

Pure: no I/O, no exporter library.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from compactor.runner import CompactionResult
from deltalog.errors import CorruptEntry, Fenced

__all__ = [
    "BUSY_RUNS",
    "BYTES_PUBLISHED",
    "CHECKPOINT_BYTES",
    "ENTRIES_APPLIED",
    "FIGURES",
    "LAG",
    "LOST_LEASES",
    "POISON_ENTRIES",
    "RUN_SECONDS",
    "TAIL_BYTES",
    "VECTORS_APPLIED",
    "Figure",
    "Figures",
    "failure_figures",
    "lag_figures",
    "run_figures",
]

Kind = Literal["gauge", "counter", "histogram"]
Unit = Literal["Count", "Seconds", "Bytes"]


@dataclass(frozen=True, slots=True)
class Figure:
    """One reported number: its CloudWatch and Prometheus names, unit and kind."""

    name: str
    """The CloudWatch metric name (EMF)."""
    unit: Unit
    """The CloudWatch unit."""
    kind: Kind
    prometheus: str
    """The Prometheus name (the client adds ``_total`` to counters)."""
    help: str


Figures = Mapping[Figure, float]

LAG = Figure(
    "Lag", "Count", "gauge", "deltalog_lag_entries", "Entries not compacted yet (head - hwm)"
)
ENTRIES_APPLIED = Figure(
    "EntriesApplied", "Count", "counter", "deltalog_entries_applied", "Entries applied"
)
VECTORS_APPLIED = Figure(
    "VectorsApplied", "Count", "counter", "deltalog_vectors_applied", "Vectors upserted"
)
RUN_SECONDS = Figure(
    "RunSeconds", "Seconds", "histogram", "deltalog_run_seconds", "Seconds a run spent replaying"
)
BYTES_PUBLISHED = Figure(
    "BytesPublished", "Bytes", "counter", "deltalog_bytes_published", "Checkpoint bytes uploaded"
)
BUSY_RUNS = Figure(
    "BusyRuns", "Count", "counter", "deltalog_busy_runs", "Runs that found the lease held"
)
LOST_LEASES = Figure(
    "LostLeases", "Count", "counter", "deltalog_lost_leases", "Runs fenced off: nothing committed"
)
POISON_ENTRIES = Figure(
    "PoisonEntries", "Count", "counter", "deltalog_poison_entries", "Runs stopped by a poison entry"
)
CHECKPOINT_BYTES = Figure(
    "CheckpointBytes", "Bytes", "gauge", "deltalog_checkpoint_bytes", "The checkpoint's size"
)
TAIL_BYTES = Figure(
    "TailBytes", "Bytes", "gauge", "deltalog_tail_bytes", "The committed tail's entry bytes"
)

FIGURES: tuple[Figure, ...] = (
    LAG,
    ENTRIES_APPLIED,
    VECTORS_APPLIED,
    RUN_SECONDS,
    BYTES_PUBLISHED,
    BUSY_RUNS,
    LOST_LEASES,
    POISON_ENTRIES,
    CHECKPOINT_BYTES,
    TAIL_BYTES,
)


def run_figures(result: CompactionResult) -> dict[Figure, float]:
    """What a run that returned reports (zeros included, so series stay continuous)."""
    # A run that commits hwm alone (the committed tail grows) uploads nothing.
    published = result.snapshot_size if result.checkpoint else 0
    figures: dict[Figure, float] = {
        ENTRIES_APPLIED: result.entries_applied,
        VECTORS_APPLIED: result.vectors_upserted,
        RUN_SECONDS: result.seconds,
        BYTES_PUBLISHED: published,
        BUSY_RUNS: 1 if result.status == "busy" else 0,
        LOST_LEASES: 0,
        POISON_ENTRIES: 0,
    }
    if result.status != "busy":  # a busy run does not know the committed state's size
        figures[CHECKPOINT_BYTES] = result.snapshot_size
        figures[TAIL_BYTES] = result.tail_bytes
    return figures


def failure_figures(error: BaseException) -> dict[Figure, float]:
    """What a run that raised reports: a lost lease, a poison entry, or neither."""
    return {
        LOST_LEASES: 1 if isinstance(error, Fenced) else 0,
        POISON_ENTRIES: 1 if isinstance(error, CorruptEntry) else 0,
    }


def lag_figures(head: int, hwm: int) -> dict[Figure, float]:
    return {LAG: max(0, head - hwm)}
