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

The **index check** asks the committed side's index what readers ask it:
``index_queries`` vectors per collection, each a stored vector moved
slightly (seeded, so a rerun asks the same), ``K`` nearest each, against
brute force over the same records. **recall** is the share of the exact
``K`` nearest that came back (a tie at the ``K``-th distance counts as
found); a collection below ``min_recall`` fails verify.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from deltalog.fold import Record, State, state_differences
from deltalog.snapshot.sink import ChromaSink, Sink

__all__ = [
    "DEFAULT_INDEX_QUERIES",
    "DEFAULT_MIN_RECALL",
    "K",
    "IndexCheck",
    "VerifyResult",
    "check_index",
    "compare_sinks",
    "sink_state",
]

K = 10
DEFAULT_INDEX_QUERIES = 100
"""Sampled queries per collection (``verify --index-queries``; 0 skips the check)."""
DEFAULT_MIN_RECALL = 0.99
"""The recall@10 below which verify fails (``verify --min-recall``): README "Search quality"."""
_SEED = 19


@dataclass(frozen=True, slots=True)
class IndexCheck:
    """Recall@``K`` of the committed side's index against brute force."""

    queries: int
    """Queries asked, over every collection."""
    min_recall: float
    recall: dict[str, float] = field(default_factory=dict)
    """Per collection with records."""

    @property
    def lowest(self) -> float | None:
        return min(self.recall.values()) if self.recall else None

    @property
    def ok(self) -> bool:
        return all(r >= self.min_recall for r in self.recall.values())


@dataclass(frozen=True, slots=True)
class VerifyResult:
    hwm: int
    """The committed hwm that was verified."""
    rebuilt_to: int
    """The seq the rebuild reached (equal to ``hwm`` unless the log is damaged)."""
    records: int
    differences: list[str] = field(default_factory=list)
    difference_count: int = 0
    index: IndexCheck | None = None
    """The index check (None when skipped)."""

    @property
    def ok(self) -> bool:
        index_ok = self.index is None or self.index.ok
        return self.difference_count == 0 and self.rebuilt_to == self.hwm and index_ok


async def sink_state(sink: Sink) -> State:
    """Every record of a sink, by collection and id."""
    return {c: {r.id: r for r in await sink.records(c)} for c in await sink.collections()}


async def compare_sinks(
    expected: Sink,
    actual: Sink,
    *,
    hwm: int,
    rebuilt_to: int,
    limit: int = 50,
    index_queries: int = 0,
    min_recall: float = DEFAULT_MIN_RECALL,
) -> VerifyResult:
    """Compare every record of ``actual`` with ``expected``; with ``index_queries``,
    check ``actual``'s index too (a Chroma sink's)."""
    differences: list[str] = []
    if rebuilt_to != hwm:
        differences.append(f"the rebuild stopped at seq {rebuilt_to}, before the hwm {hwm}")
    got = await sink_state(actual)
    differences += state_differences(await sink_state(expected), got)
    records = sum(len(records) for records in got.values())
    index = None
    if index_queries > 0 and isinstance(actual, ChromaSink):
        index = await check_index(actual, got, queries=index_queries, min_recall=min_recall)
        for name, recall in sorted(index.recall.items()):
            if recall < min_recall:
                differences.append(
                    f"collection {name!r}: the index found {recall:.4f} of the {K} nearest "
                    f"records (brute force), below {min_recall}"
                )
    return VerifyResult(hwm, rebuilt_to, records, differences[:limit], len(differences), index)


async def check_index(
    sink: ChromaSink, state: State, *, queries: int, min_recall: float
) -> IndexCheck:
    """Recall@``K`` of ``sink``'s vector queries over ``state`` (its records)."""
    recall: dict[str, float] = {}
    asked = 0
    for name, records in sorted(state.items()):
        if not records:
            continue
        held = sorted(records.values(), key=lambda r: r.id)
        probes = _probes(held, queries)
        found = await sink.query(name, probes, K, None)
        exact = _distances(await sink.space(name), probes, held)
        kth = np.sort(exact, axis=1)[:, min(K, len(held)) - 1]
        hits = [
            sum(1 for h in row[:K] if (h.distance or 0.0) <= kth[q] + 1e-4 + 1e-4 * abs(kth[q]))
            for q, row in enumerate(found)
        ]
        recall[name] = round(float(np.mean(hits)) / min(K, len(held)), 4)
        asked += len(probes)
    return IndexCheck(asked, min_recall, recall)


def _probes(held: list[Record], count: int) -> npt.NDArray[np.float32]:
    """``count`` stored vectors, each moved by noise of about 5 % of the typical norm."""
    rng = np.random.default_rng(_SEED)
    matrix = np.stack([r.embedding for r in held]).astype(np.float32)
    picked = matrix[rng.choice(len(held), min(count, len(held)), replace=False)]
    scale = 0.05 * float(np.median(np.linalg.norm(matrix, axis=1))) / np.sqrt(matrix.shape[1])
    noise = rng.normal(0.0, scale or 1e-3, picked.shape)
    return (picked + noise).astype(np.float32)


def _distances(
    space: str, probes: npt.NDArray[np.float32], held: list[Record]
) -> npt.NDArray[np.float64]:
    """Chroma's distances from each probe to every record, in float64."""
    q = probes.astype(np.float64)
    m = np.stack([r.embedding for r in held]).astype(np.float64)
    if space == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
        m = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-30)
    if space in ("ip", "cosine"):
        similarity: npt.NDArray[np.float64] = q @ m.T
        return 1.0 - similarity
    squared: npt.NDArray[np.float64] = (
        (q * q).sum(axis=1)[:, None] - 2.0 * (q @ m.T) + (m * m).sum(axis=1)[None, :]
    )
    return np.maximum(squared, 0.0)
