"""Readers: the committed state (a checkpoint plus its tail), optionally with the fresh tail.

- The **checkpoint** is the published snapshot the committed state points
  to, downloaded once and cached by key (``deltalog.snapshot.cache``); it
  holds the seqs up to ``snapshot_hwm``. The entries after it are folded
  with the compactor's fold into an in-memory **overlay**, searched exactly
  with numpy and merged with Chroma's answers: overlay results replace
  checkpoint results for the same ids, deleted ids disappear, and ``where``
  filters apply to both sides (``deltalog.where``).
- **snapshot** consistency: the overlay holds the committed tail,
  ``(snapshot_hwm, hwm]``, so a query sees exactly the fold at the
  committed hwm. A newer commit is picked up by the next call: when only
  hwm moved, the new tail entries are folded in and nothing is downloaded;
  a new checkpoint is loaded (and the overlay restarts after it).
- **A new checkpoint never blocks an answer** (a reader opened with
  ``Reader.open``, once it answered): the log is append-only, so the
  checkpoint it holds plus the entries after it fold to the same state as
  the new checkpoint plus its tail. It goes on answering from the one it
  holds, folding the new commit's entries into its overlay, while the new
  one downloads and opens in the background; the next call after that
  switches to it. A checkpoint of another lineage (a published rebuild), a
  rollback below what the reader folded, or a failed background load is
  loaded before the call answers, as before.
- **fresh** consistency: the overlay goes on past hwm, up to the first hole.
  Only what arrived since the last call is read.

One ``Reader`` may serve concurrent calls (tasks of one event loop). Each
call **pins** what it reads: under the reader's lock it refreshes, then
takes the loaded snapshot and the tail folded on top of it, and answers
from those alone, so its answer is the fold at one seq (hwm, or the last
tail entry it saw). A snapshot reader reads a newly committed tail whole and
checks it reaches hwm before folding any of it, in one step: a call that
pinned the snapshot before sees the fold at the old hwm or the new one,
never at a seq between two commits (nor a tail that ends early). A
**view** (the overlay of one collection, prepared for searching) is cached
on the tail only if no entry was folded in while it was built. A snapshot
replaced by a newer commit stays open until the last call that pinned it
returns, then its Chroma client is closed and its working copy removed.

Results have Chroma's shapes: ``query`` returns lists per query vector
(``ids``, ``distances``, ``documents``, ``metadatas``), ``get`` flat lists.
Distances are Chroma's: squared L2 by default, ``1 - dot`` for ``ip``,
``1 - cosine`` for ``cosine``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import anyio
import anyio.abc
import numpy as np
import numpy.typing as npt

from deltalog.config import LogConfig
from deltalog.entry import Batch, Entry, Metadata, Seal, Upsert
from deltalog.errors import Closed, CorruptEntry, DataError, DimensionMismatch, InvalidInput
from deltalog.fold import CollectionPlan, Folder, Record, merge_metadata
from deltalog.log import DeltaLog
from deltalog.snapshot.cache import SnapshotCache, load_committed
from deltalog.snapshot.sink import ChromaSink, Hit
from deltalog.storage.store import ObjectStore
from deltalog.storage.table import LogState, Table
from deltalog.where import Where, matches, normalize_where

__all__ = [
    "Consistency",
    "GetResult",
    "QueryResult",
    "Reader",
    "ReaderStatistics",
    "collections_named",
]

Consistency = Literal["snapshot", "fresh"]
Matrix64 = npt.NDArray[np.float64]


class QueryResult(TypedDict):
    ids: list[list[str]]
    distances: list[list[float]]
    documents: list[list[str | None]]
    metadatas: list[list[Metadata | None]]


class GetResult(TypedDict):
    ids: list[str]
    documents: list[str | None]
    metadatas: list[Metadata | None]


@dataclass(frozen=True, slots=True)
class ReaderStatistics:
    consistency: Consistency
    hwm: int
    """The committed hwm the reader last read."""
    snapshot_key: str | None
    tail_seq: int
    """The last seq folded into the overlay (== snapshot_hwm when there is no tail)."""
    tail_entries: int
    snapshot_loads: int
    calls: int
    snapshot_hwm: int = 0
    """The seq the loaded checkpoint holds."""


@dataclass(slots=True)
class _View:
    """The overlay of one collection as queries see it."""

    removed: set[str]
    records: list[Record]
    matrix: npt.NDArray[np.float32] | None
    shadowed: int = 0
    """How many ``removed`` ids the snapshot holds: the most snapshot hits a query drops."""
    prepared: dict[str, tuple[Matrix64, Matrix64 | None]] = field(default_factory=dict)
    """Per distance space: ``matrix`` as float64 (normalized for cosine) and, for l2,
    its squared row norms; computed once, not on every query."""

    def for_space(self, space: str) -> tuple[Matrix64, Matrix64 | None]:
        assert self.matrix is not None
        if space not in self.prepared:
            m = self.matrix.astype(np.float64)
            if space == "cosine":
                m = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-30)
            norms = None if space in ("ip", "cosine") else (m * m).sum(axis=1)
            self.prepared[space] = (m, norms)
        return self.prepared[space]


@dataclass(slots=True)
class _Tail:
    """Entries after the checkpoint, folded: the overlay."""

    after: int
    last_seq: int
    folder: Folder = field(default_factory=Folder)
    entries: int = 0
    views: dict[str, _View] = field(default_factory=dict)
    """Views of the fold at ``last_seq``; cleared whenever an entry is folded in."""


@dataclass(slots=True, eq=False)
class _Snapshot:
    """A loaded checkpoint (holding seqs up to ``hwm``) and the tail folded on top of it.

    ``users`` counts the calls that pinned it; once it is no longer
    ``current`` the last of them closes it.
    """

    key: str | None
    hwm: int
    sink: ChromaSink | None = None
    work: Path | None = None
    lineage: str | None = None
    """The committed state's lineage it was loaded from (None: unknown)."""
    tail: _Tail = field(init=False)
    users: int = 0
    current: bool = True

    def __post_init__(self) -> None:
        self.tail = _Tail(self.hwm, self.hwm)


