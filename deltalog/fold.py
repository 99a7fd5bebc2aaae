"""The fold: the net effect of a run of entries, as a pure function.

- A **record** is what a collection stores under one id: a vector, an
  optional document and optional flat metadata.
- A **state** maps collection -> id -> record: what a sink holds.
- A **plan** is the net effect of a run of entries on a state. Per
  collection it holds **puts** (whole records that replace whatever the id
  held), **deletes** (ids to remove) and **patches** (metadata merges for ids
  the plan does not put). The three are disjoint, so a sink may apply them
  in any order; deletes first, then puts, then patches is the natural one.

Per collection and id, the last op in seq order wins; within an entry,
deltas apply in list order and ops within a delta in list order. An upsert
replaces the whole record (``None`` metadata or document means none). A
delete removes it. An ``UpdateMetadata`` merges into an existing record
(``None`` removes a key; a merge that leaves no keys leaves no metadata) and
does nothing to an absent id. These are ChromaDB's semantics for ``update``;
its ``upsert`` merges metadata instead, which is why sinks apply a put as a
delete and an add.

``Folder`` folds a stream of entries chunk by chunk; ``fold`` folds an
iterable at once. A folder for one **shard** of a sharded log
(``Folder(shard=...)``) folds only the records of that shard: each op is
split by ``deltalog.keys.shard_of`` before any record is built, while the
whole entry is still checked and every collection an op names is still
created, so all shards hold the same collections.

``apply_to_state`` is the reference meaning of a plan and
``reference_state`` applies entries op by op without planning (it builds
records as the fold does); the soak checks its results with it. The test
suite holds both against its own oracle, which shares no code with this
module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from deltalog.entry import (
    Delete,
    Entry,
    Metadata,
    MetadataPatch,
    MetadataValue,
    Op,
    UpdateMetadata,
    Upsert,
)
from deltalog.errors import CorruptEntry, InvalidInput
from deltalog.keys import Shard

__all__ = [
    "CollectionPlan",
    "FoldPlan",
    "FoldStatistics",
    "Folder",
    "Record",
    "State",
    "apply_to_state",
    "fold",
    "merge_metadata",
    "record_differences",
    "reference_state",
    "state_differences",
]

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True, eq=False)
class Record:
    """One stored record. Equality is exact: vector bits and metadata value types."""

    id: str
    embedding: Vector
    """1-D float32; may be a read-only view into the entry it came from."""
    document: str | None = None
    metadata: Metadata | None = None
    """Never empty: a record without metadata keys has ``None``."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return self.id == other.id and not record_differences(self, other)

    __hash__ = None  # type: ignore[assignment]


State = dict[str, dict[str, Record]]
"""collection -> id -> record."""


def merge_metadata(
    old: Metadata | None, patch: Mapping[str, MetadataValue | None]
) -> Metadata | None:
    """Chroma's ``update``: set keys, remove those patched to ``None``; empty -> ``None``."""
    merged = dict(old) if old else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged or None


def _patched(record: Record, patch: MetadataPatch) -> Record:
    return Record(
        record.id, record.embedding, record.document, merge_metadata(record.metadata, patch)
    )


@dataclass(slots=True)
class CollectionPlan:
    """The net effect of a run of ops on one collection; the three parts are disjoint."""

    puts: dict[str, Record] = field(default_factory=dict)
    """Whole records that replace whatever the id held (later patches merged in)."""
    deletes: set[str] = field(default_factory=set)
    patches: dict[str, MetadataPatch] = field(default_factory=dict)
    """Metadata merges for ids not put here; a ``None`` value removes the key."""
    embedder: str | None = None
    """The embedder the last upsert that named one said made its vectors."""

    def put(self, record: Record) -> None:
        self.deletes.discard(record.id)
        self.patches.pop(record.id, None)
        self.puts[record.id] = record

    def delete(self, id_: str) -> None:
        self.puts.pop(id_, None)
        self.patches.pop(id_, None)
        self.deletes.add(id_)

    def patch(self, id_: str, patch: MetadataPatch) -> None:
        if id_ in self.puts:
            self.puts[id_] = _patched(self.puts[id_], patch)
        elif id_ not in self.deletes:  # a patch of a deleted id does nothing
            self.patches[id_] = {**self.patches.get(id_, {}), **patch}

    def copy(self) -> CollectionPlan:
        return CollectionPlan(dict(self.puts), set(self.deletes), dict(self.patches), self.embedder)

    @property
    def is_empty(self) -> bool:
        return not (self.puts or self.deletes or self.patches)


