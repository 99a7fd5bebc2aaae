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
  loaded before the call answers, as before. On a sharded log each shard
  does this on its own.
- **fresh** consistency: the overlay goes on past hwm, up to the first hole.
  Only what arrived since the last call is read.

A **sharded** log (DESIGN.md "Shards") is read as one index. Every shard's
checkpoint is loaded (``concurrency`` at a time) with a tail of its own
records; the log is read once and each entry folded into every shard's
tail. Snapshot reads show every shard at one **cut**: the greatest committed
shard hwm (``deltalog.shards.cut``), each lagging shard folding its entries
up to it. Queries fan out to the shards (``concurrency`` at a time) and the
answer is the nearest ``n_results`` of theirs, by distance (then id); ``get``
sends ids to their shards and a filter to all. A state retired by a reshard
makes the reader read the layout again and switch to the new shards.

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

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, TypeVar, cast

import anyio
import anyio.abc
import numpy as np
import numpy.typing as npt

from deltalog.config import LogConfig
from deltalog.entry import Batch, Entry, Metadata, Seal, Upsert
from deltalog.errors import Closed, CorruptEntry, DataError, DimensionMismatch, InvalidInput
from deltalog.fold import CollectionPlan, Folder, Record, merge_metadata
from deltalog.keys import LogKeys, Shard, shard_of
from deltalog.log import DeltaLog
from deltalog.shards import current_shards, cut, merge_nearest, read_states
from deltalog.snapshot.cache import SnapshotCache, load_committed
from deltalog.snapshot.sink import ChromaSink, Hit
from deltalog.storage.store import ObjectStore
from deltalog.storage.table import Layout, LogState, Table
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
T = TypeVar("T")


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
    """The committed hwm the reader last read (for a sharded log, the cut every shard
    is shown at: the greatest committed shard hwm)."""
    snapshot_key: str | None
    tail_seq: int
    """The last seq folded into the overlay (== snapshot_hwm when there is no tail);
    the smallest among the shards."""
    tail_entries: int
    snapshot_loads: int
    calls: int
    snapshot_hwm: int = 0
    """The seq the loaded checkpoint holds (the smallest among the shards)."""
    shards: int = 1
    """How many indexes the reader answers from (1 for a log without shards)."""
    generation: int = 0
    """The layout generation of those shards (0 for a log without shards)."""


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
    """Entries after the checkpoint, folded (a shard's records only): the overlay."""

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
    shard: Shard | None = None
    sink: ChromaSink | None = None
    work: Path | None = None
    cache: SnapshotCache | None = None
    """The cache ``work`` (the snapshot's working copy) belongs to."""
    lineage: str | None = None
    """The committed state's lineage it was loaded from (None: unknown)."""
    tail: _Tail = field(init=False)
    users: int = 0
    current: bool = True

    def __post_init__(self) -> None:
        self.tail = _Tail(self.hwm, self.hwm, Folder(shard=self.shard))


@dataclass(frozen=True, slots=True)
class _Pin:
    """One index as a call sees it: its snapshot, and its overlay of one collection
    as it was when the call pinned it: the cached view, or the tail's plan to build
    one from (later folds change neither), at the tail's ``seq``.
    """

    snapshot: _Snapshot
    seq: int
    view: _View | None
    plan: CollectionPlan | None

    @classmethod
    def of(cls, snapshot: _Snapshot, collection: str) -> _Pin:
        """Taken under the reader's lock, with no await: every shard at one cut."""
        tail = snapshot.tail
        view = tail.views.get(collection)
        plan = None if view is not None else tail.folder.collection_plan(collection)
        return cls(snapshot, tail.last_seq, view, plan)


@dataclass(slots=True, eq=False)
class _Part:
    """One index the reader answers from: the log's own, or one shard of it."""

    keys: LogKeys
    cache: SnapshotCache
    snapshot: _Snapshot
    hwm: int = 0
    """The part's committed hwm when the reader last read its state."""
    loading: bool = False
    prepared: _Snapshot | BaseException | None = None
    """The part's next checkpoint loaded in the background, or why it could not be."""

    @property
    def shard(self) -> Shard | None:
        return self.keys.shard


