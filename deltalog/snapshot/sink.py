"""The sink seam: where fold plans land.

A **sink** holds a state (collection -> id -> record) and applies plans to
it. ``ChromaSink`` is a ChromaDB persistent directory; ``MemorySink`` holds
dicts and is a real adapter that runs the same contract tests.

Contract:

- ``apply`` gives exactly ``deltalog.fold.apply_to_state``: deletes, then
  puts that replace whole records, then metadata patches (``None`` removes a
  key; a patch of an absent id does nothing). Collections are created on
  first use, even by a plan that only deletes. A collection's vector
  dimension is fixed by its first put; a put of another one is a
  ``DataError``.
- ``counts`` and ``collections`` list every collection, empty ones included;
  ``records`` returns a collection's records sorted by id (none for a
  collection that does not exist), vectors bit-exact.
- ``aclose`` is idempotent; any other call after it raises ``Closed``.
- A plan's collection that names its embedder (``CollectionPlan.embedder``)
  records it on the collection (``embedder`` reads it back); in Chroma, as
  the collection metadata ``deltalog:embedder``.

ChromaDB semantics this relies on (chromadb 1.5): ``add`` of an existing id
is silently ignored and ``upsert`` merges metadata and keeps the old document
when given none, so a put is applied as a delete of the ids that exist
followed by an ``add`` (a Chroma server, which others read while it is
written, replaces records in place instead: ``deltalog.snapshot.server``).
``update`` merges metadata like a patch, skips absent ids, and leaves
``None`` metadata when the last key is removed. Vectors are
stored as float32 and read back as float64 that converts back exactly.
Every blocking call runs in a worker thread, in batches of
``get_max_batch_size()``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, TypeVar, cast

import anyio
import anyio.to_thread
import numpy as np

from deltalog.entry import Metadata, MetadataPatch
from deltalog.errors import Closed, DataError
from deltalog.fold import CollectionPlan, FoldPlan, Record, State, apply_to_state
from deltalog.snapshot.distinct import DistinctHit, DistinctIndex
from deltalog.snapshot.hnsw import persist_often

if TYPE_CHECKING:  # importing chromadb takes a second: only ChromaSink pays for it
    from chromadb.api.client import Client
    from chromadb.api.models.Collection import Collection
    from chromadb.api.types import Metadata as ChromaMetadata

__all__ = ["EMBEDDER_KEY", "ApplyStats", "ChromaSink", "Distinct", "Hit", "MemorySink", "Sink"]

EMBEDDER_KEY = "deltalog:embedder"
"""The collection metadata key naming the embedder that made its vectors, when the log
says (``Upsert.embedder``): what a plain Chroma client reads to embed its queries alike."""

T = TypeVar("T")

Distinct = Literal["off", "use", "keep"]
"""What a Chroma sink does with the snapshot's distinct index (``deltalog.snapshot.distinct``):
``keep`` creates it (indexing existing collections first) and keeps it in step;
``use`` queries it when the directory has one; ``off`` ignores it."""


@dataclass(frozen=True, slots=True)
class ApplyStats:
    """What one ``apply`` did: ids in the plan's parts, and the sink calls it took."""

    deletes: int
    puts: int
    patches: int
    batches: int = 0
    seconds: float = 0.0
    removed: int = 0
    """Ids of the plan's deletes that the sink held: what was deleted (a delete of an
    id that does not exist changes nothing and is not counted)."""


class Sink(Protocol):
    """Where plans are applied; see the module docstring for the contract."""

    async def apply(self, plan: FoldPlan) -> ApplyStats: ...

    async def counts(self) -> dict[str, int]: ...

    async def records(self, collection: str) -> list[Record]: ...

    async def collections(self) -> list[str]: ...

    async def aclose(self) -> None: ...


def _open_client(path: Path) -> Client:
    import chromadb
    from chromadb.api.client import Client
    from chromadb.config import Settings

    path.mkdir(parents=True, exist_ok=True)
    client = chromadb.PersistentClient(
        path=str(path), settings=Settings(anonymized_telemetry=False)
    )
    if not isinstance(client, Client):  # close() is only on the concrete client
        raise TypeError(f"chromadb returned a {type(client).__name__}, not a Client")
    return client


