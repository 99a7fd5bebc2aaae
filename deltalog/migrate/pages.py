"""Pages: what an importer reads from a source at one cursor, and how it enters the log.

- A **page** is a run of records of one source collection read at one
  cursor (the ids it holds, in the source's order). Its **key** is made of
  the source, the collection and the cursor (its first and last id and its
  size), so reading the same source again gives the same keys.
- A page enters the log as one or more ``Upsert`` deltas, each under
  ``max_bytes`` (vectors, documents and metadata counted), each with an
  idempotency key ``{page key}/{part}``. A part already in the log is not
  written again: an interrupted import resumes where it stopped, and a
  repeated import writes nothing.
- A **plan** is what an import would write (``--dry-run``): per collection,
  the records, their dimension and their bytes, and every record the log
  would refuse (``Refused``), counted by reason.
- A **mapping** ``SRC[=DST]`` sends a source collection (or namespace) to a
  collection of another name in the log.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import numpy as np

from deltalog.codec import decode_entry
from deltalog.entry import Batch, Delta, Upsert
from deltalog.errors import CorruptEntry, InvalidInput, ValidationError
from deltalog.fold import Record
from deltalog.log import DeltaLog
from deltalog.producer import Producer
from deltalog.storage.table import Claim
from deltalog.validate import validate_collection_name

__all__ = [
    "CollectionPlan",
    "ImportPlan",
    "ImportResult",
    "Page",
    "PageWriter",
    "Refused",
    "SourceMap",
    "check_dims",
    "durable_claims",
    "page_key",
    "refusal_counts",
    "refusal_error",
]

MiB = 1 << 20


def page_key(kind: str, source: str, collection: str, ids: Sequence[str]) -> str:
    """The idempotency key of a page: its source, collection and cursor."""
    cursor = json.dumps([source, collection, ids[0], ids[-1], len(ids)])
    return f"import:{kind}:{hashlib.sha256(cursor.encode()).hexdigest()[:32]}"


@dataclass(frozen=True, slots=True)
class SourceMap:
    """``SRC[=DST]``: a source collection and the log collection it goes to."""

    source: str
    collection: str

    @classmethod
    def parse(cls, text: str, *, flag: str = "--collection") -> SourceMap:
        source, _, collection = text.partition("=")
        if not source:
            raise InvalidInput(f"{flag} {text!r}: name the source: SRC or SRC=DST")
        collection = collection or source
        try:
            validate_collection_name(collection)
        except ValidationError as exc:
            raise InvalidInput(f"{flag} {text!r}: {exc.reason}") from None
        return cls(source, collection)

    @staticmethod
    def check_distinct(maps: Sequence[SourceMap]) -> None:
        """Refuse two sources sent to one collection: their records would mix."""
        seen: dict[str, str] = {}
        for m in maps:
            other = seen.setdefault(m.collection, m.source)
            if other != m.source:
                raise InvalidInput(
                    f"{other!r} and {m.source!r} would both go to collection "
                    f"{m.collection!r}: give each its own (SRC=DST)"
                )


@dataclass(frozen=True, slots=True)
class Refused:
    """A record the log would refuse, and why."""

    namespace: str
    """The source collection (Chroma) or namespace (Pinecone) it is in."""
    id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.id}: {self.reason}"


_MAX_LISTED = 20


def refusal_error(refused: Sequence[Refused], what: str) -> InvalidInput:
    """The error of a page holding records the log refuses: ``what`` they are, and the
    first of them."""
    listed = "; ".join(str(r) for r in refused[:_MAX_LISTED])
    more = f"; and {len(refused) - _MAX_LISTED} more" if len(refused) > _MAX_LISTED else ""
    return InvalidInput(f"{len(refused)} {what}: {listed}{more}")


def refusal_counts(refused: Sequence[Refused]) -> list[tuple[str, str, int, list[str]]]:
    """Refusals grouped by source and reason: (source, reason, records, the first ids)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in refused:
        groups.setdefault((r.namespace, r.reason), []).append(r.id)
    return [(src, why, len(ids), ids[:3]) for (src, why), ids in sorted(groups.items())]


@dataclass(frozen=True, slots=True)
class Page:
    """Records of one collection read at one cursor, bound for ``collection`` in the log."""

    collection: str
    key: str
    records: list[Record]


@dataclass(slots=True)
class CollectionPlan:
    """One collection of an import: its source, where it goes, what it holds."""

    source: str
    collection: str
    records: int = 0
    dim: int | None = None
    bytes: int = 0
    pages: int = 0


@dataclass(slots=True)
class ImportPlan:
    """What an import would write (``--dry-run``), or wrote."""

    collections: list[CollectionPlan] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(c.records for c in self.collections)

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.collections)


@dataclass(slots=True)
class ImportResult:
    """What an import did: deltas written and skipped (already in the log), the last seq."""

    plan: ImportPlan
    deltas_written: int = 0
    deltas_skipped: int = 0
    records_written: int = 0
    last_seq: int = 0
    seconds: float = 0.0

    @property
    def records_per_second(self) -> float:
        return self.records_written / self.seconds if self.seconds else 0.0


