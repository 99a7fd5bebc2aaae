"""``DeltaLog``: the handle producers and readers use for one log.

It owns the two seams (object store and table), validates and encodes
deltas, appends them one at a time or through a group-commit ``Producer``,
reads them back in seq order, and reports the log's status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace

from deltalog.append import Appender, EncodedDelta
from deltalog.codec import encode_delta
from deltalog.config import LogConfig
from deltalog.entry import Delta
from deltalog.errors import Closed, DimensionMismatch, ValidationError
from deltalog.keys import Shard, root_prefix, valid_log_name
from deltalog.producer import MiB, Producer
from deltalog.read import LogReader, list_entries
from deltalog.shards import current_shards, pending_shards, read_states
from deltalog.storage.identity import bind_log
from deltalog.storage.store import ObjectStore
from deltalog.storage.table import Layout, LogState, Table
from deltalog.validate import validate_delta

__all__ = ["DeltaLog", "LogStatistics", "LogStatus", "ShardStatus", "log_names"]

_MAX_HOLES_LISTED = 100


@dataclass(frozen=True, slots=True)
class ShardStatus:
    """One index of a log at one moment: its committed state and its tail."""

    shard: int
    """Its index (0 for a log without shards)."""
    generation: int
    """Its layout generation (0 for a log without shards)."""
    state: LogState
    tail_entries: int = 0
    """Entry objects in its committed tail ``(snapshot_hwm, hwm]`` (seals included)."""
    tail_bytes: int = 0
    """Their stored bytes, as listed."""

    @property
    def hwm(self) -> int:
        return self.state.hwm

    @property
    def snapshot_hwm(self) -> int:
        return self.state.checkpoint_hwm

    @property
    def snapshot_bytes(self) -> int:
        return self.state.snapshot_size


@dataclass(frozen=True, slots=True)
class LogStatus:
    """A log at one moment: what was reserved, written, and compacted.

    For a sharded log the figures of the committed state sum up its shards:
    ``hwm`` (and ``state``) is the lagging shard's (everything at or below it
    is applied in every shard), ``snapshot_hwm`` the smallest, the bytes and
    tail entries the sums; ``shards`` has one row per shard.
    """

    log: str
    head: int
    """The last reserved seq."""
    entries: int
    """Entry objects present."""
    holes: list[int]
    """Missing seqs at or below the head (at most 100 listed)."""
    hole_count: int
    hwm: int
    state: LogState
    quarantined: dict[int, str]
    """Seqs an operator quarantined, with the reason."""
    snapshot_hwm: int = 0
    """The seq the checkpoint (the published snapshot) holds."""
    snapshot_bytes: int = 0
    """The checkpoint archive's size."""
    tail_entries: int = 0
    """Entry objects in the committed tail ``(snapshot_hwm, hwm]`` (seals included)."""
    tail_bytes: int = 0
    """Their stored bytes, as listed."""
    shards: list[ShardStatus] = field(default_factory=list)
    """One row per shard (one for a log without shards)."""
    layout: Layout = field(default_factory=Layout)
    pending: list[ShardStatus] = field(default_factory=list)
    """The shards a reshard in progress builds, one row each."""
    identity: str | None = None
    """The identity recorded for the log (``s3://bucket/root/log``); None: not yet
    (a log no writer has opened since identities)."""

    @property
    def lag(self) -> int:
        return max(0, self.head - self.hwm)


@dataclass(frozen=True, slots=True)
class LogStatistics:
    entries_written: int
    deltas_appended: int
    append_retries: int
    duplicates_skipped: int