@dataclass(frozen=True, slots=True)
class Hit:
    """A record found by a query or a filter; ``distance`` is None for a filter."""

    id: str
    document: str | None
    metadata: Metadata | None
    distance: float | None = None


class ChromaSink:
    """A ChromaDB persistent directory as a sink; open it with ``ChromaSink.open``.

    Besides the sink contract it answers reads (``query``, ``select``,
    ``fetch``, ``space``, ``dim``) for ``deltalog.Reader``.
    """

    def __init__(
        self,
        client: Client,
        path: Path,
        *,
        limiter: anyio.CapacityLimiter | None = None,
        log: str | None = None,
        batch_size: int,
        where: str | None = None,
        distinct: DistinctIndex | None = None,
        keep_distinct: bool = False,
    ) -> None:
        """Use ``ChromaSink.open``; ``batch_size`` must not exceed Chroma's maximum.

        ``where`` names the sink in errors (default: the path).
        """
        self._client: Client | None = client
        self.path = path
        self._where = where or str(path)
        self._limiter = limiter
        self._log = log
        self._batch = batch_size
        self._handles: dict[str, Collection] = {}
        self._lock = anyio.Lock()
        self._distinct = distinct
        self._keep_distinct = keep_distinct
        self._indexed: set[str] = set()
        """Collections the distinct index is known to hold whole."""
        self._searched: set[str] = set()
        """Collections known to be searched through the distinct index."""

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        limiter: anyio.CapacityLimiter | None = None,
        log: str | None = None,
        max_batch_size: int | None = None,
        distinct: Distinct = "use",
    ) -> ChromaSink:
        """Open (or create) the directory.

        ``log`` only names it in errors; ``max_batch_size`` lowers Chroma's own
        maximum (tests use it to exercise batching); ``distinct`` says what to
        do with the distinct index (``Distinct``).
        """
        with _chroma_errors(f"open {path}", log):
            client = await anyio.to_thread.run_sync(_open_client, path, limiter=limiter)
            most = await anyio.to_thread.run_sync(client.get_max_batch_size, limiter=limiter)
            index = None
            if distinct != "off":
                index = await anyio.to_thread.run_sync(
                    _open_distinct, path, distinct == "keep", limiter=limiter
                )
        batch_size = min(most, max_batch_size or most)
        sink = cls(client, path, limiter=limiter, log=log, batch_size=batch_size, distinct=index)
        sink._keep_distinct = distinct == "keep"
        return sink

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def batch_size(self) -> int:
        return self._batch

    async def apply(self, plan: FoldPlan) -> ApplyStats:
        started = time.perf_counter()
        async with self._lock:
            batches = removed = 0
            for name, changes in plan.collections.items():
                calls, gone = await self._apply_collection(name, changes)
                batches, removed = batches + calls, removed + gone
        return _stats(plan, batches, time.perf_counter() - started, removed)

    async def _apply_collection(self, name: str, changes: CollectionPlan) -> tuple[int, int]:
        """Apply one collection's changes: the calls it took and the deleted ids that existed."""
        collection = await self._collection(name)
        distinct = await self._kept_distinct(name)
        removals = sorted(self._removals(changes))
        puts = list(changes.puts.values())
        patches = [(id_, patch) for id_, patch in changes.patches.items() if patch]
        calls = removed = 0
        for ids in _chunks(removals, self._batch):
            existing = await self._run(f"delete from {name!r}", _remove_existing, collection, ids)
            calls += 1 + bool(existing)
            removed += len(changes.deletes.intersection(existing))
        for records in _chunks(puts, self._batch):
            calls += await self._run(f"add to {name!r}", self._put, collection, records)
        for some in _chunks(patches, self._batch):
            calls += await self._run(f"update {name!r}", _update, collection, some)
        if distinct is not None and (changes.deletes or puts):
            replaced = sorted(changes.deletes | changes.puts.keys())
            await self._index(distinct, name, replaced, puts)
        if changes.embedder is not None:
            calls += await self.set_embedder(name, changes.embedder)
        return calls, removed

    async def embedder(self, collection: str) -> str | None:
        """The embedder the collection's metadata says made its vectors (``EMBEDDER_KEY``)."""
        handle = await self._existing(collection)
        value = (handle.metadata or {}).get(EMBEDDER_KEY) if handle is not None else None
        return value if isinstance(value, str) else None

    async def set_embedder(self, collection: str, embedder: str) -> int:
        """Record the embedder in the collection's metadata; the calls it took (0: it was)."""
        handle = await self._collection(collection)
        if (handle.metadata or {}).get(EMBEDDER_KEY) == embedder:
            return 0
        await self._run(f"record the embedder of {collection!r}", _set_embedder, handle, embedder)
        return 1

    async def _index(
        self, distinct: DistinctIndex, name: str, removals: list[str], puts: list[Record]
    ) -> None:
        """Keep the distinct index in step; give ``name`` its points once it needs them."""
        what = f"index the distinct vectors of {name!r}"
        space = await self.space(name)
        batch = self._batch
        if await self._run(what, distinct.update, name, space, removals, puts, batch):
            async for page in self.pages(name):
                await self._run(what, distinct.add_points, name, space, page, batch)
            await self._run(what, distinct.mark_searchable, name)

    async def _kept_distinct(self, name: str) -> DistinctIndex | None:
        """The distinct index when it holds ``name`` whole (an apply keeps it in step).

        A sink that keeps it indexes a collection it does not hold yet (a
        snapshot written before it existed) first, from every record.
        """
        distinct = self._distinct
        if distinct is None:
            return None
        if await self._holds(distinct, name):
            return distinct
        if not self._keep_distinct:
            return None
        await self._run(f"index {name!r}", distinct.reset, name)
        async for page in self.pages(name):
            await self._index(distinct, name, [], page)
        await self._run(f"index {name!r}", distinct.mark_indexed, name)
        self._indexed.add(name)
        return distinct

    async def index_distinct(self) -> None:
        """Make the distinct index hold every collection (a sink that keeps it)."""
        for name in await self.collections():
            await self._kept_distinct(name)

    def _removals(self, changes: CollectionPlan) -> set[str]:
        """The ids deleted before the puts: a put replaces the whole record, as a delete
        of the id then an ``add`` (see the module docstring)."""
        return changes.deletes | changes.puts.keys()

    def _put(self, collection: Collection, records: list[Record]) -> int:
        """Write ``records`` (blocking), after ``_removals``; returns the calls made."""
        return _add(collection, records)

    async def counts(self) -> dict[str, int]:
        names = await self.collections()
        return {
            name: await self._run("count", _count, await self._collection(name)) for name in names
        }

    async def records(self, collection: str) -> list[Record]:
        if collection not in await self.collections():
            return []
        handle = await self._collection(collection)
        out: list[Record] = []
        while True:
            page = await self._run(f"read {collection!r}", _page, handle, len(out), self._batch)
            out += page
            if len(page) < self._batch:
                return sorted(out, key=lambda r: r.id)

    async def pages(self, collection: str, size: int | None = None) -> AsyncIterator[list[Record]]:
        """A collection's records a page at a time, in Chroma's storage order."""
        if collection not in await self.collections():
            return
        handle = await self._collection(collection)
        size = size or self._batch
        offset = 0
        while True:
            page = await self._run(f"read {collection!r}", _page, handle, offset, size)
            if page:
                yield page
            if len(page) < size:
                return
            offset += len(page)

    async def hnsw(self, collection: str) -> dict[str, Any]:
        """The collection's HNSW settings (space, ef_construction, ...); {} if unknown."""
        handle = await self._existing(collection)
        config = (getattr(handle, "configuration_json", None) or {}) if handle else {}
        return dict(config.get("hnsw") or {})

    async def collections(self) -> list[str]:
        client = self._open_client()
        listed = await self._run("list collections", client.list_collections)
        return sorted(str(getattr(c, "name", c)) for c in listed)

    async def aclose(self) -> None:
        """Close the client, so the directory can be archived; idempotent."""
        async with self._lock:
            client, self._client = self._client, None
            distinct, self._distinct = self._distinct, None
            self._handles.clear()
            with _chroma_errors(f"close {self._where}", self._log):
                if distinct is not None:
                    await anyio.to_thread.run_sync(distinct.close, limiter=self._limiter)
                if client is not None:
                    await anyio.to_thread.run_sync(client.close, limiter=self._limiter)

    # -- reads ----------------------------------------------------------------

    async def query(
        self,
        collection: str,
        embeddings: np.ndarray[Any, np.dtype[np.float32]],
        n_results: int,
        where: Mapping[str, Any] | None,
    ) -> list[list[Hit]]:
        """The nearest ``n_results`` records per query vector, Chroma's distances.

        Without ``where``, through the distinct index when the directory has
        one holding the collection; otherwise Chroma's own collection answers.
        """
        handle = await self._existing(collection)
        if handle is None or n_results <= 0:
            return [[] for _ in range(len(embeddings))]
        what = f"query {collection!r}"
        distinct = self._distinct
        if where is None and distinct is not None and await self._searchable(distinct, collection):
            space = await self.space(collection)
            found = await self._run(what, distinct.query, collection, space, embeddings, n_results)
            return await self._run(what, _described, handle, found)
        return await self._run(what, _query, handle, embeddings, n_results, where)

    async def _searchable(self, distinct: DistinctIndex, collection: str) -> bool:
        if collection not in self._searched:
            if not await self._run("read", distinct.searchable, collection):
                return False
            self._searched.add(collection)
        return True

    async def _holds(self, distinct: DistinctIndex, collection: str) -> bool:
        if collection not in self._indexed:
            if not await self._run("read", distinct.indexes, collection):
                return False
            self._indexed.add(collection)
        return True

    async def select(
        self,
        collection: str,
        ids: list[str] | None,
        where: Mapping[str, Any] | None,
        limit: int | None = None,
    ) -> list[Hit]:
        """Records by ids and/or metadata filter, without vectors."""
        handle = await self._existing(collection)
        if handle is None:
            return []
        return await self._run(f"get from {collection!r}", _select, handle, ids, where, limit)

    async def fetch(self, collection: str, ids: list[str]) -> list[Record]:
        """Whole records (vectors included) of the ids that exist."""
        handle = await self._existing(collection)
        if handle is None or not ids:
            return []
        return await self._run(f"read {collection!r}", _fetch, handle, ids)

    async def space(self, collection: str) -> str:
        """The collection's distance function: ``l2`` (Chroma's default), ``ip`` or ``cosine``."""
        handle = await self._existing(collection)
        if handle is None:
            return "l2"
        config = getattr(handle, "configuration_json", None) or {}
        hnsw = config.get("hnsw") or {}
        return str(hnsw.get("space") or (handle.metadata or {}).get("hnsw:space") or "l2")

    async def _existing(self, name: str) -> Collection | None:
        if name in self._handles:
            return self._handles[name]
        if name not in await self.collections():
            return None
        return await self._collection(name)

    async def _collection(self, name: str) -> Collection:
        handle = self._handles.get(name)
        if handle is None:
            handle = await self._open_collection(name)
            self._handles[name] = handle
        return handle

    async def _open_collection(self, name: str) -> Collection:
        """Get or create a collection (subclasses add settings and checks); it saves its
        index every ``PERSIST_EVERY`` records (``deltalog.snapshot.hnsw``)."""
        create = self._open_client().get_or_create_collection
        return await self._run(f"create {name!r}", _create, create, name)

    def _open_client(self) -> Client:
        if self._client is None:
            raise Closed(f"the chroma sink at {self._where} is closed", log=self._log)
        return self._client

    async def _run(self, what: str, func: Callable[..., T], *args: Any) -> T:
        self._open_client()
        with _chroma_errors(f"{what} in {self._where}", self._log):
            return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter)


