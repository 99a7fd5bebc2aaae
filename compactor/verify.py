"""Verify: a rebuilt state compared with a committed snapshot, record by record.

Two sinks are equal when they hold the same collections, and in each the
same ids with bit-identical vectors, equal documents and equal metadata
(values of the same types: ``True`` is not ``1``). Differences are listed
(at most ``limit`` of them) so an operator sees what diverged, not just
that something did.

Both sides should be read from the same kind of sink: ChromaDB stores float
metadata through a JSON round trip that may change the last bit of floats
with 16-17 significant digits, deterministically, so Chroma compared with
Chroma is exact while Chroma compared with a plain-Python fold may not be.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deltalog.fold import State, state_differences
from deltalog.snapshot.sink import Sink

__all__ = ["VerifyResult", "compare_sinks", "sink_state"]


@dataclass(frozen=True, slots=True)
class VerifyResult:
    hwm: int
    """The committed hwm that was verified."""
    rebuilt_to: int
    """The seq the rebuild reached (equal to ``hwm`` unless the log is damaged)."""
    records: int
    differences: list[str] = field(default_factory=list)
    difference_count: int = 0
    shard: int | None = None
    """The shard verified (its index), or None for a log without shards."""

    @property
    def ok(self) -> bool:
        return self.difference_count == 0 and self.rebuilt_to == self.hwm


async def sink_state(sink: Sink) -> State:
    """Every record of a sink, by collection and id."""
    return {c: {r.id: r for r in await sink.records(c)} for c in await sink.collections()}


async def compare_sinks(
    expected: Sink, actual: Sink, *, hwm: int, rebuilt_to: int, limit: int = 50
) -> VerifyResult:
    """Compare every record of ``actual`` with ``expected``."""
    differences: list[str] = []
    if rebuilt_to != hwm:
        differences.append(f"the rebuild stopped at seq {rebuilt_to}, before the hwm {hwm}")
    got = await sink_state(actual)
    differences += state_differences(await sink_state(expected), got)
    records = sum(len(records) for records in got.values())
    return VerifyResult(hwm, rebuilt_to, records, differences[:limit], len(differences))