class Reader:
    """Query a log's committed snapshot (and its tail). Open with ``Reader.open``.

    Concurrent calls may share one reader; see the module docstring.
    """

    def __init__(
        self,
        log: DeltaLog,
        cache: SnapshotCache,
        *,
        consistency: Consistency = "snapshot",
        prefetch: int = 32,
    ) -> None:
        if consistency not in ("snapshot", "fresh"):
            raise InvalidInput(f"consistency must be 'snapshot' or 'fresh', not {consistency!r}")
        self.log = log
        self.consistency: Consistency = consistency
        self._cache = cache
        self._prefetch = prefetch
        self._snapshot = _Snapshot(None, 0)
        self._hwm = 0
        self._dims: dict[str, int] = {}
        """The log's schema (each collection's dimension), read when a collection is new."""
        self._schema_read = False
        self._lock = anyio.Lock()
        self._loads = self._calls = 0
        self._closed = False
        self._background: anyio.abc.TaskGroup | None = None
        """Where a new checkpoint loads while calls go on (``Reader.open`` gives one)."""
        self._answered = False
        """Whether a refresh succeeded: until then a new checkpoint is loaded first."""
        self._loading = False
        self._prepared: _Snapshot | BaseException | None = None
        """The checkpoint loaded in the background, or why it could not be."""

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: LogConfig,
        *,
        consistency: Consistency = "snapshot",
        cache_dir: Path | str | None = None,
        store: ObjectStore | None = None,
        table: Table | None = None,
    ) -> AsyncIterator[Reader]:
        """Connect to the log and load the committed snapshot."""
        root = Path(cache_dir) if cache_dir else Path(".deltalog") / "cache"
        cache = SnapshotCache.for_log(root, config.keys)
        async with DeltaLog.open(config, store=store, table=table, read_only=True) as log:
            reader = cls(log, cache, consistency=consistency)
            try:
                async with anyio.create_task_group() as background:
                    reader._background = background
                    try:
                        await reader.refresh()
                        yield reader
                    finally:
                        background.cancel_scope.cancel()
                        await reader.aclose()
            except BaseExceptionGroup as group:  # the caller's error (or ours), as itself
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise

    async def aclose(self) -> None:
        """Close the reader; a call still running finishes on the snapshot it pinned."""
        self._closed = True
        prepared, self._prepared = self._prepared, None
        if isinstance(prepared, _Snapshot):
            await self._retire(prepared)
        await self._retire(self._snapshot)

    # -- keeping up -------------------------------------------------------------

    async def refresh(self) -> None:
        """Pick up a newer commit and, for fresh reads, the new tail entries."""
        async with self._lock:
            await self._refresh()

    @asynccontextmanager
    async def _pinned(self) -> AsyncIterator[_Snapshot]:
        """Refresh, then hold the current snapshot and its tail for one call."""
        snapshot: _Snapshot | None = None
        try:
            async with self._lock:
                await self._refresh()
                snapshot = self._snapshot
                snapshot.users += 1
            yield snapshot
        finally:
            if snapshot is not None:
                snapshot.users -= 1
                if not snapshot.current:
                    await self._retire(snapshot)

    async def _refresh(self) -> None:
        """``refresh`` under the lock."""
        if self._closed:
            raise Closed("the reader is closed", log=self.log.config.log)
        state = await self._read_state()
        await self._switch(state)
        if not self._holds(state) and not self._load_behind(state):
            state, _ = await load_committed(self._read_state, self._load, state=state)
        self._hwm = state.hwm
        tail = self._snapshot.tail
        if self.consistency == "fresh":  # every prefix of the tail is a fresh cut
            await self._read_tail(tail.last_seq, None, lambda seq, entry: _fold(tail, seq, entry))
        elif tail.last_seq < state.hwm:
            # The committed tail is read whole, checked, then folded in one step (no
            # await): a call that pinned this snapshot before sees the fold at the old
            # hwm or at the new one, never at a seq between two commits.
            read: list[tuple[int, Any]] = []
            await self._read_tail(tail.last_seq, state.hwm, lambda *item: read.append(item))
            last = read[-1][0] if read else tail.last_seq
            _check_committed_tail(last, state, self.log.config.log)
            for seq, entry in read:
                _fold(tail, seq, entry)
        self._answered = True

    def _carries(self, snapshot: _Snapshot, state: LogState) -> bool:
        """Whether ``snapshot`` plus the log's entries after it folds to ``state``: of its
        lineage, not past its checkpoint, and (snapshot reads) not past its hwm."""
        past = self.consistency == "snapshot" and snapshot.tail.last_seq > state.hwm
        return (
            snapshot.lineage == state.lineage
            and snapshot.hwm <= state.checkpoint_hwm
            and not (past)
        )

    def _load_behind(self, state: LogState) -> bool:
        """Load ``state``'s checkpoint in the background while calls go on with the one held
        (True), when that one folds to ``state``; False: load it before answering."""
        if (
            self._background is None
            or not self._answered
            or not self._carries(self._snapshot, state)
        ):
            return False
        if isinstance(self._prepared, BaseException):  # loaded in the caller's call: raised there
            self._prepared = None
            return False
        if not self._loading and self._prepared is None:
            self._loading = True
            self._background.start_soon(self._prepare, state)
        return True

    async def _prepare(self, state: LogState) -> None:
        """Load ``state``'s checkpoint for ``_switch``; a failure is kept for the next call."""
        try:
            loaded = await self._open_snapshot(
                state.snapshot_key, state.snapshot_sha256, state.checkpoint_hwm
            )
        except Exception as exc:  # the next call loads it before it answers, and raises
            self._prepared = exc
            return
        finally:
            self._loading = False
        loaded.lineage = state.lineage
        if self._closed:
            await self._retire(loaded)
            return
        self._prepared = loaded

    async def _switch(self, state: LogState) -> None:
        """Answer from the checkpoint loaded in the background, if it folds to ``state``
        (its entries are folded after it, as after any load); else discard it."""
        prepared = self._prepared
        if not isinstance(prepared, _Snapshot):
            return
        self._prepared = None
        if not self._carries(prepared, state) or prepared.hwm < self._snapshot.hwm:
            await self._retire(prepared)
            return
        old, self._snapshot = self._snapshot, prepared
        self._loads += 1
        await self._retire(old)

    async def _read_state(self) -> LogState:
        return await self.log.table.read_state(self.log.keys.log_id)

    def _holds(self, state: LogState) -> bool:
        """Whether the loaded checkpoint is the one ``state`` points to."""
        loaded = self._snapshot
        return (loaded.key, loaded.hwm) == (state.snapshot_key, state.checkpoint_hwm)

    async def _load(self, state: LogState) -> None:
        """Load the checkpoint ``state`` points to (``MissingObject`` if it was pruned)."""
        if self._holds(state):
            return
        loaded = await self._open_snapshot(
            state.snapshot_key, state.snapshot_sha256, state.checkpoint_hwm
        )
        loaded.lineage = state.lineage
        if self._closed:  # aclose() ran while it loaded
            await self._retire(loaded)
            raise Closed("the reader is closed", log=self.log.config.log)
        old, self._snapshot = self._snapshot, loaded
        self._loads += 1
        await self._retire(old)

    async def _open_snapshot(self, key: str | None, sha256: str | None, hwm: int) -> _Snapshot:
        snapshot = _Snapshot(key, hwm)
        if key is None or sha256 is None:
            return snapshot
        snapshot.work = await self._cache.copy_of(
            self.log.store, key, sha256, log=self.log.config.log
        )
        # Shielded: a cancellation would lose the client the thread made.
        with anyio.CancelScope(shield=True):
            try:
                snapshot.sink = await ChromaSink.open(snapshot.work, log=self.log.config.log)
            except BaseException:
                await self._retire(snapshot)
                raise
        return snapshot

    async def _retire(self, snapshot: _Snapshot) -> None:
        """``snapshot`` is no longer current: close it once no call uses it."""
        snapshot.current = False
        if snapshot.users:
            return
        with anyio.CancelScope(shield=True):
            sink, work = snapshot.sink, snapshot.work
            snapshot.sink, snapshot.work = None, None
            try:
                if sink is not None:
                    await sink.aclose()
            finally:
                if work is not None:
                    await anyio.to_thread.run_sync(self._cache.discard, work)

    async def _read_tail(
        self, after: int, to_seq: int | None, take: Callable[[int, Any], None]
    ) -> None:
        """Hand ``take`` the entries after ``after`` (up to ``to_seq``), in seq order,
        checked against the log's schema.

        An entry whose vectors disagree with the schema is a ``CorruptEntry``, as
        it is for the compactor (only a writer that bypassed ``append`` makes one).
        """
        quarantined: dict[int, str] | None = None
        if not self._schema_read:  # once: the entries are checked against what it says
            self._dims = await self.log.table.read_dims(self.log.keys.log_id)
            self._schema_read = True
        while True:
            reader = self.log.read(
                after=after,
                to_seq=to_seq,
                prefetch=self._prefetch,
                classify_end=False,
                dims=self._dims,
            )
            try:
                async for seq, entry in reader:
                    if not _collections(entry) <= self._dims.keys():  # new to us: read the schema
                        self._dims = await self.log.table.read_dims(self.log.keys.log_id)
                    take(seq, entry)
                    after = seq
                return
            except CorruptEntry as exc:
                if quarantined is None:
                    quarantined = await self.log.table.read_quarantined(self.log.keys.log_id)
                if exc.seq is None or exc.seq not in quarantined:
                    raise
                take(exc.seq, Seal("quarantine", quarantined[exc.seq], "quarantine"))
                after = exc.seq

    # -- queries ----------------------------------------------------------------

    async def query(
        self,
        *,
        collection: str,
        query_embeddings: npt.ArrayLike,
        n_results: int = 10,
        where: Where | None = None,
    ) -> QueryResult:
        """The ``n_results`` nearest records per query vector (see the module docstring)."""
        if n_results < 1:
            raise InvalidInput("n_results must be at least 1")
        queries = _as_queries(query_embeddings)
        where_n = normalize_where(where)
        async with self._pinned() as snapshot:
            await self._check_dim(collection, queries.shape[1])
            self._calls += 1
            view = await self._view(snapshot, collection)
            sink = snapshot.sink
            found = (
                await sink.query(collection, queries, n_results + view.shadowed, where_n)
                if sink is not None
                else [[] for _ in range(len(queries))]
            )
            space = await sink.space(collection) if sink is not None else "l2"
        tail = _search(view, queries, where_n, n_results, space)
        return _merge(found, tail, view.removed, n_results)

    async def get(
        self,
        *,
        collection: str,
        ids: Sequence[str] | None = None,
        where: Where | None = None,
        limit: int | None = None,
    ) -> GetResult:
        """Records by ids and/or metadata filter, snapshot and overlay merged."""
        where_n = normalize_where(where)
        wanted = list(ids) if ids is not None else None
        async with self._pinned() as snapshot:
            self._calls += 1
            view = await self._view(snapshot, collection)
            sink = snapshot.sink
            rows = await sink.select(collection, wanted, where_n) if sink is not None else []
        kept = [(r.id, r.document, r.metadata) for r in rows if r.id not in view.removed]
        chosen = set(wanted) if wanted is not None else None
        kept += [
            (r.id, r.document, r.metadata)
            for r in view.records
            if (chosen is None or r.id in chosen) and matches(where_n, r.metadata)
        ]
        kept = kept[:limit] if limit is not None else kept
        return {
            "ids": [k[0] for k in kept],
            "documents": [k[1] for k in kept],
            "metadatas": [k[2] for k in kept],
        }

    async def _check_dim(self, collection: str, dim: int) -> None:
        if collection not in self._dims:
            self._dims = await self.log.table.read_dims(self.log.keys.log_id)
        known = self._dims.get(collection)
        if known is None:
            raise InvalidInput(
                f"collection {collection!r} holds no vectors in log {self.log.config.log!r}; "
                f"{collections_named(self._dims)}",
                log=self.log.config.log,
            )
        if known != dim:
            raise DimensionMismatch(
                collection, known=known, got=dim, source="the query", log=self.log.config.log
            )

    async def _view(self, snapshot: _Snapshot, collection: str) -> _View:
        """The overlay of ``collection`` on ``snapshot``, cached while its tail stays put."""
        tail = snapshot.tail
        view = tail.views.get(collection)
        if view is None:
            seq = tail.last_seq
            plan = tail.folder.plan().collections.get(collection, CollectionPlan())
            view = await _build_view(snapshot.sink, collection, plan)
            if tail.last_seq == seq:  # nothing was folded in while it was built
                tail.views[collection] = view
        return view

    def statistics(self) -> ReaderStatistics:
        snapshot = self._snapshot
        return ReaderStatistics(
            self.consistency,
            self._hwm,
            snapshot.key,
            snapshot.tail.last_seq,
            snapshot.tail.entries,
            self._loads,
            self._calls,
            snapshot.hwm,
        )