@contextmanager
def _chroma_errors(what: str, log: str | None) -> Iterator[None]:
    """Chroma's refusals become ``DataError``: the log holds something it cannot take."""
    from chromadb.errors import ChromaError

    try:
        yield
    except (ChromaError, ValueError) as exc:
        raise DataError(f"chroma could not {what}: {exc}", log=log) from exc


def _open_distinct(path: Path, create: bool) -> DistinctIndex | None:
    return DistinctIndex.open(path, _open_client, create=create)


def _create(create: Callable[..., Collection], name: str) -> Collection:
    handle = create(name, embedding_function=None)
    persist_often(handle)  # before its first operation loads its index
    return handle


def _remove_existing(collection: Collection, ids: list[str]) -> list[str]:
    """Delete the ids that exist (deleting absent ids costs as much as an add); return them."""
    existing: list[str] = list(collection.get(ids=ids, include=[])["ids"])
    if existing:
        collection.delete(ids=existing)
    return existing


def _set_embedder(collection: Collection, embedder: str) -> None:
    # Chroma refuses "hnsw:" keys in a modify (the distance function is fixed at
    # creation, and kept in the collection's configuration): carry the others over.
    kept = {k: v for k, v in (collection.metadata or {}).items() if not k.startswith("hnsw:")}
    collection.modify(metadata={**kept, EMBEDDER_KEY: embedder})