@dataclass(frozen=True, slots=True)
class FoldPlan:
    """The net effect of the entries ``first_seq..last_seq``; treat it as read-only."""

    collections: dict[str, CollectionPlan]
    first_seq: int | None = None
    last_seq: int | None = None
    entries: int = 0
    """Entries folded in, seals included."""

    @property
    def vectors_upserted(self) -> int:
        return sum(len(c.puts) for c in self.collections.values())

    @property
    def ids_deleted(self) -> int:
        return sum(len(c.deletes) for c in self.collections.values())

    @property
    def ids_patched(self) -> int:
        return sum(len(c.patches) for c in self.collections.values())

    @property
    def is_empty(self) -> bool:
        """True when applying the plan changes nothing (it may still span seals)."""
        return all(c.is_empty for c in self.collections.values())


@dataclass(frozen=True, slots=True)
class FoldStatistics:
    """What a ``Folder`` has seen since it was created (``reset`` keeps these)."""

    entries: int
    seals: int
    deltas: int
    ops: int
    vectors: int
    """Records put, counted per op (before the fold nets them out)."""
    deletes: int
    patches: int
    last_seq: int | None


@dataclass(slots=True)
class _Counts:
    entries: int = 0
    seals: int = 0
    deltas: int = 0
    ops: int = 0
    vectors: int = 0
    deletes: int = 0
    patches: int = 0


class Folder:
    """Folds entries, in strictly increasing seq, into a plan; ``reset`` starts a new chunk.

    With ``shard``, only the records that shard owns (see the module docstring).
    """

    def __init__(self, *, log: str | None = None, shard: Shard | None = None) -> None:
        self._log = log
        self._shard = shard
        self._collections: dict[str, CollectionPlan] = {}
        self._first_seq: int | None = None
        self._chunk_entries = 0
        self._last_seq: int | None = None
        self._counts = _Counts()

    def add(self, seq: int, entry: Entry) -> None:
        if self._last_seq is not None and seq <= self._last_seq:
            raise InvalidInput(
                f"entries must arrive in strictly increasing seq; got {seq} after {self._last_seq}",
                log=self._log,
                seq=seq,
            )
        ops = [op for delta in entry.deltas for op in delta.ops]
        for op in ops:  # the whole entry first: a bad op must not leave the ones before it folded
            _check_lengths(op, seq=seq, log=self._log)
        for op in ops:
            self._add_op(op)
        self._counts.deltas += len(entry.deltas)
        self._count_entry(seq, entry)

    def _count_entry(self, seq: int, entry: Entry) -> None:
        self._counts.entries += 1
        self._counts.seals += int(entry.is_seal)
        self._chunk_entries += 1
        self._last_seq = seq
        if self._first_seq is None:
            self._first_seq = seq

    def _add_op(self, op: Op) -> None:
        plan = self._collections.setdefault(op.collection, CollectionPlan())
        rows = self._rows(op)
        if rows is not None and not rows:
            return
        self._counts.ops += 1
        if isinstance(op, Upsert):
            for record in _records(op, rows):
                plan.put(record)
            self._counts.vectors += len(rows) if rows is not None else len(op.ids)
            plan.embedder = op.embedder or plan.embedder
        elif isinstance(op, Delete):
            ids = op.ids if rows is None else [op.ids[i] for i in rows]
            for id_ in ids:
                plan.delete(id_)
            self._counts.deletes += len(ids)
        else:
            chosen = range(len(op.ids)) if rows is None else rows
            for i in chosen:
                plan.patch(op.ids[i], op.metadatas[i])
            self._counts.patches += len(chosen)

    def _rows(self, op: Op) -> list[int] | None:
        """The rows of ``op`` this folder's shard owns; None: every row (no shard)."""
        shard = self._shard
        if shard is None:
            return None
        return [i for i, id_ in enumerate(op.ids) if shard.owns(op.collection, id_)]

    def plan(self) -> FoldPlan:
        """The net effect of the entries added since the last ``reset`` (a copy)."""
        collections = {name: plan.copy() for name, plan in self._collections.items()}
        return FoldPlan(collections, self._first_seq, self._last_seq, self._chunk_entries)

    def collection_plan(self, collection: str) -> CollectionPlan:
        """The net effect on one collection of the entries added since the last ``reset``
        (a copy; empty for a collection no entry named)."""
        plan = self._collections.get(collection)
        return plan.copy() if plan is not None else CollectionPlan()

    def reset(self) -> None:
        """Start a new chunk: forget the plan, keep the counters and the last seq."""
        self._collections = {}
        self._first_seq = None
        self._chunk_entries = 0

    def statistics(self) -> FoldStatistics:
        c = self._counts
        return FoldStatistics(
            c.entries, c.seals, c.deltas, c.ops, c.vectors, c.deletes, c.patches, self._last_seq
        )

    @property
    def entries(self) -> int:
        return self._counts.entries

    @property
    def vectors(self) -> int:
        return self._counts.vectors

    @property
    def deletes(self) -> int:
        return self._counts.deletes

    @property
    def patches(self) -> int:
        return self._counts.patches


