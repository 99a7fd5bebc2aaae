"""The test oracle: what a log means, written from the rules alone (README "Using
the log": "What a log means"; DESIGN.md "Compaction", step 5).

It shares no code with ``deltalog.fold`` (the fold the compactor and fresh
readers use, and ``reference_state``, which reuses the fold's record
builder): it walks entries op by op and applies each rule as the README and
DESIGN.md state it.

- Entries apply in seq order; a seal changes nothing; within an entry the
  deltas apply in list order, and within a delta the ops in list order.
- ``Upsert`` replaces the whole record of each id: its vector, its
  document (``None``: no document) and its metadata (``None`` or no keys:
  no metadata). Nothing of the old record survives.
- ``Delete`` removes the record; deleting an absent id does nothing.
- ``UpdateMetadata`` merges into an existing record: each key set to a
  value is set, each key set to ``None`` is removed, other keys stay; a
  record left with no keys has no metadata. The vector and the document
  stay. An update of an absent id does nothing (it does not create it).
- So the last op in seq order wins; an upsert then a delete is a delete; a
  delete then an upsert is the new record; an update after an upsert merges
  into the upserted metadata.

The state is collection -> id -> ``Record`` (the library's frozen record
type, used here as a plain container). A collection appears once an op
names it, even one that only deletes, as in a sink. ``nearest`` answers a
query the way the README says distances are measured: squared L2.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from deltalog.entry import Delete, Entry, Op, UpdateMetadata, Upsert
from deltalog.fold import Record

__all__ = ["OracleState", "nearest", "oracle_state"]

OracleState = dict[str, dict[str, Record]]


def oracle_state(
    entries: Iterable[tuple[int, Entry]], initial: OracleState | None = None
) -> OracleState:
    """The state after ``entries`` (``(seq, entry)`` in increasing seq) on ``initial``."""
    state = {name: dict(records) for name, records in (initial or {}).items()}
    last = 0
    for seq, entry in entries:
        assert seq > last, f"entries out of order: {seq} after {last}"
        last = seq
        for delta in entry.deltas:
            for op in delta.ops:
                _apply(state.setdefault(op.collection, {}), op)
    return state


def _apply(records: dict[str, Record], op: Op) -> None:
    if isinstance(op, Upsert):
        for i, id_ in enumerate(op.ids):
            vector = np.array(op.embeddings[i], dtype=np.float32, copy=True)
            document = op.documents[i] if op.documents is not None else None
            given = op.metadatas[i] if op.metadatas is not None else None
            records[id_] = Record(id_, vector, document, dict(given) if given else None)
    elif isinstance(op, Delete):
        for id_ in op.ids:
            records.pop(id_, None)
    elif isinstance(op, UpdateMetadata):
        for id_, patch in zip(op.ids, op.metadatas, strict=True):
            old = records.get(id_)
            if old is None:
                continue
            merged = dict(old.metadata or {})
            for key, value in patch.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            records[id_] = Record(id_, old.embedding, old.document, merged or None)
    else:
        raise TypeError(f"the oracle does not know {type(op).__name__}")


def nearest(records: dict[str, Record], query: np.ndarray, n: int) -> list[tuple[float, str]]:
    """The ``n`` records nearest ``query``: (squared L2 distance, id), nearest first."""
    q = np.asarray(query, dtype=np.float64)
    scored = [
        (float(((r.embedding.astype(np.float64) - q) ** 2).sum()), id_)
        for id_, r in records.items()
    ]
    return sorted(scored)[:n]