def _add(collection: Collection, records: list[Record]) -> int:
    documents = [r.document for r in records]
    metadatas = [r.metadata for r in records]
    # Chroma takes None entries for records without a document or metadata;
    # its type hints do not say so. Its vectors as a list of the records'
    # float32 rows: Chroma splits a matrix into rows anyway, so stacking them
    # would only copy every vector once more.
    rows: list[Any] = [r.embedding for r in records]
    collection.add(
        ids=[r.id for r in records],
        embeddings=rows,
        documents=cast("list[str]", documents) if _any_set(documents) else None,
        metadatas=cast("list[ChromaMetadata]", metadatas) if _any_set(metadatas) else None,
    )
    return 1


def _any_set(values: list[T | None]) -> bool:
    return any(v is not None for v in values)


def _update(collection: Collection, patches: list[tuple[str, MetadataPatch]]) -> int:
    collection.update(ids=[id_ for id_, _ in patches], metadatas=[p for _, p in patches])
    return 1


def _count(collection: Collection) -> int:
    return collection.count()


def _page(collection: Collection, offset: int, limit: int) -> list[Record]:
    got = collection.get(
        include=["embeddings", "documents", "metadatas"], offset=offset, limit=limit
    )
    ids = list(got["ids"])
    if not ids:
        return []
    # Chroma stores float32 and returns float64: the conversion back is exact.
    vectors = np.asarray(got["embeddings"], dtype=np.float64).astype(np.float32)
    none: list[None] = [None] * len(ids)
    documents: Sequence[str | None] = got["documents"] or none
    metadatas: Sequence[Mapping[str, object] | None] = got["metadatas"] or none
    return [
        Record(id_, vectors[i], documents[i], _metadata(id_, metadatas[i]))
        for i, id_ in enumerate(ids)
    ]


