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
checkpoint's bytes), ``entries`` and ``bytes`` (the tail reaches a cap).

The defaults were chosen from the benchmarks (README "Performance",
"Checkpoints"): with ``ratio`` = 0.1 a stream of small runs uploads about
ten bytes of checkpoint per byte of entries applied, where publishing
every run uploaded hundreds; and the tail a cold compactor or a reader
must replay stays under a tenth of the checkpoint, so replaying it takes
no longer than downloading the checkpoint. The caps bound the tail where
the ratio does not: 2,000 entries (each costs a request to read: small
entries, such as label updates, reach it long before the ratio) and
256 MiB (what a snapshot reader holds in memory, whatever the size of the
checkpoint). With any ``ratio`` <= 1 the committed tail stays smaller than
the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deltalog.errors import InvalidInput

__all__ = [
    "DEFAULT_MAX_TAIL_BYTES",
    "DEFAULT_MAX_TAIL_ENTRIES",
    "DEFAULT_RATIO",
    "CheckpointPolicy",
    "Reason",
    "Tail",
]

Reason = Literal["requested", "first", "ratio", "entries", "bytes"]

DEFAULT_RATIO = 0.1
DEFAULT_MAX_TAIL_ENTRIES = 2_000
DEFAULT_MAX_TAIL_BYTES = 256 * 1024 * 1024


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


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """When to publish; see the module docstring. ``None`` turns a cap off; ``ratio``
    0 publishes every run that applies anything (what deltalog did before checkpoints)."""

    ratio: float = DEFAULT_RATIO
    max_tail_entries: int | None = DEFAULT_MAX_TAIL_ENTRIES
    max_tail_bytes: int | None = DEFAULT_MAX_TAIL_BYTES

    def __post_init__(self) -> None:
        if not self.ratio >= 0:
            raise InvalidInput(f"checkpoint_ratio must be at least 0, not {self.ratio}")
        for name in ("max_tail_entries", "max_tail_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidInput(f"{name} must be at least 1 (or None for no cap), not {value}")

    def reason(self, tail: Tail, *, requested: bool = False) -> Reason | None:
        """Why the run should publish a checkpoint, or None to commit hwm alone."""
        if requested:
            return "requested"
        if not tail.has_checkpoint:
            return "first"
        if tail.entries == 0:
            return None
        if tail.bytes >= self.ratio * tail.checkpoint_bytes:
            return "ratio"
        if self.max_tail_entries is not None and tail.entries >= self.max_tail_entries:
            return "entries"
        if self.max_tail_bytes is not None and tail.bytes >= self.max_tail_bytes:
            return "bytes"
        return None