def fold(
    entries: Iterable[tuple[int, Entry]], *, log: str | None = None, shard: Shard | None = None
) -> FoldPlan:
    """The net effect of ``(seq, entry)`` pairs given in strictly increasing seq."""
    folder = Folder(log=log, shard=shard)
    for seq, entry in entries:
        folder.add(seq, entry)
    return folder.plan()


def apply_to_state(state: State, plan: FoldPlan) -> None:
    """Apply a plan in place: the reference meaning of a plan, and the in-memory sink."""
    for name, changes in plan.collections.items():
        records = state.setdefault(name, {})
        for id_ in changes.deletes:
            records.pop(id_, None)
        records.update(changes.puts)
        for id_, patch in changes.patches.items():
            if id_ in records:
                records[id_] = _patched(records[id_], patch)


def reference_state(entries: Iterable[tuple[int, Entry]], initial: State | None = None) -> State:
    """Apply entries op by op to a copy of ``initial``, without the fold."""
    state = {name: dict(records) for name, records in (initial or {}).items()}
    for _seq, entry in entries:
        for delta in entry.deltas:
            for op in delta.ops:
                _reference_op(state.setdefault(op.collection, {}), op)
    return state


def _reference_op(records: dict[str, Record], op: Op) -> None:
    if isinstance(op, Upsert):
        records.update((r.id, r) for r in _records(op))
    elif isinstance(op, Delete):
        for id_ in op.ids:
            records.pop(id_, None)
    else:
        for id_, patch in zip(op.ids, op.metadatas, strict=True):
            old = records.get(id_)
            if old is not None:
                kept = {k: v for k, v in (old.metadata or {}).items() if k not in patch}
                added = {k: v for k, v in patch.items() if v is not None}
                records[id_] = Record(id_, old.embedding, old.document, {**kept, **added} or None)


def _records(op: Upsert, rows: Sequence[int] | None = None) -> list[Record]:
    """The records of an upsert (of ``rows`` only, when given), in row order."""
    none: list[None] = [None] * len(op.ids)
    documents: Sequence[str | None] = op.documents if op.documents is not None else none
    metadatas: Sequence[Metadata | None] = op.metadatas if op.metadatas is not None else none
    chosen = range(len(op.ids)) if rows is None else rows
    return [
        Record(op.ids[i], op.embeddings[i], documents[i], dict(metadatas[i] or {}) or None)
        for i in chosen
    ]


def _check_lengths(op: Op, *, seq: int, log: str | None) -> None:
    """Validated deltas always pass; a stored op that does not is corrupt."""
    for name, size in _lengths(op):
        if size != len(op.ids):
            raise CorruptEntry(
                f"an op on {op.collection!r} has {len(op.ids)} ids but {size} {name}",
                log=log,
                seq=seq,
            )


def _lengths(op: Op) -> list[tuple[str, int]]:
    if isinstance(op, UpdateMetadata):
        return [("metadatas", len(op.metadatas))]
    if not isinstance(op, Upsert):
        return []
    sizes = [("embeddings", op.embeddings.shape[0] if op.embeddings.ndim == 2 else -1)]
    if op.documents is not None:
        sizes.append(("documents", len(op.documents)))
    if op.metadatas is not None:
        sizes.append(("metadatas", len(op.metadatas)))
    return sizes


def record_differences(expected: Record, actual: Record) -> list[str]:
    """The fields in which two records of the same id differ, exactly."""
    out: list[str] = []
    if not _same_vector(expected.embedding, actual.embedding):
        out.append("vector")
    if expected.document != actual.document:
        out.append(f"document {expected.document!r} != {actual.document!r}")
    if _typed(expected.metadata) != _typed(actual.metadata):
        out.append(f"metadata {expected.metadata!r} != {actual.metadata!r}")
    return out


def state_differences(expected: State, actual: State) -> list[str]:
    """Every difference between two states, one line each, in a stable order."""
    out: list[str] = []
    for name in sorted(expected.keys() | actual.keys()):
        if name not in actual or name not in expected:
            where = "expected" if name in expected else "actual"
            out.append(f"{name}: collection only in {where}")
        mine, theirs = expected.get(name, {}), actual.get(name, {})
        for id_ in sorted(mine.keys() | theirs.keys()):
            if id_ not in theirs:
                out.append(f"{name}/{id_}: missing")
            elif id_ not in mine:
                out.append(f"{name}/{id_}: unexpected")
            else:
                out += [f"{name}/{id_}: {d}" for d in record_differences(mine[id_], theirs[id_])]
    return out


def _same_vector(a: Vector, b: Vector) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _typed(metadata: Metadata | None) -> dict[str, tuple[type, object]] | None:
    """Metadata with value types, so that ``True``, ``1`` and ``1.0`` differ (in lists too)."""
    if not metadata:
        return None
    return {
        k: (list, tuple((type(x), x) for x in v)) if isinstance(v, list) else (type(v), v)
        for k, v in metadata.items()
    }