def _query(
    collection: Collection,
    embeddings: np.ndarray[Any, np.dtype[np.float32]],
    n_results: int,
    where: Mapping[str, Any] | None,
) -> list[list[Hit]]:
    n = min(n_results, collection.count())
    if n == 0:
        return [[] for _ in range(len(embeddings))]
    got = collection.query(
        query_embeddings=embeddings,
        n_results=n,
        where=cast("Any", where),
        include=["documents", "metadatas", "distances"],
    )
    out: list[list[Hit]] = []
    for q, ids in enumerate(got["ids"]):
        none: list[None] = [None] * len(ids)
        docs: Sequence[str | None] = got["documents"][q] if got["documents"] else none
        metas: Sequence[Mapping[str, object] | None] = (
            got["metadatas"][q] if got["metadatas"] else none
        )
        dists: Sequence[float] = got["distances"][q] if got["distances"] else [0.0] * len(ids)
        out.append(
            [
                Hit(id_, docs[i], _metadata(id_, metas[i]), float(dists[i]))
                for i, id_ in enumerate(ids)
            ]
        )
    return out


def _described(collection: Collection, found: list[list[DistinctHit]]) -> list[list[Hit]]:
    """Records found through the distinct index, with their documents and metadata."""
    ids = sorted({hit.id for hits in found for hit in hits})
    got = collection.get(ids=ids, include=["documents", "metadatas"]) if ids else None
    rows: dict[str, tuple[str | None, Metadata | None]] = {}
    if got is not None:
        listed = list(got["ids"])
        docs: Sequence[str | None] = got["documents"] or [None] * len(listed)
        metas: Sequence[Mapping[str, object] | None] = got["metadatas"] or [None] * len(listed)
        rows = {id_: (docs[i], _metadata(id_, metas[i])) for i, id_ in enumerate(listed)}
    return [[Hit(h.id, *rows[h.id], h.distance) for h in hits if h.id in rows] for hits in found]