def _check_committed_tail(last_seq: int, state: LogState, log: str) -> None:
    """Every seq up to hwm is an entry or a seal: a committed tail that ends early is damage."""
    if last_seq < state.hwm:
        raise DataError(
            f"the committed tail ({state.checkpoint_hwm}, {state.hwm}] is missing seq "
            f"{last_seq + 1}: every seq at or below the hwm must be an entry or a seal",
            log=log,
            seq=last_seq + 1,
        )


def collections_named(dims: Mapping[str, int]) -> str:
    """The collections a log has, for an error about one it has not."""
    if not dims:
        return "it has no collections yet"
    listed = ", ".join(f"{name} ({dim} dims)" for name, dim in sorted(dims.items()))
    return f"its collections: {listed}"


def _collections(entry: Entry) -> set[str]:
    """The collections an entry writes vectors to."""
    if not isinstance(entry, Batch):
        return set()
    return {op.collection for d in entry.deltas for op in d.ops if isinstance(op, Upsert)}


def _fold(tail: _Tail, seq: int, entry: Any) -> None:
    tail.folder.add(seq, entry)
    tail.last_seq = seq
    tail.entries += 1
    tail.views.clear()


async def _build_view(sink: ChromaSink | None, collection: str, plan: CollectionPlan) -> _View:
    records = list(plan.puts.values())
    if plan.patches and sink is not None:
        base = await sink.fetch(collection, sorted(plan.patches))
        records += [
            Record(r.id, r.embedding, r.document, merge_metadata(r.metadata, plan.patches[r.id]))
            for r in base
        ]
    removed = plan.deletes | plan.puts.keys() | plan.patches.keys()
    matrix = np.stack([r.embedding for r in records]) if records else None
    return _View(removed, records, matrix, await _shadowed(sink, collection, removed))