def record_bytes(record: Record) -> int:
    """About what a record costs in an entry: its vector, document and metadata."""
    meta = len(json.dumps(record.metadata)) if record.metadata else 0
    return record.embedding.nbytes + len((record.document or "").encode()) + meta + 64


def check_dims(
    log_dims: dict[str, int], source_dims: dict[str, int | None], *, remap: str = ""
) -> None:
    """Refuse, before anything is written, a source collection of another dimension.

    ``remap`` names the flag that sends a source to another collection.
    """
    clashes = [
        f"{name}: the source has {dim}-dimensional vectors, the log {log_dims[name]}"
        for name, dim in source_dims.items()
        if dim is not None and name in log_dims and log_dims[name] != dim
    ]
    if clashes:
        how = f" ({remap})" if remap else ""
        raise InvalidInput(
            "dimension clash, nothing written: "
            + "; ".join(clashes)
            + f". Import into another collection{how} or another log (--log)"
        )


class PageWriter:
    """Appends pages as byte-sized, idempotent ``Upsert`` deltas through group commit."""

    def __init__(
        self, log: DeltaLog, result: ImportResult, *, max_bytes: int = 4 * MiB, concurrency: int = 8
    ) -> None:
        self.log = log
        self.result = result
        self.max_bytes = max_bytes
        self._limit = anyio.CapacityLimiter(concurrency)

    async def write(self, pages: Sequence[Page]) -> None:
        """Write pages (skipping parts the log holds); raise the first failure as itself."""
        parts = [(page, key, chunk) for page in pages for key, chunk in self._parts(page)]
        held = await durable_claims(self.log, [k for _, k, _ in parts])
        todo = [(page, key, chunk) for page, key, chunk in parts if key not in held]
        self.result.deltas_skipped += len(parts) - len(todo)
        self.result.last_seq = max([self.result.last_seq, *(c.seq for c in held.values())])
        if not todo:
            return
        try:
            async with self.log.producer(linger_ms=2) as producer, anyio.create_task_group() as tg:
                for page, key, chunk in todo:
                    tg.start_soon(self._submit, producer, _delta(page.collection, chunk, key))
        except ExceptionGroup as group:
            raise _first(group) from None

    async def _submit(self, producer: Producer, delta: Delta) -> None:
        async with self._limit:
            seq = await producer.submit(delta)
        self.result.deltas_written += 1
        self.result.records_written += sum(len(op.ids) for op in delta.ops)
        self.result.last_seq = max(self.result.last_seq, seq)

    def _parts(self, page: Page) -> list[tuple[str, list[Record]]]:
        parts: list[tuple[str, list[Record]]] = []
        chunk: list[Record] = []
        size = 0
        for record in page.records:
            cost = record_bytes(record)
            if chunk and size + cost > self.max_bytes:
                parts.append((f"{page.key}/{len(parts)}", chunk))
                chunk, size = [], 0
            chunk.append(record)
            size += cost
        if chunk:
            parts.append((f"{page.key}/{len(parts)}", chunk))
        return parts


async def durable_claims(log: DeltaLog, keys: Sequence[str]) -> dict[str, Claim]:
    """The claims of ``keys`` whose entries are written: those deltas are in the log.

    A claim alone is not enough: a writer stopped between claiming its key
    and writing its entry leaves a claim on a seq that stays empty (and is
    sealed). Such a key is left to the append protocol, which decides.
    """
    claims = await log.table.get_claims(log.keys.log_id, list(keys))
    written: dict[int, str | None] = {}
    for seq in sorted({c.seq for c in claims.values()}):
        key = log.keys.entry(seq)
        stored = await log.store.get(key)
        try:
            entry = decode_entry(stored.data, seq=seq, key=key) if stored else None
        except CorruptEntry:
            entry = None
        written[seq] = entry.entry_id if isinstance(entry, Batch) else None
    return {k: c for k, c in claims.items() if written[c.seq] == c.entry_id}


def _first(group: BaseExceptionGroup[Exception]) -> Exception:
    """The first failure in a (nested) exception group."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def _delta(collection: str, records: list[Record], key: str) -> Delta:
    """One delta; records with and without documents or metadata go in separate ops
    (an op has a document and metadata for every id, or none)."""
    groups: dict[tuple[bool, bool], list[Record]] = {}
    for r in records:
        groups.setdefault((r.document is not None, bool(r.metadata)), []).append(r)
    ops = [
        Upsert(
            collection=collection,
            ids=[r.id for r in group],
            embeddings=np.stack([r.embedding for r in group]),
            documents=[r.document or "" for r in group] if has_doc else None,
            metadatas=[dict(r.metadata or {}) for r in group] if has_meta else None,
        )
        for (has_doc, has_meta), group in groups.items()
    ]
    return Delta(ops=list(ops), idempotency_key=key)
