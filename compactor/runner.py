"""``Compactor``: incremental compaction, rebuild and verify for one log.

One run, under one lease, inside one task group (DESIGN.md "Compaction"
and "Checkpoints"):

1. acquire the lease (fencing token + 1) and read hwm and the checkpoint;
2. a heartbeat renews it every ttl/3; a failed renewal cancels the run;
3. working copy (``compactor.working``): the live copy left by the last
   run on this host (warm), else the checkpoint (downloaded and verified
   unless cached) with the committed tail replayed into it (cold);
4. replay entries after hwm: read, fold, apply (``compactor.replay``),
   sealing holes older than the grace period and stopping at younger ones;
5. publish, only when the checkpoint policy says so
   (``compactor.checkpoint``): close Chroma, archive and upload as it is
   written, under a new key;
6. commit hwm (and the new checkpoint, if one was published) in one
   conditional update on owner, token and the previous hwm: the only
   commit point; the working copy becomes the live copy;
7. release the lease; then delete snapshots beyond the retention count
   and orphans (``_prune``, which needs no lease; never the checkpoint the
   state points to).

A compactor of one **shard** of a sharded log (``shard=``; DESIGN.md
"Shards") does all of this with the shard's own state item, lease,
checkpoint keys, retention and live copy, and applies only the records the
shard owns; it reads (and seals) the log's entries like any other.

A **deadline** (``Limits.deadline``: a Lambda invocation's end less a
margin) bounds the whole run, not only its replay: getting the working copy
(a checkpoint download, the committed tail's catch-up) counts, the replay
stops early enough to leave the publish its time (``publish_seconds``, sized
from the checkpoint), and a publish the time left cannot hold is deferred
(hwm is committed alone; a later run publishes). A deadline that passes
while the working copy is being made ends the run with ``Unavailable``.

A crash anywhere before 6 leaves the committed state as it was (an upload
is an orphan retention deletes later) and the next run redoes the work; the
fold is deterministic, so the result is the same. A crash after 6 leaves a
committed state whose checkpoint and tail are all stored: the next run,
without a live copy, rebuilds its copy from them.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar

import anyio

from compactor.checkpoint import (
    DEFAULT_MAX_TAIL_BYTES,
    DEFAULT_MAX_TAIL_ENTRIES,
    DEFAULT_RATIO,
    CheckpointPolicy,
    EntryCap,
    Reason,
    Tail,
    publish_seconds,
)
from compactor.lease import Lease, LeaseKeeper
from compactor.publish import (
    DEFAULT_COMPRESSION,
    Compression,
    Published,
    forget_snapshot,
    prune_snapshots,
    publish_snapshot,
)
from compactor.replay import Limits, Progress, Replay, Replayer
from compactor.verify import (
    DEFAULT_INDEX_QUERIES,
    DEFAULT_MIN_RECALL,
    VerifyResult,
    compare_sinks,
)
from compactor.working import (
    OpenCopy,
    WarmSink,
    WorkingCopy,
    catch_up,
    close_sink,
    take,
    trust_of,
)
from deltalog.codec import Frame, seal_body
from deltalog.config import LogConfig
from deltalog.entry import Seal
from deltalog.errors import (
    Conflict,
    DeltalogError,
    Fenced,
    InvalidInput,
    LeaseBusy,
    Unavailable,
)
from deltalog.keys import Shard
from deltalog.log import DeltaLog
from deltalog.read import ReadEnd
from deltalog.snapshot.archive import DEFAULT_ZSTD_LEVEL
from deltalog.snapshot.cache import SnapshotCache, load_committed
from deltalog.snapshot.distinct import remove as remove_distinct
from deltalog.snapshot.sink import ChromaSink, Distinct, Sink
from deltalog.storage.store import ObjectStore
from deltalog.storage.table import Commit, LogState, Table

__all__ = ["CommittedCopy", "CompactionResult", "Compactor", "ExportResult", "RebuildResult"]

log = logging.getLogger("compactor")

Status = Literal["applied", "checkpointed", "nothing", "busy", "retired"]
_T = TypeVar("_T")
SinkFactory = Callable[[Path], Awaitable[Sink]]
"""Opens the sink for a working directory (default: ``ChromaSink.open``)."""


@dataclass(frozen=True, slots=True)
class CompactionResult:
    """What one ``run_once`` did."""

    status: Status
    """``applied`` (hwm moved), ``checkpointed`` (nothing new, but a requested
    checkpoint was published), ``nothing`` (nothing new), ``busy`` (lease held) or
    ``retired`` (a reshard retired the shard's state: see ``ShardedCompactor``)."""
    log: str
    hwm_before: int
    hwm_after: int
    entries_applied: int = 0
    vectors_upserted: int = 0
    ids_deleted: int = 0
    ids_patched: int = 0
    seals_written: int = 0
    snapshot_key: str | None = None
    """The checkpoint the committed state points to after the run."""
    snapshot_size: int = 0
    stopped: str = ""
    """Why reading stopped: ``end``, ``hole`` (younger than the grace), ``limit``, ``poison``."""
    seconds: float = 0.0
    token: int = 0
    checkpoint: str = ""
    """Why this run published the checkpoint (``compactor.checkpoint.Reason``), or ""."""
    snapshot_hwm: int = 0
    """The seq the checkpoint holds, after the run."""
    tail_entries: int = 0
    """Seqs in the committed tail after the run: ``(snapshot_hwm, hwm_after]``."""
    tail_bytes: int = 0
    working_copy: str = ""
    """``warm`` (the live copy), ``checkpoint`` (downloaded or cached) or ``empty``."""
    replayed_tail: int = 0
    """Committed seqs replayed to bring the working copy up to ``hwm_before``."""
    shard: int | None = None
    """The shard compacted (its index), or None for a log without shards."""
    generation: int = 0
    """The shard's layout generation (0 for a log without shards)."""
    warm_sink: bool = False
    """Whether the run reused the sink (Chroma's client, its index loaded) this compactor
    held open since its last run, instead of opening the copy again."""
    started_at: float = 0.0
    """When the run started (``time.time()``), before it asked for the lease."""
    run_seconds: float = 0.0
    """The whole run: lease, working copy, replay, publish, commit and release."""

    @property
    def name(self) -> str:
        """The log, and the shard when there is one: ``receipts`` or ``receipts shard 2``."""
        return self.log if self.shard is None else f"{self.log} shard {self.shard}"

    def summary(self) -> str:
        """The one-line summary the CLI prints."""
        if self.status == "busy":
            return f"{self.name}: lease busy ({self.stopped})"
        if self.status == "retired":
            return f"{self.name}: retired by a reshard at hwm {self.hwm_after}"
        if self.status == "nothing":
            why = (
                f", stopped at a young hole at {self.hwm_after + 1}"
                if self.stopped == "hole"
                else ""
            )
            return f"{self.name}: nothing to do at hwm {self.hwm_after}{why}"
        if self.status == "checkpointed":
            return f"{self.name}: at hwm {self.hwm_after}: {self._checkpoint_summary()}"
        return (
            f"{self.name}: applied {self.entries_applied} entries (hwm {self.hwm_before} -> "
            f"{self.hwm_after}): {self.vectors_upserted} vectors upserted, {self.ids_deleted} "
            f"deleted, {self.ids_patched} patched, {self.seals_written} holes sealed in "
            f"{self.seconds:.1f}s; {self._checkpoint_summary()}"
        )

    def _checkpoint_summary(self) -> str:
        if self.checkpoint:
            return (
                f"checkpoint {self.snapshot_key} published ({self.snapshot_size} bytes, "
                f"{self.checkpoint})"
            )
        return (
            f"tail of {self.tail_entries} entries ({self.tail_bytes} bytes) after checkpoint "
            f"{self.snapshot_key} at seq {self.snapshot_hwm}"
        )


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What ``export`` wrote: a plain Chroma directory at the committed hwm."""

    log: str
    path: Path
    hwm: int
    snapshot_key: str | None
    snapshot_hwm: int
    tail_entries: int
    """Committed seqs replayed on top of the checkpoint."""
    counts: dict[str, int]


@dataclass(frozen=True, slots=True)
class CommittedCopy:
    """A closed Chroma directory holding a committed state (``Compactor.committed_copy``)."""

    path: Path
    state: LogState
    """The committed state it started from."""
    replayed: int
    """Seqs replayed on top of the checkpoint."""
    counts: dict[str, int]


@dataclass(frozen=True, slots=True)
class RebuildResult:
    """What a rebuild produced."""

    log: str
    hwm: int
    snapshot_key: str
    snapshot_sha256: str
    snapshot_size: int
    counts: dict[str, int]
    vectors_upserted: int
    entries: int
    seconds: float
    published: bool
    shard: int | None = None
    """The shard rebuilt (its index), or None for a log without shards."""

    @property
    def name(self) -> str:
        """The log, and the shard when there is one."""
        return self.log if self.shard is None else f"{self.log} shard {self.shard}"


DEFAULT_LEASE_WAIT = 60.0
"""How long ``rebuild(publish=True)`` waits for a busy lease (``rebuild --wait``)."""
_CLEANUP_SECONDS = 60.0
_RECENT_SNAPSHOTS = 16
"""How many committed snapshot keys the state item remembers (at least ``retain``)."""


class _LeaseSealer:
    """Seals holes older than the grace period, under the run's lease."""

    def __init__(self, compactor: Compactor, lease: Lease) -> None:
        self.compactor = compactor
        self.lease = lease

    async def should_seal(self, end: ReadEnd) -> bool:
        """Whether the hole is older than the grace, on the store's clock alone.

        Its age is the longer of: since the first entry after it was written
        (its ``last_modified``), and since a compactor first saw it (noted in
        the state item, on the same clock). No compactor's own clock enters,
        so one running fast or slow neither seals early nor makes another do so.
        """
        c = self.compactor
        self.lease.check()
        now = await c.store.clock(c.keys.entries_prefix)
        first_seen = await c.table.note_hole(
            self.lease.log_id,
            self.lease.owner,
            self.lease.token,
            seq=end.seq,
            now=now,
            sk=c.keys.state_sk,
        )
        age = now - first_seen
        if end.next_entry is not None:
            age = max(age, now - end.next_entry.last_modified)
        return age >= c.grace

    async def seal(self, seq: int) -> None:
        self.lease.check()
        seal = Seal(
            sealed_by=self.lease.owner,
            reason=f"hole older than the grace period ({self.compactor.grace:g}s)",
            kind="hole",
            sealed_at=time.time(),
        )
        written = await self.compactor.store.put_if_absent(
            self.compactor.keys.entry(seq),
            Frame(seal_body(seal)).at(seq, signer=self.compactor.config.signer),
        )
        log.info(
            "%s seq %d: %s",
            self.compactor.config.log,
            seq,
            "sealed" if written else "late entry won",
        )


class Compactor:
    """Compacts one log. Use as ``async with Compactor(config) as compactor``."""

    def __init__(
        self,
        config: LogConfig,
        *,
        cache_dir: Path | str | None = None,
        lease_ttl: float = 30.0,
        grace: float = 60.0,
        limits: Limits | None = None,
        retain: int = 3,
        orphan_grace: float = 3600.0,
        compression: Compression = DEFAULT_COMPRESSION,
        compression_level: int = DEFAULT_ZSTD_LEVEL,
        checkpoint_ratio: float = DEFAULT_RATIO,
        max_tail_entries: EntryCap = DEFAULT_MAX_TAIL_ENTRIES,
        max_tail_bytes: int | None = DEFAULT_MAX_TAIL_BYTES,
        prefetch: int = 32,
        progress: Callable[[Progress], None] | None = None,
        store: ObjectStore | None = None,
        table: Table | None = None,
        owner: str | None = None,
        sink_factory: SinkFactory | None = None,
        shard: Shard | None = None,
    ) -> None:
        if retain < 1:
            raise InvalidInput("retain (--retain) must keep at least one snapshot")
        if orphan_grace < 0:
            raise InvalidInput("orphan_grace (--orphan-grace) must be at least 0 seconds")
        self.config = config
        self.shard = shard
        """The shard this compactor compacts; None: the log's one index (no layout)."""
        self.keys = config.keys.for_shard(shard)
        self.cache_dir = Path(cache_dir) if cache_dir else Path(".deltalog") / "cache"
        self.lease_ttl = lease_ttl
        self.grace = grace
        self.limits = limits or Limits()
        self.retain = retain
        self.orphan_grace = orphan_grace
        self.compression: Compression = compression
        self.compression_level = compression_level
        self.policy = CheckpointPolicy(checkpoint_ratio, max_tail_entries, max_tail_bytes)
        self.prefetch = prefetch
        self.progress = progress
        self._store, self._table, self._owner = store, table, owner
        self._sink_factory = sink_factory
        self._log: DeltaLog | None = None
        self._cache: SnapshotCache | None = None
        self._warm: WarmSink | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._trust = trust_of(config)

    async def __aenter__(self) -> Compactor:
        self._cache = SnapshotCache.for_log(self.cache_dir, self.keys)
        self._warm = WarmSink(self._cache, self._open_sink, trust=self._trust)
        self._log = await DeltaLog.connect(self.config, store=self._store, table=self._table)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._warm is not None:
                await self._warm.aclose()
        finally:
            if self._log is not None:
                await self._log.aclose()

    @property
    def log(self) -> DeltaLog:
        if self._log is None:
            raise InvalidInput("use the compactor as `async with Compactor(config) as c`")
        return self._log

    @property
    def store(self) -> ObjectStore:
        return self.log.store

    @property
    def table(self) -> Table:
        return self.log.table

    @property
    def cache(self) -> SnapshotCache:
        assert self._cache is not None
        return self._cache

    @property
    def warm_sink(self) -> WarmSink:
        """The live copy this compactor holds open between its runs (``compactor.working``)."""
        if self._warm is None:
            raise InvalidInput("use the compactor as `async with Compactor(config) as c`")
        return self._warm

    async def _open_sink(self, path: Path, distinct: Distinct = "keep") -> Sink:
        """The sink of a working directory; a Chroma one keeps its distinct index
        (indexing a checkpoint written before there was one) unless told otherwise."""
        if self._sink_factory is not None:
            return await self._sink_factory(path)
        sink = await ChromaSink.open(path, limiter=self._limiter, distinct=distinct)
        try:
            await sink.index_distinct()
        except BaseException:
            await close_sink(sink)
            raise
        return sink

    def _keeper(self) -> LeaseKeeper:
        return LeaseKeeper(
            self.table,
            self.keys.log_id,
            ttl=self.lease_ttl,
            owner=self._owner,
            sk=self.keys.state_sk,
        )

    def _replayer(self) -> Replayer:
        return Replayer(self.log, prefetch=self.prefetch, progress=self.progress, shard=self.shard)

    async def read_state(self) -> LogState:
        """The committed state of what this compactor compacts (the log's, or its shard's)."""
        return await self.table.read_state(self.keys.log_id, sk=self.keys.state_sk)

    # -- incremental compaction ---------------------------------------------

    async def run_once(self, *, checkpoint: bool = False) -> CompactionResult:
        """One incremental compaction run; see the module docstring.

        ``checkpoint`` publishes a checkpoint whatever the policy says (also
        when nothing is new but the committed tail is not empty). Raises
        ``LeaseLost`` if the lease was lost mid-run (nothing was committed
        after the loss was seen; the state item says whether the run's own
        commit landed before it), and a ``CorruptEntry`` for a poison entry
        after committing everything before it.
        """
        started_at, started = time.time(), time.monotonic()
        keeper = self._keeper()
        try:
            lease = await keeper.acquire()
        except LeaseBusy as exc:
            state = await self.read_state()
            return self._stamped(
                CompactionResult(
                    "busy",
                    self.config.log,
                    state.hwm,
                    state.hwm,
                    stopped=exc.message,
                    started_at=started_at,
                )
            )
        result, failure = await self._leased(
            keeper, lease, lambda held: self._compact(held, checkpoint), self._run_record
        )
        result = replace(
            result, started_at=started_at, run_seconds=round(time.monotonic() - started, 6)
        )
        if result.snapshot_key is not None:
            await self._prune()
        if failure is not None:
            raise failure
        return result

    async def _leased(
        self,
        keeper: LeaseKeeper,
        lease: Lease,
        work: Callable[[Lease], Awaitable[_T]],
        last_run: Callable[[_T | None, Exception | None], str] | None = None,
    ) -> _T:
        """``work(lease)`` while the heartbeat renews the lease; release it after.

        A lost lease cancels the work and raises ``LeaseLost`` (nothing was
        committed after it); ``last_run`` makes the summary the release records.
        """
        result: _T | None = None
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(keeper.heartbeat, lease, tg.cancel_scope)
                try:
                    result = await work(lease)
                except Exception as exc:
                    failure = exc
                tg.cancel_scope.cancel()
        finally:
            if lease.lost is None:
                record = ""
                if last_run is not None:
                    interrupted = result is None and failure is None  # cancelled
                    record = _interrupted(lease) if interrupted else last_run(result, failure)
                await keeper.release(lease, last_run=record)
        lease.check()
        if failure is not None:
            raise failure
        assert result is not None
        return result

    def _run_record(
        self, outcome: tuple[CompactionResult, Exception | None] | None, failure: Exception | None
    ) -> str:
        """The last run's summary from what ``_compact`` returned or raised."""
        if outcome is None:
            return self._last_run(None, failure)
        return self._last_run(outcome[0], failure or outcome[1])

    def _last_run(self, result: CompactionResult | None, failure: Exception | None) -> str:
        record: dict[str, object] = {"at": time.time()}
        if result is not None:
            record.update(asdict(result))
        if failure is not None:
            record.update(status="error", error=f"{type(failure).__name__}: {failure}")
        return json.dumps(record, sort_keys=True, default=str)

    async def _compact(
        self, lease: Lease, requested: bool
    ) -> tuple[CompactionResult, Exception | None]:
        state = lease.state
        head = await self.log.head()
        publish_anyway = (requested or self._owed(state)) and state.tail_entries > 0
        if head <= state.hwm and not publish_anyway:
            return self._nothing(state, "end"), None
        warm = self.warm_sink
        with self._by_deadline("getting the working copy (the checkpoint's download)", state):
            opened = await warm.take(self.store, state, log=self.config.log)
        handed_on = False  # kept open or parked for the next run: else closed and discarded
        try:
            replay, replayed = await self._replay_into(opened, lease)
            if not replay.advanced and not publish_anyway:
                warm.keep(opened, state.hwm, state)
                handed_on = True
                return self._nothing(state, replay.stopped), replay.error
            tail = self._tail(state, replay)
            reason = self._in_time(self.policy.reason(tail, requested=requested), state, tail)
            prev_hwm = state.hwm
            if reason and replay.advanced:
                # hwm first, with the committed tail: the run's entries are visible while
                # the checkpoint is archived and uploaded; the switch is a second commit.
                early = self._applied(state, replay, lease, tail, None, None)
                await self._commit(lease, state, None, self._how(early, opened, replayed))
                prev_hwm = replay.last_seq
            if reason:
                await close_sink(opened.sink)  # Chroma must be closed before it is archived
            published = await self._publish(opened.path, replay, lease) if reason else None
            result = self._applied(state, replay, lease, tail, reason, published)
            result = self._how(result, opened, replayed)
            await self._commit(lease, state, published, result, prev_hwm)
            # The run's commit keeps the lineage of the state it read.
            if published is None:
                warm.keep(opened, replay.last_seq, state)
            else:
                await warm.park(opened.path, replay.last_seq, state)
            handed_on = True
        finally:
            if not handed_on:
                await warm.drop(opened)
        return result, replay.error

    @staticmethod
    def _how(result: CompactionResult, opened: OpenCopy, replayed: int) -> CompactionResult:
        """``result`` with how the run got its working copy."""
        return replace(
            result, working_copy=opened.copy.how, replayed_tail=replayed, warm_sink=opened.warm
        )

    @contextmanager
    def _by_deadline(self, stage: str, state: LogState) -> Iterator[None]:
        """Cancel ``stage`` at the run's deadline, then raise ``Unavailable`` saying so."""
        deadline = self.limits.deadline
        if deadline is None:
            yield
            return
        try:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                yield
        except TimeoutError:
            raise Unavailable(
                f"the run's deadline passed while {stage}: the checkpoint is "
                f"{state.snapshot_size} bytes and the committed tail {state.tail_entries} "
                "entries; give the run more time (the function's timeout)",
                log=self.config.log,
            ) from None

    def _replay_limits(self, state: LogState) -> Limits:
        """The replay stops early enough to leave the publish its time."""
        deadline = self.limits.deadline
        if deadline is None:
            return self.limits
        keep = publish_seconds(state.snapshot_size, state.tail_bytes)
        return replace(self.limits, deadline=deadline - keep)

    def _in_time(self, reason: Reason | None, state: LogState, tail: Tail) -> Reason | None:
        """``reason``, or None when the publish would not finish by the deadline (deferred)."""
        deadline = self.limits.deadline
        if reason is None or reason == "requested" or deadline is None:
            return reason
        needed = publish_seconds(state.snapshot_size, tail.bytes)
        if deadline - time.monotonic() >= needed:
            return reason
        log.info(
            "%s: checkpoint (%s) deferred: %.0fs left, about %.0fs needed to publish it",
            self.config.log,
            reason,
            deadline - time.monotonic(),
            needed,
        )
        return None

    def _owed(self, state: LogState) -> bool:
        """Whether the committed tail alone calls for a checkpoint: a run stopped between
        its hwm commit and its checkpoint's (or one that deferred it for its deadline)
        left it owed, and the next run publishes it even when nothing is new."""
        committed = Tail(
            entries=state.tail_entries,
            bytes=state.tail_bytes,
            checkpoint_bytes=state.snapshot_size,
            has_checkpoint=state.snapshot_key is not None,
            shards=1 if self.shard is None else self.shard.count,
        )
        return self.policy.reason(committed) is not None

    def _tail(self, state: LogState, replay: Replay) -> Tail:
        """The committed tail after this run, if it publishes nothing."""
        return Tail(
            entries=replay.last_seq - state.checkpoint_hwm,
            bytes=state.tail_bytes + replay.bytes_passed,
            checkpoint_bytes=state.snapshot_size,
            has_checkpoint=state.snapshot_key is not None,
            shards=1 if self.shard is None else self.shard.count,
        )

    async def _publish(self, work: Path, replay: Replay, lease: Lease) -> Published:
        return await publish_snapshot(
            self.store,
            self.keys,
            work,
            hwm=replay.last_seq,
            token=lease.token,
            counts=replay.counts,
            compression=self.compression,
            level=self.compression_level,
            scratch=self.cache.scratch,
        )

    async def _discard(self, *works: Path) -> None:
        """Remove working copies, also when the run was cancelled (lease lost, stop signal)."""
        with anyio.move_on_after(_CLEANUP_SECONDS, shield=True):
            for work in works:
                await anyio.to_thread.run_sync(self.cache.discard, work)

    async def _prune(self) -> None:
        """Retention, after a run and the release (DESIGN.md's step 8).

        Housekeeping: a failure must not fail the committed run. It holds no
        lease, and this process may pause anywhere in it while newer owners
        commit (a forced rebuild's rollback included): ``prune_snapshots``
        reads the state after listing and keeps every upload at or above its
        token.
        """
        try:
            await prune_snapshots(
                self.store,
                self.keys,
                self.read_state,
                keep=self.retain,
                orphan_grace=self.orphan_grace,
            )
        except DeltalogError as exc:
            log.warning(
                "%s: could not delete old snapshots (next run retries): %s", self.keys.log, exc
            )

    async def _replay_into(self, opened: OpenCopy, lease: Lease) -> tuple[Replay, int]:
        """Bring the copy up to the committed hwm, then replay what is new after it.

        Returns the replay of the new entries and how many committed seqs
        the copy needed first. The sink stays open (the caller closes it).
        """
        state = lease.state
        quarantined = await self.table.read_quarantined(self.keys.log_id)
        sink = opened.sink
        with self._by_deadline("catching up the committed tail", state):
            replayed = await catch_up(self._quiet_replayer(), sink, opened.copy, state, quarantined)
        replay = await self._replayer().run(
            sink,
            after=state.hwm,
            quarantined=quarantined,
            sealer=_LeaseSealer(self, lease),
            limits=self._replay_limits(state),
        )
        replay.counts = await sink.counts()
        return replay, replayed

    def _quiet_replayer(self) -> Replayer:
        """A replayer for committed seqs: no progress reports (they are not the run's work)."""
        return Replayer(self.log, prefetch=self.prefetch, shard=self.shard)

    async def _commit(
        self,
        lease: Lease,
        state: LogState,
        published: Published | None,
        result: CompactionResult,
        prev_hwm: int | None = None,
    ) -> None:
        """Commit ``result`` on ``state`` (read at the lease), whose hwm is ``prev_hwm``
        unless this run committed since (its hwm, before the checkpoint switch)."""
        last_run = self._last_run(result, None)
        if published is None:
            commit = Commit(result.hwm_after, last_run=last_run, tail_bytes=result.tail_bytes)
        else:
            commit = Commit(
                hwm=result.hwm_after,
                snapshot_key=published.key,
                snapshot_sha256=published.sha256,
                snapshot_size=published.size,
                last_run=last_run,
                recent_snapshots=self._recent(published.key, state),
            )
        await self._commit_point(lease, state.hwm if prev_hwm is None else prev_hwm, commit)

    async def _commit_point(self, lease: Lease, prev_hwm: int, commit: Commit) -> None:
        """The commit point. The upload is deleted only when the commit is refused for sure.

        The update may have landed although we were told otherwise: its answer
        lost, then botocore's retry refused by the condition the first attempt
        had just changed (hwm), or by a successor that took the lease over
        since and committed after us. Only the state knows (``_landed``).

        Shielded: a commit in flight is let finish (it is one conditional
        update, bounded by the request timeout), so a run stopped around its
        commit knows whether it committed, and deletes an upload it did not.
        """
        try:
            lease.check()
        except Fenced:
            await self._forget(commit.snapshot_key)
            raise
        with anyio.CancelScope(shield=True):
            await self._commit_once(lease, prev_hwm, commit)
        lease.committed = commit.hwm

    async def _commit_once(self, lease: Lease, prev_hwm: int, commit: Commit) -> None:
        try:
            await self.table.commit(
                self.keys.log_id,
                lease.owner,
                lease.token,
                prev_hwm=prev_hwm,
                commit=commit,
                now=time.time(),
                sk=self.keys.state_sk,
            )
        except (Fenced, Conflict, Unavailable) as exc:
            now = await self.read_state()
            if _landed(commit, now, lease):
                log.warning(
                    "%s: the commit of hwm %d landed although its answer said %s",
                    self.keys.log,
                    commit.hwm,
                    type(exc).__name__,
                )
                return
            if not isinstance(exc, Unavailable):
                await self._forget(commit.snapshot_key)  # refused for sure
            raise

    def _recent(self, key: str, state: LogState) -> tuple[str, ...]:
        """The committed snapshots' history after committing ``key``, newest first."""
        history = state.recent_snapshots
        if not history and state.snapshot_key is not None:  # committed by an older version
            history = (state.snapshot_key,)
        older = [k for k in history if k != key]
        return (key, *older)[: max(self.retain, _RECENT_SNAPSHOTS)]

    async def _forget(self, key: str | None) -> None:
        """Delete an upload no commit will ever reference (best effort, shielded)."""
        if key is not None:
            await forget_snapshot(self.store, key)

    def _stamped(self, result: CompactionResult) -> CompactionResult:
        """``result`` naming this compactor's shard, if it has one."""
        if self.shard is None:
            return result
        return replace(result, shard=self.shard.index, generation=self.shard.generation)

    def _nothing(self, state: LogState, stopped: str) -> CompactionResult:
        return self._stamped(
            CompactionResult(
                "nothing",
                self.config.log,
                state.hwm,
                state.hwm,
                stopped=stopped,
                snapshot_size=state.snapshot_size,
                snapshot_hwm=state.checkpoint_hwm,
                tail_entries=state.tail_entries,
                tail_bytes=state.tail_bytes,
            )
        )

    def _applied(
        self,
        state: LogState,
        replay: Replay,
        lease: Lease,
        tail: Tail,
        reason: Reason | None,
        published: Published | None,
    ) -> CompactionResult:
        advanced = replay.last_seq > state.hwm
        result = CompactionResult(
            "applied" if advanced else "checkpointed",
            self.config.log,
            state.hwm,
            replay.last_seq,
            entries_applied=replay.last_seq - state.hwm,
            vectors_upserted=replay.vectors_upserted,
            ids_deleted=replay.ids_deleted,
            ids_patched=replay.ids_patched,
            seals_written=replay.seals_written,
            snapshot_key=published.key if published else state.snapshot_key,
            snapshot_size=published.size if published else state.snapshot_size,
            stopped=replay.stopped,
            seconds=replay.seconds,
            token=lease.token,
            checkpoint=reason or "",
            snapshot_hwm=replay.last_seq if published else state.checkpoint_hwm,
            tail_entries=0 if published else tail.entries,
            tail_bytes=0 if published else tail.bytes,
        )
        return self._stamped(result)

    # -- rebuild and verify ---------------------------------------------------

    async def rebuild(
        self,
        to_seq: int | None = None,
        *,
        publish: bool = False,
        force: bool = False,
        wait: float = DEFAULT_LEASE_WAIT,
    ) -> RebuildResult:
        """Replay entries 1..to_seq into an empty snapshot and upload it.

        With ``publish`` the rebuild replaces the committed state, under the
        lease, and never to a lower hwm unless ``force``. It takes the lease
        before replaying (so no run commits meanwhile), waiting up to
        ``wait`` seconds for a busy one (``LeaseBusy`` after that), and its
        heartbeat renews it until the commit, however long the replay takes.
        """
        if wait < 0:
            raise InvalidInput("wait (--wait) must be at least 0 seconds")
        state = await self.read_state()
        if publish and not force and to_seq is not None and to_seq < state.hwm:
            raise InvalidInput(
                f"refusing to publish a rebuild to seq {to_seq} below the committed hwm "
                f"{state.hwm}; pass force=True (--force) to roll back on purpose",
                log=self.config.log,
            )
        if not publish:
            return await self._rebuild(state, to_seq, None, force)
        keeper = self._keeper()
        lease = await keeper.acquire(wait=wait)
        result = await self._leased(
            keeper, lease, lambda held: self._rebuild(held.state, to_seq, held, force)
        )
        await self._prune()
        return result

    async def _rebuild(
        self, state: LogState, to_seq: int | None, lease: Lease | None, force: bool
    ) -> RebuildResult:
        work = await anyio.to_thread.run_sync(self.cache.working_copy, None)
        try:
            quarantined = await self.table.read_quarantined(self.keys.log_id)
            sink = await self._open_sink(work)
            try:
                replay = await self._replayer().run(
                    sink, after=0, to_seq=to_seq, quarantined=quarantined
                )
                counts = await sink.counts()
            finally:
                await close_sink(sink)
            if replay.error is not None:
                raise replay.error
            token = lease.token if lease is not None else state.token
            published = await publish_snapshot(
                self.store,
                self.keys,
                work,
                hwm=replay.last_seq,
                token=token,
                counts=counts,
                compression=self.compression,
                level=self.compression_level,
                scratch=self.cache.scratch,
            )
        finally:
            await self._discard(work)
        if lease is not None:
            await self._publish_rebuild(lease, replay, published, force)
        return RebuildResult(
            self.config.log,
            replay.last_seq,
            published.key,
            published.sha256,
            published.size,
            counts,
            replay.vectors_upserted,
            replay.entries,
            replay.seconds,
            lease is not None,
            None if self.shard is None else self.shard.index,
        )

    async def _publish_rebuild(
        self, lease: Lease, replay: Replay, published: Published, force: bool
    ) -> None:
        committed = lease.state.hwm
        if replay.last_seq < committed and not force:
            await self._forget(published.key)
            raise Conflict(
                f"the rebuild reached seq {replay.last_seq}, below the committed hwm "
                f"{committed}; not published (use --force to roll back on purpose)",
                log=self.config.log,
            )
        record = {"status": "rebuilt", "hwm_before": committed, "hwm_after": replay.last_seq}
        commit = Commit(
            replay.last_seq,
            published.key,
            published.sha256,
            published.size,
            last_run=json.dumps({"at": time.time(), **record}, sort_keys=True),
            recent_snapshots=self._recent(published.key, lease.state),
            lineage=published.key,  # a new lineage: every copy of the old one is rebuilt
        )
        await self._commit_point(lease, committed, commit)

    async def export(self, out: Path | str) -> ExportResult:
        """Write a plain Chroma persistent directory at the committed hwm to ``out``.

        The checkpoint (downloaded unless cached) with the committed tail
        replayed into it: what a snapshot reader sees. ``out`` must not exist
        or be an empty directory; it appears only when whole (built in the
        cache, then moved).
        """
        target = Path(out)
        if taken := await anyio.to_thread.run_sync(occupied, target):
            raise InvalidInput(f"{target} {taken}: export into a new (or empty) directory")
        copy = await self.committed_copy()
        try:
            await anyio.to_thread.run_sync(move_into, copy.path, target)
        finally:
            await self._discard(copy.path)
        state = copy.state
        return ExportResult(
            self.config.log,
            target,
            state.hwm,
            state.snapshot_key,
            state.checkpoint_hwm,
            copy.replayed,
            copy.counts,
        )

    async def committed_copy(self) -> CommittedCopy:
        """A closed Chroma directory in the cache holding the committed state.

        The checkpoint (downloaded unless cached, read again from a newer
        state if retention pruned it) with the committed tail replayed into
        it. The caller moves the directory away or gives it to ``discard``.
        """
        state, copy = await self._take_committed()
        return await self._replayed(copy, state, state)

    async def advance_copy(self, copy: CommittedCopy, upto: int) -> CommittedCopy:
        """``copy`` with the entries up to ``upto`` applied too (every seq up to it an
        entry or a seal): a lagging shard shown at a sharded log's cut."""
        if upto <= copy.state.hwm:
            return copy
        working = WorkingCopy(copy.path, copy.state.hwm, "checkpoint")
        advanced = await self._replayed(working, copy.state, replace(copy.state, hwm=upto))
        return replace(advanced, replayed=copy.replayed + advanced.replayed)

    async def _replayed(
        self, copy: WorkingCopy, state: LogState, target: LogState
    ) -> CommittedCopy:
        """``copy`` brought up to ``target.hwm``, closed; discarded if that fails."""
        quarantined = await self.table.read_quarantined(self.keys.log_id)
        try:
            # Always Chroma (not the sink factory): what is exported is a Chroma directory,
            # and a plain one: the distinct index stays behind.
            sink = await ChromaSink.open(copy.path, limiter=self._limiter, distinct="off")
            try:
                replayed = await catch_up(self._quiet_replayer(), sink, copy, target, quarantined)
                counts = await sink.counts()
            finally:
                await close_sink(sink)
            await anyio.to_thread.run_sync(remove_distinct, copy.path)
        except BaseException:
            await self._discard(copy.path)
            raise
        return CommittedCopy(copy.path, state, replayed, counts)

    async def discard(self, path: Path) -> None:
        """Remove a directory ``committed_copy`` made."""
        await self._discard(path)

    async def _take_committed(self) -> tuple[LogState, WorkingCopy]:
        """A cold copy of the committed state's checkpoint, and that state.

        No lease is held: retention may delete the checkpoint once a newer
        commit replaced it; then the state is read again (``load_committed``).
        """
        return await load_committed(
            self.read_state,
            lambda state: take(self.cache, self.store, state, log=self.config.log, warm=False),
        )

    async def verify(
        self,
        *,
        index_queries: int = DEFAULT_INDEX_QUERIES,
        min_recall: float = DEFAULT_MIN_RECALL,
    ) -> VerifyResult:
        """Rebuild to the committed hwm into a fresh Chroma directory and compare.

        The committed side is what a reader on a fresh machine gets: the
        checkpoint downloaded, with the committed tail replayed. Both sides
        are Chroma directories built by the same fold, so the comparison is
        exact: ids, vectors bit for bit, documents, metadata. Then the
        committed side's index answers ``index_queries`` sampled queries per
        collection, against brute force (``compactor.verify``): a recall@10
        below ``min_recall`` fails verify (``index_queries=0`` skips it).
        """
        if index_queries < 0 or not 0.0 <= min_recall <= 1.0:
            raise InvalidInput(
                "index_queries (--index-queries) must be at least 0 and min_recall "
                "(--min-recall) between 0 and 1"
            )
        async with AsyncExitStack() as cleanup:  # whatever fails, what was made is undone
            state, committed = await self._take_committed()
            cleanup.push_async_callback(self._discard, committed.path)
            quarantined = await self.table.read_quarantined(self.keys.log_id)
            rebuilt = await anyio.to_thread.run_sync(self.cache.working_copy, None)
            cleanup.push_async_callback(self._discard, rebuilt)
            expected = await self._open_sink(rebuilt)
            cleanup.push_async_callback(close_sink, expected)
            # As a reader opens the checkpoint: its index is checked as readers query it.
            actual = await self._open_sink(committed.path, distinct="use")
            cleanup.push_async_callback(close_sink, actual)
            await catch_up(self._quiet_replayer(), actual, committed, state, quarantined)
            replay = await self._replayer().run(
                expected, after=0, to_seq=state.hwm, quarantined=quarantined
            )
            if replay.error is not None:
                raise replay.error
            result = await compare_sinks(
                expected,
                actual,
                hwm=state.hwm,
                rebuilt_to=replay.last_seq,
                index_queries=index_queries,
                min_recall=min_recall,
            )
            return replace(result, shard=None if self.shard is None else self.shard.index)


def _interrupted(lease: Lease) -> str:
    """The last-run record of a run cancelled (a stop signal) while it held ``lease``."""
    before = lease.state.hwm
    after = before if lease.committed is None else lease.committed
    record = {"at": time.time(), "status": "interrupted", "hwm_before": before, "hwm_after": after}
    return json.dumps(record, sort_keys=True)


def _landed(commit: Commit, now: LogState, lease: Lease) -> bool:
    """Whether ``commit`` is in the state read after its answer was lost or refused.

    A checkpoint's key (a fresh nonce) is committed or in
    ``recent_snapshots`` exactly when the update landed. A commit of hwm
    alone landed when the state holds its hwm under our token: no successor
    took the lease, and only we can move hwm under it.
    """
    if commit.snapshot_key is not None:
        return commit.snapshot_key in (now.snapshot_key, *now.recent_snapshots)
    return (now.owner, now.token, now.hwm) == (lease.owner, lease.token, commit.hwm)


def occupied(path: Path) -> str:
    """Why ``path`` cannot take an export ("" when it can: missing, or an empty directory)."""
    if path.is_dir():
        return "is a directory that is not empty" if any(path.iterdir()) else ""
    return "is a file" if path.exists() else ""


def move_into(work: Path, target: Path) -> None:
    """Move a closed working copy to ``target``, which appears only when whole.

    One rename on one file system; across file systems a copy into a
    sibling scratch directory first, then that rename.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.rmdir()  # empty: checked before the export started
    try:
        work.rename(target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        shutil.copytree(work, staged / "chroma")
        (staged / "chroma").rename(target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