class Reader:
    """Query a log's committed snapshot (and its tail). Open with ``Reader.open``.

    Concurrent calls may share one reader; see the module docstring. A
    sharded log is read as one index (DESIGN.md "Shards"): every shard's
    checkpoint is loaded (``concurrency`` at a time), every call shows
    them all at one cut, queries fan out to them and merge by distance.
    """

    def __init__(
        self,
        log: DeltaLog,
        cache_dir: Path,
        *,
        consistency: Consistency = "snapshot",
        prefetch: int = 32,
        concurrency: int = 8,
        shards: Sequence[int] | None = None,
    ) -> None:
        if consistency not in ("snapshot", "fresh"):
            raise InvalidInput(f"consistency must be 'snapshot' or 'fresh', not {consistency!r}")
        if concurrency < 1:
            raise InvalidInput("concurrency must be at least 1")
        self.log = log
        self.consistency: Consistency = consistency
        self._cache_dir = cache_dir
        self._prefetch = prefetch
        self._concurrency = concurrency
        """How many shards one call loads, or waits on, at once."""
        self.only = sorted(set(shards)) if shards is not None else None
        """The shards this reader answers from (None: all): one part of a fan-out."""
        self.floor = 0
        """Snapshot reads show every shard at this seq at least (a cut chosen elsewhere:
        the other shards' readers of a fan-out); it must be a committed hwm."""
        self._layout: Layout | None = None
        self._parts: list[_Part] = []
        self._hwm = 0
        self._upto = 0
        """The cut this refresh folds every part to (read before the parts load)."""
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
        concurrency: int = 8,
        shards: Sequence[int] | None = None,
    ) -> AsyncIterator[Reader]:
        """Connect to the log and load the committed snapshot (every shard's, or those of
        ``shards``)."""
        root = Path(cache_dir) if cache_dir else Path(".deltalog") / "cache"
        async with DeltaLog.open(config, store=store, table=table, read_only=True) as log:
            reader = cls(log, root, consistency=consistency, concurrency=concurrency, shards=shards)
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
        for part in self._parts:
            await self._retire_part(part)

    async def _retire_part(self, part: _Part) -> None:
        """Retire ``part``'s snapshot and the next one loaded for it, if any."""
        prepared, part.prepared = part.prepared, None
        if isinstance(prepared, _Snapshot):
            await self._retire(prepared)
        await self._retire(part.snapshot)

    # -- keeping up -------------------------------------------------------------

    async def refresh(self) -> None:
        """Pick up a newer commit and, for fresh reads, the new tail entries."""
        async with self._lock:
            await self._refresh()

    @asynccontextmanager
    async def _pinned(self, collection: str) -> AsyncIterator[list[_Pin]]:
        """Refresh, then hold every part's current snapshot and its overlay of
        ``collection`` as it is now (``_Pin``) for one call."""
        pins: list[_Pin] = []
        try:
            async with self._lock:
                await self._refresh()
                for part in self._parts:
                    pins.append(_Pin.of(part.snapshot, collection))
                    part.snapshot.users += 1
            yield pins
        finally:
            for pin in pins:
                pin.snapshot.users -= 1
                if not pin.snapshot.current:
                    await self._retire(pin.snapshot)

    async def _refresh(self) -> None:
        """``refresh`` under the lock."""
        if self._closed:
            raise Closed("the reader is closed", log=self.log.config.log)
        if self._layout is None:
            await self._use_layout(await self._read_layout())
        states = await self._read_states()
        if any(state.retired_by for state in states) and await self._relayout():
            states = await self._read_states()  # the new generation's
        layout = self._layout
        assert layout is not None
        every_shard = self.only is not None and layout.sharded  # the cut is every shard's
        everyone = states
        if every_shard:
            everyone = await read_states(self.log.table, self.log.keys, current_shards(layout))
        # The seq every part is folded to: a lagging shard's tail goes past its own hwm.
        self._upto = max(cut(layout, everyone), self.floor)
        states = await self._fan(self._parts, self._load_part, states)
        if not every_shard:
            everyone = states  # as loaded (newer where retention pruned a checkpoint)
        self._hwm = max(cut(layout, everyone), self.floor)
        tails = [part.snapshot.tail for part in self._parts]
        after = min(tail.last_seq for tail in tails)
        if self.consistency == "fresh":  # every prefix of the tail is a fresh cut
            await self._read_tail(after, None, lambda seq, entry: _fold_into(tails, seq, entry))
        elif after < self._hwm:
            # The entries up to the cut are read whole, checked, then folded in one step
            # (no await): a call that pinned these snapshots before sees the fold at the
            # old cut or at the new one, never at a seq between two commits.
            read: list[tuple[int, Any]] = []
            await self._read_tail(after, self._hwm, lambda *item: read.append(item))
            last = read[-1][0] if read else after
            for tail, state in zip(tails, states, strict=True):
                _check_committed_tail(
                    max(last, tail.last_seq), state, self._hwm, self.log.config.log
                )
            for seq, entry in read:
                _fold_into(tails, seq, entry)
        self._answered = True

    def _carries(self, snapshot: _Snapshot, state: LogState) -> bool:
        """Whether ``snapshot`` plus the log's entries after it folds to ``state``: of its
        lineage, not past its checkpoint, and (snapshot reads) not past its hwm."""
        upto = max(state.hwm, self._upto)  # a lagging shard is folded to the cut
        past = self.consistency == "snapshot" and snapshot.tail.last_seq > upto
        return (
            snapshot.lineage == state.lineage and snapshot.hwm <= state.checkpoint_hwm and not past
        )

    def _load_behind(self, part: _Part, state: LogState) -> bool:
        """Load ``state``'s checkpoint in the background while calls go on with the part's
        snapshot (True), when that one folds to ``state``; False: load it before answering."""
        if (
            self._background is None
            or not self._answered
            or not self._carries(part.snapshot, state)
        ):
            return False
        if isinstance(part.prepared, BaseException):  # loaded in the caller's call: raised there
            part.prepared = None
            return False
        if not part.loading and part.prepared is None:
            part.loading = True
            self._background.start_soon(self._prepare, part, state)
        return True

    async def _prepare(self, part: _Part, state: LogState) -> None:
        """Load ``state``'s checkpoint for ``_switch``; a failure is kept for the next call."""
        try:
            loaded = await self._open_snapshot(
                part, state.snapshot_key, state.snapshot_sha256, state.checkpoint_hwm
            )
        except Exception as exc:  # the next call loads it before it answers, and raises
            part.prepared = exc
            return
        finally:
            part.loading = False
        loaded.lineage = state.lineage
        if self._closed or part not in self._parts:  # closed, or a new layout's parts
            await self._retire(loaded)
            return
        part.prepared = loaded

    async def _switch(self, part: _Part, state: LogState) -> None:
        """Answer from the part's checkpoint loaded in the background, if it folds to
        ``state`` (its entries are folded after it, as after any load); else discard it."""
        prepared = part.prepared
        if not isinstance(prepared, _Snapshot):
            return
        part.prepared = None
        if not self._carries(prepared, state) or prepared.hwm < part.snapshot.hwm:
            await self._retire(prepared)
            return
        old, part.snapshot = part.snapshot, prepared
        self._loads += 1
        await self._retire(old)

    async def _read_layout(self) -> Layout:
        return await self.log.table.read_layout(self.log.keys.log_id)

    async def _use_layout(self, layout: Layout) -> None:
        """Answer from ``layout``'s shards: the old parts are retired once unused."""
        old, self._parts = (
            self._parts,
            [self._part(shard) for shard in current_shards(layout) if self._wanted(shard)],
        )
        self._layout = layout
        for part in old:
            await self._retire_part(part)
        if not self._parts:
            raise InvalidInput(
                f"log {self.log.config.log!r} has {layout.shards} shards: no shard "
                f"{', '.join(map(str, self.only or []))} to read",
                log=self.log.config.log,
            )

    def _wanted(self, shard: Shard | None) -> bool:
        index = 0 if shard is None else shard.index
        return self.only is None or index in self.only

    def _part(self, shard: Shard | None) -> _Part:
        keys = self.log.keys.for_shard(shard)
        cache = SnapshotCache.for_log(self._cache_dir, keys)
        return _Part(keys, cache, _Snapshot(None, 0, shard))

    async def _relayout(self) -> bool:
        """A state was retired: use the new layout if the switch happened (True)."""
        layout = await self._read_layout()
        assert self._layout is not None
        if layout.generation == self._layout.generation:
            return False  # a reshard froze these shards; it has not switched yet
        await self._use_layout(layout)
        return True

    async def _read_states(self) -> list[LogState]:
        """Every part's committed state: one read (the shards': one query of them all)."""
        if len(self._parts) == 1:
            return [await self._read_state(self._parts[0])]
        shards = [part.shard for part in self._parts]
        return await read_states(self.log.table, self.log.keys, shards)

    async def _read_state(self, part: _Part) -> LogState:
        return await self.log.table.read_state(self.log.keys.log_id, sk=part.keys.state_sk)

    async def _fan(
        self, items: Sequence[Any], call: Callable[..., Awaitable[T]], *args: Sequence[Any]
    ) -> list[T]:
        """``call(item, *each arg's item)`` for every item (a part or a snapshot),
        ``concurrency`` at once; the results in order.

        One item needs no task group (a log without shards reads as it always did).
        """
        if len(items) == 1:
            return [await call(items[0], *(arg[0] for arg in args))]
        results: list[T | None] = [None] * len(items)
        limiter = anyio.CapacityLimiter(
            self._concurrency
        )  # this call's: calls never wait on one another

        async def one(i: int) -> None:
            async with limiter:
                results[i] = await call(items[i], *(arg[i] for arg in args))

        try:
            async with anyio.create_task_group() as tg:
                for i in range(len(items)):
                    tg.start_soon(one, i)
        except BaseExceptionGroup as group:  # one shard's error, as itself
            raise group.exceptions[0] from None
        return cast("list[T]", results)

    async def _load_part(self, part: _Part, state: LogState) -> LogState:
        """Load the checkpoint ``state`` points to, unless loaded; return the state used
        (a newer one when retention pruned that checkpoint: ``load_committed``). Once
        the reader answered, a checkpoint its snapshot carries loads in the background."""
        await self._switch(part, state)
        if not self._holds(part, state) and not self._load_behind(part, state):
            state, _ = await load_committed(
                lambda: self._read_state(part), lambda s: self._load(part, s), state=state
            )
        part.hwm = state.hwm
        return state

    def _holds(self, part: _Part, state: LogState) -> bool:
        """Whether the loaded checkpoint is the one ``state`` points to.

        A snapshot reader whose tail went past the committed hwm (a rollback by
        ``rebuild --publish --force``) must load it again.
        """
        loaded = part.snapshot
        behind = self.consistency == "fresh" or loaded.tail.last_seq <= max(state.hwm, self._upto)
        return behind and (loaded.key, loaded.hwm) == (state.snapshot_key, state.checkpoint_hwm)

    async def _load(self, part: _Part, state: LogState) -> None:
        """Load the checkpoint ``state`` points to (``MissingObject`` if it was pruned)."""
        if self._holds(part, state):
            return
        loaded = await self._open_snapshot(
            part, state.snapshot_key, state.snapshot_sha256, state.checkpoint_hwm
        )
        loaded.lineage = state.lineage
        if self._closed:  # aclose() ran while it loaded
            await self._retire(loaded)
            raise Closed("the reader is closed", log=self.log.config.log)
        old, part.snapshot = part.snapshot, loaded
        self._loads += 1
        await self._retire(old)

    async def _open_snapshot(
        self, part: _Part, key: str | None, sha256: str | None, hwm: int
    ) -> _Snapshot:
        snapshot = _Snapshot(key, hwm, part.shard, cache=part.cache)
        if key is None or sha256 is None:
            return snapshot
        snapshot.work = await part.cache.copy_of(
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
                if work is not None and snapshot.cache is not None:
                    await anyio.to_thread.run_sync(snapshot.cache.discard, work)

    async def _read_tail(
        self, after: int, to_seq: int | None, take: Callable[[int, Any], None]
    ) -> None:
        """Hand ``take`` the entries after ``after`` (up to ``to_seq``), in seq order,
        reading the log once for every shard; checked against the log's schema.

        An entry whose vectors disagree with the schema is a ``CorruptEntry``, as
        it is for the compactor (only a writer that bypassed ``append`` makes one).
        """
        tails = [part.snapshot.tail for part in self._parts]
        quarantined: dict[int, str] | None = None
        if not self._schema_read:  # once: the entries are checked against what it says
            self._dims = await self.log.table.read_dims(self.log.keys.log_id)
            self._schema_read = True
        while True:
            after = min(tail.last_seq for tail in tails)
            if to_seq is not None and after >= to_seq:
                return
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
        """The ``n_results`` nearest records per query vector (see the module docstring).

        On a sharded log every shard answers its nearest and the answer is the
        nearest of them all, by distance.
        """
        if n_results < 1:
            raise InvalidInput("n_results must be at least 1")
        queries = _as_queries(query_embeddings)
        where_n = normalize_where(where)
        async with self._pinned(collection) as pins:
            await self._check_dim(collection, queries.shape[1])
            self._calls += 1

            async def ask(pin: _Pin) -> tuple[_View, list[list[Hit]], str]:
                view = await _view(pin, collection)
                sink = pin.snapshot.sink
                found = (
                    await sink.query(collection, queries, n_results + view.shadowed, where_n)
                    if sink is not None
                    else [[] for _ in range(len(queries))]
                )
                space = await sink.space(collection) if sink is not None else "l2"
                return view, found, space

            answers = await self._fan(pins, ask)
        merged = [
            _merge(
                found, _search(view, queries, where_n, n_results, space), view.removed, n_results
            )
            for view, found, space in answers
        ]
        return (
            merged[0] if len(merged) == 1 else cast(QueryResult, merge_nearest(merged, n_results))
        )

    async def get(
        self,
        *,
        collection: str,
        ids: Sequence[str] | None = None,
        where: Where | None = None,
        limit: int | None = None,
    ) -> GetResult:
        """Records by ids and/or metadata filter, snapshot and overlay merged.

        On a sharded log ids go to their shards and a filter to every shard.
        """
        where_n = normalize_where(where)
        wanted = list(ids) if ids is not None else None
        async with self._pinned(collection) as pins:
            self._calls += 1

            async def one(pin: _Pin, chosen: list[str] | None) -> list[_Row]:
                if chosen == []:  # none of the ids is this shard's: Chroma would return all
                    return []
                view = await _view(pin, collection)
                sink = pin.snapshot.sink
                rows = await sink.select(collection, chosen, where_n) if sink is not None else []
                return _get_rows(rows, view, chosen, where_n)

            chosen = _route([pin.snapshot for pin in pins], collection, wanted)
            answers = await self._fan(pins, one, chosen)
        kept = [row for rows in answers for row in rows]
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

    def statistics(self) -> ReaderStatistics:
        snapshots = [part.snapshot for part in self._parts] or [_Snapshot(None, 0)]
        return ReaderStatistics(
            self.consistency,
            self._hwm,
            snapshots[0].key,
            min(s.tail.last_seq for s in snapshots),
            sum(s.tail.entries for s in snapshots),
            self._loads,
            self._calls,
            min(s.hwm for s in snapshots),
            len(snapshots),
            self._layout.generation if self._layout is not None else 0,
        )


def _check_committed_tail(last_seq: int, state: LogState, upto: int, log: str) -> None:
    """Every seq up to the cut is an entry or a seal: a tail that ends early is damage."""
    if last_seq < upto:
        raise DataError(
            f"the committed tail ({state.checkpoint_hwm}, {upto}] is missing seq "
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


async def _view(pin: _Pin, collection: str) -> _View:
    """The overlay of ``collection`` as ``pin`` holds it; cached on its tail while the
    tail stays where the call pinned it."""
    if pin.view is not None:
        return pin.view
    assert pin.plan is not None
    view = await _build_view(pin.snapshot.sink, collection, pin.plan)
    tail = pin.snapshot.tail
    if tail.last_seq == pin.seq:  # nothing was folded in since the call pinned it
        tail.views[collection] = view
    return view


def _fold_into(tails: Sequence[_Tail], seq: int, entry: Any) -> None:
    """Fold an entry into every tail that has not passed it (each shard's own records)."""
    for tail in tails:
        if tail.last_seq < seq:
            _fold(tail, seq, entry)


_Row = tuple[str, str | None, Metadata | None]
"""A record ``get`` returns: id, document, metadata."""


def _route(
    snapshots: Sequence[_Snapshot], collection: str, ids: list[str] | None
) -> list[list[str] | None]:
    """The ids each shard is asked for (all of them without shards; None: no id filter).

    Ids of shards this reader does not answer from (a part of a fan-out) go nowhere.
    """
    first = snapshots[0].shard
    if ids is None or first is None:
        return [ids for _ in snapshots]
    position = {s.shard.index: i for i, s in enumerate(snapshots) if s.shard is not None}
    routed: list[list[str] | None] = [[] for _ in snapshots]
    for id_ in ids:
        i = position.get(shard_of(collection, id_, first.count))
        chosen = routed[i] if i is not None else None
        if chosen is not None:
            chosen.append(id_)
    return routed


def _get_rows(rows: list[Hit], view: _View, ids: list[str] | None, where: Any) -> list[_Row]:
    """One index's ``get``: its snapshot's rows the overlay does not replace, then the overlay's."""
    kept = [(r.id, r.document, r.metadata) for r in rows if r.id not in view.removed]
    chosen = set(ids) if ids is not None else None
    kept += [
        (r.id, r.document, r.metadata)
        for r in view.records
        if (chosen is None or r.id in chosen) and matches(where, r.metadata)
    ]
    return kept


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