async def _shadowed(sink: ChromaSink | None, collection: str, removed: set[str]) -> int:
    """How many of ``removed`` the snapshot holds (tail upserts are mostly new ids)."""
    if sink is None or not removed:
        return 0
    ids = sorted(removed)
    step = sink.batch_size
    found = 0
    for start in range(0, len(ids), step):
        found += len(await sink.select(collection, ids[start : start + step], None))
    return found


def _as_queries(query_embeddings: npt.ArrayLike) -> npt.NDArray[np.float32]:
    try:
        queries = np.asarray(query_embeddings, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"query_embeddings must be numbers: {exc}") from exc
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[0] == 0 or queries.shape[1] == 0:
        raise InvalidInput(
            f"query_embeddings must be (n, dim) with n, dim >= 1, got {queries.shape}"
        )
    if not np.isfinite(queries).all():
        raise InvalidInput("query_embeddings hold NaN or infinity")
    return queries


def _distances(
    space: str, queries: npt.NDArray[np.float32], m: Matrix64, norms: Matrix64 | None
) -> npt.NDArray[np.float64]:
    """``m`` and ``norms`` as ``_View.for_space`` prepares them (rows already selected)."""
    q = queries.astype(np.float64)
    if space == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
    if space in ("ip", "cosine"):
        similarity: npt.NDArray[np.float64] = q @ m.T
        return 1.0 - similarity
    assert norms is not None
    squared: npt.NDArray[np.float64] = (
        (q * q).sum(axis=1)[:, None] - 2.0 * (q @ m.T) + norms[None, :]
    )
    return np.maximum(squared, 0.0)