def _select(
    collection: Collection,
    ids: list[str] | None,
    where: Mapping[str, Any] | None,
    limit: int | None,
) -> list[Hit]:
    got = collection.get(
        ids=ids, where=cast("Any", where), limit=limit, include=["documents", "metadatas"]
    )
    found = list(got["ids"])
    docs: Sequence[str | None] = got["documents"] or [None] * len(found)
    metas: Sequence[Mapping[str, object] | None] = got["metadatas"] or [None] * len(found)
    return [Hit(id_, docs[i], _metadata(id_, metas[i])) for i, id_ in enumerate(found)]


def _fetch(collection: Collection, ids: list[str]) -> list[Record]:
    got = collection.get(ids=ids, include=["embeddings", "documents", "metadatas"])
    found = list(got["ids"])
    if not found:
        return []
    vectors = np.asarray(got["embeddings"], dtype=np.float64).astype(np.float32)
    docs: Sequence[str | None] = got["documents"] or [None] * len(found)
    metas: Sequence[Mapping[str, object] | None] = got["metadatas"] or [None] * len(found)
    return [
        Record(id_, vectors[i], docs[i], _metadata(id_, metas[i])) for i, id_ in enumerate(found)
    ]


def _metadata(id_: str, raw: Mapping[str, object] | None) -> Metadata | None:
    """Chroma's metadata as deltalog's: flat str, int, float or bool values, or lists of one."""
    out: Metadata = {}
    for key, value in (raw or {}).items():
        if isinstance(value, list) and all(isinstance(v, str | int | float | bool) for v in value):
            out[key] = list(value)
        elif isinstance(value, str | int | float | bool):
            out[key] = value
        else:
            raise ValueError(f"record {id_!r} has metadata {key!r} of type {type(value).__name__}")
    return out or None


def _chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _stats(plan: FoldPlan, batches: int, seconds: float, removed: int) -> ApplyStats:
    return ApplyStats(
        plan.ids_deleted, plan.vectors_upserted, plan.ids_patched, batches, seconds, removed
    )


class MemorySink:
    """A sink in dicts: ``apply_to_state`` with the Chroma sink's dimension rule."""

    def __init__(self, *, log: str | None = None) -> None:
        self._state: State = {}
        self._dims: dict[str, int] = {}
        self._embedders: dict[str, str] = {}
        self._log = log
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def apply(self, plan: FoldPlan) -> ApplyStats:
        started = time.perf_counter()
        self._check_open()
        dims = dict(self._dims)
        for name, changes in plan.collections.items():
            for record in changes.puts.values():
                self._check_dim(dims, name, record)
        removed = sum(
            len(changes.deletes.intersection(self._state.get(name, {})))
            for name, changes in plan.collections.items()
        )
        apply_to_state(self._state, plan)
        self._dims = dims
        for name, changes in plan.collections.items():
            if changes.embedder is not None:
                self._embedders[name] = changes.embedder
        return _stats(plan, 0, time.perf_counter() - started, removed)

    async def embedder(self, collection: str) -> str | None:
        self._check_open()
        return self._embedders.get(collection)

    def _check_dim(self, dims: dict[str, int], name: str, record: Record) -> None:
        dim = dims.setdefault(name, record.embedding.shape[0])
        if record.embedding.shape != (dim,):
            raise DataError(
                f"collection {name!r} holds {dim}-dimensional vectors; "
                f"{record.id!r} has shape {record.embedding.shape}",
                log=self._log,
            )

    async def counts(self) -> dict[str, int]:
        self._check_open()
        return {name: len(records) for name, records in sorted(self._state.items())}

    async def records(self, collection: str) -> list[Record]:
        self._check_open()
        return sorted(self._state.get(collection, {}).values(), key=lambda r: r.id)

    async def collections(self) -> list[str]:
        self._check_open()
        return sorted(self._state)

    def state(self) -> State:
        """A copy of the state (the records themselves are shared and immutable)."""
        self._check_open()
        return {name: dict(records) for name, records in self._state.items()}

    async def aclose(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("the memory sink is closed", log=self._log)
