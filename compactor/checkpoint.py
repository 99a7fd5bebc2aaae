"""When a compaction run publishes a checkpoint: a pure policy, no I/O.

- The **checkpoint** is the published snapshot the committed state points
  to; it holds seqs up to ``snapshot_hwm``.
- The **tail** is what a run would commit after it: the entries in
  ``(snapshot_hwm, new hwm]``, counted in seqs and in stored bytes.
- A run **publishes** (uploads a new checkpoint at the new hwm, emptying the
  tail) when ``CheckpointPolicy.reason`` names a reason, else it commits hwm
  alone and uploads nothing.

Reasons, checked in this order: ``requested`` (``--checkpoint``), ``first``
(no checkpoint yet), ``ratio`` (tail bytes reach ``ratio`` times the
checkpoint's bytes; for a shard of a log of ``N`` shards, its share of them,
the tail bytes over ``N``: each entry carries every shard's records),
``entries`` and ``bytes`` (the tail reaches a cap).

The defaults were chosen from the benchmarks (README "Performance",
"Checkpoints"): with ``ratio`` = 0.1 a stream of small runs uploads about
ten bytes of checkpoint per byte of entries applied, where publishing
every run uploaded 63-455 (growing with the checkpoint); and the tail a
cold compactor or a reader must replay stays under a tenth of the
checkpoint. The caps bound the tail where the ratio does not:

- entries: each costs a request to read, so a cold start's tail should
  take no longer to read than the checkpoint takes to download. ``auto``
  (the default) allows one entry per 64 KiB of checkpoint, at least 2,000:
  at about 20 ms a GET with 32 in flight (1,600 a second) against about
  100 MB/s for the checkpoint's parts, both take about as long. A fixed
  2,000 made small runs on a 319 MB checkpoint publish 22.6 bytes per
  entry byte; small entries (label updates) reach any entry cap long
  before the ratio.
- 256 MiB of entries: what a snapshot reader holds in memory, whatever the
  size of the checkpoint.

With any ``ratio`` <= 1 the committed tail stays smaller than the
checkpoint.

**Time to publish** (``publish_seconds``): a run with a deadline (a Lambda
invocation) keeps this long for its publish, sized from the checkpoint's
bytes: archiving and uploading moved 60-80 MB/s in the benchmarks (README
"Performance"); ``PUBLISH_BYTES_PER_SECOND`` assumes a quarter of that, plus
``PUBLISH_FLOOR_SECONDS`` for the requests around it. A new checkpoint is
about the old one plus ``ENTRY_TO_CHECKPOINT`` times the tail's entry bytes
(float32 vectors in entries, Chroma's index and copies in the archive).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deltalog.errors import InvalidInput

__all__ = [
    "AUTO",
    "CHECKPOINT_BYTES_PER_TAIL_ENTRY",
    "DEFAULT_MAX_TAIL_BYTES",
    "DEFAULT_MAX_TAIL_ENTRIES",
    "DEFAULT_RATIO",
    "ENTRY_TO_CHECKPOINT",
    "MIN_AUTO_TAIL_ENTRIES",
    "PUBLISH_BYTES_PER_SECOND",
    "PUBLISH_FLOOR_SECONDS",
    "CheckpointPolicy",
    "EntryCap",
    "Reason",
    "parse_entry_cap",
    "publish_seconds",
    "Tail",
]

Reason = Literal["requested", "first", "ratio", "entries", "bytes"]

EntryCap = int | None | Literal["auto"]
"""A cap on the tail's seqs: a number, None (no cap) or ``AUTO`` (scaled with the checkpoint)."""

AUTO: Literal["auto"] = "auto"
MIN_AUTO_TAIL_ENTRIES = 2_000
CHECKPOINT_BYTES_PER_TAIL_ENTRY = 64 * 1024
DEFAULT_RATIO = 0.1
DEFAULT_MAX_TAIL_ENTRIES: EntryCap = AUTO
DEFAULT_MAX_TAIL_BYTES = 256 * 1024 * 1024
PUBLISH_BYTES_PER_SECOND = 20 * 1024 * 1024
PUBLISH_FLOOR_SECONDS = 5.0
ENTRY_TO_CHECKPOINT = 1.5


def publish_seconds(checkpoint_bytes: int, tail_bytes: int = 0) -> float:
    """Seconds to keep for publishing a checkpoint that follows one of ``checkpoint_bytes``
    and a tail of ``tail_bytes`` of entries (see the module docstring)."""
    expected = checkpoint_bytes + ENTRY_TO_CHECKPOINT * tail_bytes
    return PUBLISH_FLOOR_SECONDS + expected / PUBLISH_BYTES_PER_SECOND


def parse_entry_cap(text: str) -> EntryCap:
    """``auto``, a number of seqs, or 0 (no cap): as the command line and the environment say."""
    value = text.strip().lower()
    if value == AUTO:
        return AUTO
    if not value.isdigit():
        raise InvalidInput(f"{text!r} is not an entry cap: give 'auto', a number, or 0 for no cap")
    return int(value) or None


@dataclass(frozen=True, slots=True)
class Tail:
    """The tail a run would commit, and the checkpoint it follows."""

    entries: int
    """Seqs in ``(snapshot_hwm, new hwm]``."""
    bytes: int
    """Their stored bytes."""
    checkpoint_bytes: int
    """The checkpoint archive's bytes (0 when there is none)."""
    has_checkpoint: bool = True
    shards: int = 1
    """The shards the log's entries are split into: a shard's checkpoint holds its share
    (about ``1/shards``) of the records those bytes carry, so the ratio compares that
    share with it (the caps, which bound what a cold start reads, count every byte)."""


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """When to publish; see the module docstring. ``None`` turns a cap off; ``ratio``
    0 publishes every run that applies anything (what deltalog did before checkpoints)."""

    ratio: float = DEFAULT_RATIO
    max_tail_entries: EntryCap = DEFAULT_MAX_TAIL_ENTRIES
    max_tail_bytes: int | None = DEFAULT_MAX_TAIL_BYTES

    def __post_init__(self) -> None:
        if not self.ratio >= 0:
            raise InvalidInput(f"checkpoint_ratio must be at least 0, not {self.ratio}")
        if isinstance(self.max_tail_entries, str) and self.max_tail_entries != AUTO:
            raise InvalidInput(
                f"max_tail_entries must be a number, None or 'auto', not {self.max_tail_entries!r}"
            )
        for name in ("max_tail_entries", "max_tail_bytes"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:
                raise InvalidInput(f"{name} must be at least 1 (or None for no cap), not {value}")

    def entry_cap(self, checkpoint_bytes: int) -> int | None:
        """The cap on the tail's seqs behind a checkpoint of ``checkpoint_bytes``."""
        if self.max_tail_entries == AUTO:
            return max(MIN_AUTO_TAIL_ENTRIES, checkpoint_bytes // CHECKPOINT_BYTES_PER_TAIL_ENTRY)
        return self.max_tail_entries

    def reason(self, tail: Tail, *, requested: bool = False) -> Reason | None:
        """Why the run should publish a checkpoint, or None to commit hwm alone."""
        if requested:
            return "requested"
        if not tail.has_checkpoint:
            return "first"
        if tail.entries == 0:
            return None
        if tail.bytes / tail.shards >= self.ratio * tail.checkpoint_bytes:
            return "ratio"
        cap = self.entry_cap(tail.checkpoint_bytes)
        if cap is not None and tail.entries >= cap:
            return "entries"
        if self.max_tail_bytes is not None and tail.bytes >= self.max_tail_bytes:
            return "bytes"
        return None