def _search(
    view: _View,
    queries: npt.NDArray[np.float32],
    where: Mapping[str, Any] | None,
    n_results: int,
    space: str,
) -> list[list[tuple[float, Record]]]:
    """Exact nearest overlay records per query."""
    if view.matrix is None:
        return [[] for _ in range(len(queries))]
    m, norms = view.for_space(space)
    keep = list(range(len(view.records)))
    if where is not None:
        keep = [i for i in keep if matches(where, view.records[i].metadata)]
        if not keep:
            return [[] for _ in range(len(queries))]
        m, norms = m[keep], norms[keep] if norms is not None else None
    distances = _distances(space, queries, m, norms)
    out = []
    for row in distances:
        order = np.argsort(row, kind="stable")[:n_results]
        out.append([(float(row[j]), view.records[keep[j]]) for j in order])
    return out


def _merge(
    found: list[list[Hit]],
    tail: list[list[tuple[float, Record]]],
    removed: set[str],
    n_results: int,
) -> QueryResult:
    result: QueryResult = {"ids": [], "distances": [], "documents": [], "metadatas": []}
    for hits, overlay in zip(found, tail, strict=True):
        rows = [
            (h.distance or 0.0, h.id, h.document, h.metadata) for h in hits if h.id not in removed
        ]
        rows += [(d, r.id, r.document, r.metadata) for d, r in overlay]
        rows.sort(key=lambda row: row[0])
        rows = rows[:n_results]
        result["ids"].append([r[1] for r in rows])
        result["distances"].append([r[0] for r in rows])
        result["documents"].append([r[2] for r in rows])
        result["metadatas"].append([r[3] for r in rows])
    return result