class DeltaLog:
    """One log on an object store and a table. Open with ``DeltaLog.open(config)``."""

    def __init__(self, config: LogConfig, store: ObjectStore, table: Table) -> None:
        self.config = config
        self.keys = config.keys
        self.store = store
        self.table = table
        self.appender = Appender(config, store, table)
        self._dims: dict[str, int] = {}
        self._deltas = 0
        self._closed = False
        self._stack = AsyncExitStack()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: LogConfig,
        *,
        store: ObjectStore | None = None,
        table: Table | None = None,
        read_only: bool = False,
    ) -> AsyncIterator[DeltaLog]:
        """Connect to the log's bucket and table (or use the given adapters).

        Opening checks the log's identity (``deltalog.storage.identity``): a
        config naming another bucket or root than the table's log of that
        name raises ``IdentityMismatch`` and nothing is read or written. The
        first writer records the identity; a ``read_only`` handle (a reader
        with read-only permissions) only checks it.
        """
        log = await cls.connect(config, store=store, table=table, read_only=read_only)
        try:
            yield log
        finally:
            await log.aclose()

    @classmethod
    async def connect(
        cls,
        config: LogConfig,
        *,
        store: ObjectStore | None = None,
        table: Table | None = None,
        read_only: bool = False,
    ) -> DeltaLog:
        """Like ``open`` without a context manager; call ``aclose()`` when done."""
        from deltalog.storage.dynamo import DynamoTable
        from deltalog.storage.s3 import S3Store

        stack = AsyncExitStack()
        try:
            if store is None:
                store = await S3Store.connect(config)
                stack.push_async_callback(store.aclose)
            if table is None:
                table = await DynamoTable.connect(config)
                stack.push_async_callback(table.aclose)
            await bind_log(store, table, config.keys, record=not read_only)
        except BaseException:
            await stack.aclose()
            raise
        log = cls(config, store, table)
        log._stack = stack
        return log

    async def aclose(self) -> None:
        self._closed = True
        await self._stack.aclose()

    async def __aenter__(self) -> DeltaLog:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("the log is closed", log=self.config.log)

    async def prepare(self, delta: Delta) -> EncodedDelta:
        """Validate and encode a delta; raise ``ValidationError`` if it may not enter."""
        self._check_open()
        try:
            dims = validate_delta(delta)
        except ValidationError as exc:
            raise ValidationError(exc.field, exc.reason, log=self.config.log) from None
        try:
            data = encode_delta(delta)
        except (TypeError, NotImplementedError) as exc:  # a value validation did not foresee
            reason = f"cannot be encoded: {exc}"
            raise ValidationError("delta", reason, log=self.config.log) from exc
        if len(data) > self.config.max_delta_bytes:
            raise ValidationError(
                "delta",
                f"encodes to {len(data)} bytes, over max_delta_bytes "
                f"({self.config.max_delta_bytes}): split it into smaller deltas",
                log=self.config.log,
            )
        await self._check_dims(dims)
        return EncodedDelta(delta.delta_id, delta.idempotency_key, data)

    async def _check_dims(self, dims: dict[str, int]) -> None:
        """Each collection keeps the dimension of its first vectors, log-wide.

        Runs after every other check, and compares every known dimension
        before recording a new one, so that a refused delta fixes none.
        """
        if any(collection not in self._dims for collection in dims):
            self._dims.update(await self.table.read_dims(self.keys.log_id))
        for collection, dim in dims.items():
            self._check_dim(collection, dim, self._dims.get(collection, dim))
        for collection, dim in dims.items():
            if collection not in self._dims:
                known = await self.table.record_dim(self.keys.log_id, collection, dim)
                self._dims[collection] = known
                self._check_dim(collection, dim, known)

    def _check_dim(self, collection: str, dim: int, known: int) -> None:
        if known != dim:
            raise DimensionMismatch(collection, known=known, got=dim, log=self.config.log)

    async def append(self, delta: Delta) -> int:
        """Append one delta as its own entry; return its seq once durable."""
        encoded = await self.prepare(delta)
        outcome = (await self.appender.write([encoded]))[encoded.delta_id]
        if isinstance(outcome, int):
            self._deltas += 1
            return outcome
        raise outcome

    def producer(
        self,
        *,
        linger_ms: float = 5.0,
        max_bytes: int = 8 * MiB,
        max_deltas: int = 1000,
        max_pending: int = 10_000,
        max_in_flight: int = 8,
    ) -> Producer:
        """A group-commit producer; use it as ``async with log.producer() as p``."""
        self._check_open()
        return Producer(
            self,
            linger_ms=linger_ms,
            max_bytes=max_bytes,
            max_deltas=max_deltas,
            max_pending=max_pending,
            max_in_flight=max_in_flight,
        )

    def read(
        self,
        after: int = 0,
        *,
        to_seq: int | None = None,
        prefetch: int = 32,
        classify_end: bool = True,
        dims: Mapping[str, int] | None = None,
    ) -> LogReader:
        """``(seq, entry)`` after ``after`` in seq order; see ``LogReader``."""
        self._check_open()
        return LogReader(
            self.store,
            self.table,
            self.keys,
            log=self.config.log,
            after=after,
            to_seq=to_seq,
            prefetch=prefetch,
            verifier=self.config.verifier,
            classify_end=classify_end,
            dims=dims,
        )

    async def head(self) -> int:
        """The last reserved seq."""
        self._check_open()
        return await self.table.read_head(self.keys.log_id)

    async def status(self) -> LogStatus:
        """Head, entries, holes and the committed state (each shard's); lists the whole log."""
        self._check_open()
        identity = await self.table.read_identity(self.keys.log_id)
        layout = await self.table.read_layout(self.keys.log_id)
        shards = await self._shard_rows(current_shards(layout))
        pending = await self._shard_rows(pending_shards(layout))
        head = await self.head()
        holes: list[int] = []
        entries, hole_count, expected = 0, 0, 1
        tails = [[0, 0] for _ in [*shards, *pending]]
        async for seq, info in list_entries(self.store, self.keys, 0):
            if seq > expected:
                missing = range(expected, min(seq, head + 1))
                hole_count += len(missing)
                holes.extend(missing[: max(0, _MAX_HOLES_LISTED - len(holes))])
            entries += 1
            expected = seq + 1
            for row, tail in zip([*shards, *pending], tails, strict=True):
                if row.state.checkpoint_hwm < seq <= row.state.hwm:
                    tail[0] += 1
                    tail[1] += info.size
        if expected <= head:
            missing = range(expected, head + 1)
            hole_count += len(missing)
            holes.extend(missing[: max(0, _MAX_HOLES_LISTED - len(holes))])
        quarantined = await self.table.read_quarantined(self.keys.log_id)
        rows = [
            replace(row, tail_entries=t[0], tail_bytes=t[1])
            for row, t in zip([*shards, *pending], tails, strict=True)
        ]
        shards, pending = rows[: len(shards)], rows[len(shards) :]
        lagging = min(shards, key=lambda row: row.hwm)
        return LogStatus(
            self.config.log,
            head,
            entries,
            holes,
            hole_count,
            lagging.hwm,
            lagging.state,
            quarantined,
            snapshot_hwm=min(row.snapshot_hwm for row in shards),
            snapshot_bytes=sum(row.snapshot_bytes for row in shards),
            tail_entries=sum(row.tail_entries for row in shards),
            tail_bytes=sum(row.tail_bytes for row in shards),
            shards=shards,
            layout=layout,
            pending=pending,
            identity=identity,
        )

    async def _shard_rows(self, shards: Sequence[Shard | None]) -> list[ShardStatus]:
        states = await read_states(self.table, self.keys, shards)
        return [
            ShardStatus(0, 0, state)
            if shard is None
            else ShardStatus(shard.index, shard.generation, state)
            for shard, state in zip(shards, states, strict=True)
        ]

    def statistics(self) -> LogStatistics:
        return LogStatistics(
            entries_written=self.appender.entries_written,
            deltas_appended=self._deltas,
            append_retries=self.appender.retries,
            duplicates_skipped=self.appender.duplicates,
        )


async def log_names(store: ObjectStore, root: str = "") -> list[str]:
    """The names of the logs with objects (entries, snapshots) under ``root``, sorted.

    One listing of one key per log: after the first key of a log ``L``, the
    next listing starts after ``L0`` (``0`` follows ``/``), past all of
    ``L/``'s keys. A name under the root that is not a valid log name (the
    ``_deltalog`` probes, say) is passed over.
    """
    prefix = root_prefix(root)
    names: list[str] = []
    start = ""
    while True:
        listing = store.list_after(prefix, start, page_size=1)
        try:
            info = await anext(listing, None)
        finally:
            close = getattr(listing, "aclose", None)  # an async generator: stop its paging
            if close is not None:
                await close()
        if info is None:
            return names
        first = info.key
        name, slash, _ = first[len(prefix) :].partition("/")
        if slash and valid_log_name(name):
            names.append(name)
        start = f"{prefix}{name}0" if slash else first
