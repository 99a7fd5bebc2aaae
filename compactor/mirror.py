"""``deltalog mirror``: keep a Chroma server equal to the fold of the log.

- The **target** is one database of a Chroma server (``ChromaTarget``). The
  mirror is a reader that owns it: nothing else should write there.
- The **position** is the seq through which the target holds the log: every
  entry at or below it is applied, none above. It lives on the server, in
  the metadata of the control collection ``deltalog.mirror`` (which holds
  no records), with the log it belongs to, the phase (``bootstrapping`` or
  ``following``) and the lease token of the mirror that wrote it. Records
  carry exactly the metadata the log gives them.
- **Bootstrap**: a target without a position must hold no records. It is
  filled in bulk from the log's published snapshot (collections created
  with the snapshot's HNSW settings and the embedder its collections
  record), and the position becomes the seq that
  snapshot holds (named in its key, and in its sidecar; it may be below the
  committed hwm). A sharded log's target is filled from every shard's
  checkpoint; the shards whose checkpoint is older than the newest are
  then brought up to it with their own records, and the position is that
  seq. An interrupted bootstrap is started again from scratch.
- **Follow**: entries after the position are read, folded and applied in
  seq order in batches (``compactor.replay``), each batch followed by the
  new position. Up to the first hole: the mirror never seals (the compactor
  does); it waits and goes on once the hole is written or sealed.
- **The lease**: one named lease per (log, target) in the table
  (``mirror:{target id}``), renewed by a heartbeat; a second mirror of the
  same target gets ``LeaseBusy``. Before each batch, and each page of a
  bootstrap, the mirror renews it (``LeaseLost`` stops it) and re-reads the
  position: a position other than the one it wrote last means someone else
  wrote the target, and the mirror stops with ``Fenced``.
- **Lineage**: the position records the committed state's lineage it
  descends from (``LogState.lineage``). A published rebuild (a repair, or a
  rollback) starts a new one; a mirror whose position is of another lineage
  bootstraps again from the new checkpoint.

A Chroma server takes no conditional writes, so a mirror's writes are
fenced in time instead. The lease was acquired or last renewed by a request
*sent* at ``t``; nobody can take it before ``t + ttl`` (``Lease.valid_until``,
on this process's monotonic clock). Every request to the server checks, in
the thread that sends it, that it is sent before ``valid_until - margin``
(``margin`` a tenth of the ttl, for clock drift), and each takes at most
``request_timeout``. So a holder that stalls anywhere (a GC pause, SIGSTOP,
a frozen VM) and wakes up after losing the lease sends nothing more, and
what it sent before has landed or failed by ``valid_until +
request_timeout``. A mirror that takes over a lease its holder did not
release waits ``ttl + request_timeout`` before its first request to the
server, then reads the position there and re-applies from it: whatever the
old holder wrote after its last position is re-applied over, in order. One
that saw a request fail in a way that may still land waits
``request_timeout`` before its next one, and does not release the lease
(its successor then waits). Puts replace records in place
(``deltalog.snapshot.server``), so no id is ever absent while a batch lands.
What remains: a process paused for longer than ``margin +
request_timeout`` in the microseconds between the check and its request
leaving the socket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar, cast

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectSendStream

from compactor.lease import Lease, LeaseKeeper
from compactor.replay import Progress, Replay, Replayer
from deltalog.config import LogConfig
from deltalog.errors import (
    ConfigurationError,
    DataError,
    Fenced,
    IdentityMismatch,
    InvalidInput,
    LeaseBusy,
    LeaseLost,
    Unavailable,
)
from deltalog.fold import FoldPlan, Record
from deltalog.keys import LogKeys, Shard
from deltalog.log import DeltaLog
from deltalog.shards import current_shards, read_states
from deltalog.snapshot.cache import SnapshotCache, load_committed
from deltalog.snapshot.server import DEFAULT_REQUEST_TIMEOUT, ChromaServerSink, ChromaTarget
from deltalog.snapshot.sink import ApplyStats, ChromaSink
from deltalog.storage.table import Layout, LeaseState, LogState

__all__ = ["CONTROL_COLLECTION", "Mirror", "MirrorPosition", "MirrorResult", "MirrorStatistics"]

log = logging.getLogger("compactor.mirror")

CONTROL_COLLECTION = "deltalog.mirror"
_CLEANUP_SECONDS = 60.0
_FENCE_MARGIN = 0.1
"""Of the ttl: no request is sent in the last tenth of the lease (clocks drift)."""

T = TypeVar("T")
Phase = Literal["bootstrapping", "following"]
Status = Literal["applied", "nothing", "busy"]


class MirrorPosition(msgspec.Struct, frozen=True):
    """The control collection's metadata. Persisted: new fields only with defaults."""

    log: str
    """The log's id (root prefix and name)."""
    seq: int
    phase: Phase = "following"
    snapshot_key: str = ""
    """The snapshot the target was bootstrapped from."""
    token: int = 0
    """The lease token of the mirror that wrote this position."""
    owner: str = ""
    updated_at: float = 0.0
    format: int = 1
    lineage: str = ""
    """The committed state's lineage the target descends from (``LogState.lineage``)."""
    request_timeout: float = 0.0
    """The writer's request timeout (0: unknown), which a mirror taking over waits for."""
    identity: str = ""
    """The log's full identity, bucket included (``LogKeys.identity``); "" in a
    position written before it (the next write records it)."""


@dataclass(frozen=True, slots=True)
class MirrorStatistics:
    """Where a mirror is and what it has done since it was created."""

    position: int
    head: int
    batches: int
    entries: int
    vectors_upserted: int
    ids_deleted: int
    ids_patched: int
    bootstrapped: int
    """Records copied from the snapshot by a bootstrap."""
    seconds: float
    """Time spent bootstrapping and applying."""
    bootstrap_total: int = 0
    """While a bootstrap runs: the records it copies (0 otherwise)."""
    bootstrap_copied: int = 0
    """While a bootstrap runs: the records it has copied so far."""

    @property
    def lag(self) -> int:
        return max(0, self.head - self.position)

    @property
    def vectors_per_second(self) -> float:
        return (self.vectors_upserted + self.bootstrapped) / self.seconds if self.seconds else 0.0


@dataclass(frozen=True, slots=True)
class MirrorResult:
    """What one catch-up did."""

    status: Status
    log: str
    target: str
    position_before: int
    position_after: int
    head: int
    entries: int = 0
    vectors_upserted: int = 0
    ids_deleted: int = 0
    ids_patched: int = 0
    bootstrapped: int = 0
    stopped: str = ""
    """Why reading stopped: ``end``, ``hole``, ``poison``, ``error``; the holder when busy."""
    seconds: float = 0.0

    @property
    def lag(self) -> int:
        return max(0, self.head - self.position_after)

    def summary(self) -> str:
        if self.status == "busy":
            return f"{self.log} -> {self.target}: lease busy ({self.stopped})"
        boot = f"bootstrapped {self.bootstrapped} records; " if self.bootstrapped else ""
        rate = (self.vectors_upserted + self.bootstrapped) / self.seconds if self.seconds else 0.0
        why = f", stopped at a hole at {self.position_after + 1}" if self.stopped == "hole" else ""
        return (
            f"{self.log} -> {self.target}: {boot}position {self.position_before} -> "
            f"{self.position_after} (head {self.head}, lag {self.lag}){why}: {self.entries} "
            f"entries, {self.vectors_upserted} vectors upserted, {self.ids_deleted} deleted, "
            f"{self.ids_patched} patched in {self.seconds:.1f}s ({rate:,.0f} vectors/s)"
        )


@dataclass(slots=True)
class _Counts:
    batches: int = 0
    entries: int = 0
    vectors: int = 0
    deletes: int = 0
    patches: int = 0
    bootstrapped: int = 0
    seconds: float = 0.0
    """Wall time of finished catch-ups."""
    running_since: float | None = None
    head: int = 0
    position: int = 0
    bootstrap_total: int = 0
    bootstrap_copied: int = 0


@dataclass(slots=True)
class _Session:
    """One holding of the lease: the server connection and the position last written."""

    keeper: LeaseKeeper
    lease: Lease
    sink: ChromaServerSink
    position: MirrorPosition | None = None
    applied: list[ApplyStats] = field(default_factory=list)
    settle_until: float = 0.0
    """On the monotonic clock: no request to the server before it (see the module docstring)."""
    taken_over: LeaseState | None = None
    """The lease as its previous holder left it, when it did not release it."""
    taken_at: float = 0.0
    """On the monotonic clock: when the acquire was sent."""


class Mirror:
    """Mirrors one log into one Chroma server database; see the module docstring."""

    def __init__(
        self,
        config: LogConfig,
        target: ChromaTarget,
        *,
        cache_dir: Path | str = Path(".deltalog/cache"),
        lease_ttl: float = 30.0,
        prefetch: int = 32,
        chunk_vectors: int = 10_000,
        chunk_entries: int = 2_000,
        max_batch_size: int | None = None,
        progress: Callable[[MirrorStatistics], None] | None = None,
        log_handle: DeltaLog | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        if not request_timeout > 0:
            raise InvalidInput("request_timeout (--request-timeout) must be positive")
        self.request_timeout = request_timeout
        self.config = config
        self.target = target
        self.keys = config.keys
        self.lease_ttl = lease_ttl
        self.prefetch = prefetch
        self.chunk_vectors = chunk_vectors
        self.chunk_entries = chunk_entries
        self.max_batch_size = max_batch_size
        self.progress = progress
        self._cache_dir = Path(cache_dir)
        self.cache = SnapshotCache.for_log(self._cache_dir, self.keys)
        self._log = log_handle
        self._owns_log = log_handle is None
        self._counts = _Counts()

    @property
    def lease_name(self) -> str:
        return f"mirror:{self.target.id}"

    @property
    def log(self) -> DeltaLog:
        if self._log is None:
            raise RuntimeError("use the mirror as `async with Mirror(...) as mirror`")
        return self._log

    async def __aenter__(self) -> Self:
        if self._log is None:
            self._log = await DeltaLog.connect(self.config)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_log and self._log is not None:
            log_, self._log = self._log, None
            await log_.aclose()

    def statistics(self) -> MirrorStatistics:
        c = self._counts
        running = time.monotonic() - c.running_since if c.running_since is not None else 0.0
        return MirrorStatistics(
            c.position,
            c.head,
            c.batches,
            c.entries,
            c.vectors,
            c.deletes,
            c.patches,
            c.bootstrapped,
            c.seconds + running,
            c.bootstrap_total,
            c.bootstrap_copied,
        )

    # -- the two modes ----------------------------------------------------------

    async def run_once(self) -> MirrorResult:
        """Catch the target up to the log's head (up to the first hole), then release."""
        try:
            session = await self._open_session()
        except LeaseBusy as exc:
            return self._busy(exc)
        return await self._holding(session, self._catch_up)

    async def _holding(self, session: _Session, work: Callable[[_Session], Awaitable[T]]) -> T:
        """Run ``work`` under the session's lease and heartbeat; close the session after.

        A failure is raised as itself, not as a task group's exception group.
        """
        failure: Exception | None = None
        result: T | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(session.keeper.heartbeat, session.lease, tg.cancel_scope)
                try:
                    result = await work(session)
                except Exception as exc:
                    failure = exc
                tg.cancel_scope.cancel()
        finally:
            await self._close_session(session)
        session.lease.check()
        if failure is not None:
            raise failure
        return cast("T", result)

    async def follow(
        self,
        *,
        poll_min: float = 0.5,
        poll_max: float = 10.0,
        on_result: Callable[[MirrorResult], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """Catch up, then keep following the log until cancelled (``LeaseBusy`` if held)."""
        session = await self._open_session()

        async def work(session: _Session) -> None:
            await self._follow(session, poll_min, poll_max, on_result, on_error)

        await self._holding(session, work)

    async def _follow(
        self,
        session: _Session,
        poll_min: float,
        poll_max: float,
        on_result: Callable[[MirrorResult], None] | None,
        on_error: Callable[[Exception], None] | None,
    ) -> None:
        delay = poll_min
        while True:
            try:
                result = await self._catch_up(session)
            except (Unavailable, DataError) as exc:
                # A server or store outage, or a poison entry waiting for a
                # quarantine: report it and keep trying at the slowest pace.
                if on_error is not None:
                    on_error(exc)
                log.error("%s: %s", self.config.log, exc)
                await anyio.sleep(poll_max)
                continue
            if on_result is not None and result.status != "nothing":
                on_result(result)
            if result.status == "applied" and result.stopped != "hole":
                delay = poll_min
                continue
            await anyio.sleep(delay)
            delay = min(poll_max, delay * 2)

    # -- the session: lease and connection --------------------------------------

    async def _open_session(self) -> _Session:
        keeper = LeaseKeeper(
            self.log.table, self.keys.log_id, ttl=self.lease_ttl, name=self.lease_name
        )
        before = await self.log.table.read_lease(self.keys.log_id, self.lease_name)
        taken_at = time.monotonic()
        lease = await keeper.acquire()
        try:
            sink = await ChromaServerSink.connect(
                self.target,
                control=CONTROL_COLLECTION,
                log=self.config.log,
                max_batch_size=self.max_batch_size,
                request_timeout=self.request_timeout,
            )
        except BaseException:
            await keeper.release(lease)
            raise
        session = _Session(keeper, lease, sink, taken_at=taken_at)
        try:
            await keeper.renew(lease)  # connecting takes a while; the heartbeat starts later
        except BaseException:
            await self._close_session(session)
            raise
        sink.fence = self._fence(lease)
        if not (before.owner is None and lease.token == before.token + 1):
            session.taken_over = before  # its requests may still be landing
        return session

    def _fence(self, lease: Lease) -> Callable[[], None]:
        """The check every request to the server passes first (see the module docstring)."""
        margin = self.lease_ttl * _FENCE_MARGIN

        def check() -> None:
            lease.check()
            if time.monotonic() >= lease.valid_until - margin:
                raise LeaseLost(
                    f"the lease of {self.target.id} was not renewed in time and may be "
                    "another mirror's now: no request is sent to the server past it",
                    log=self.config.log,
                )

        return check

    async def _settle(self, session: _Session) -> None:
        """Wait until requests that may still land (ours or a predecessor's) have."""
        if session.taken_over is not None:
            session.settle_until = session.taken_at + await self._predecessor_bound(session)
            session.taken_over = None
        if session.sink.unsettled:
            session.sink.unsettled = False
            session.settle_until = max(
                session.settle_until, time.monotonic() + self.request_timeout
            )
        delay = session.settle_until - time.monotonic()
        if delay > 0:
            log.warning(
                "%s -> %s: waiting %.1fs for requests that may still land on the server",
                self.config.log,
                self.target.id,
                delay,
            )
            await anyio.sleep(delay)

    async def _predecessor_bound(self, session: _Session) -> float:
        """How long after our acquire an unreleased predecessor's requests may land: its
        ttl (the lease item says which it renewed with) plus its request timeout (its
        position says), or ours where longer."""
        before = session.taken_over
        assert before is not None
        ttl = max(self.lease_ttl, before.expires_at - before.updated_at)
        position = await self._read_position(session)
        timeout = max(self.request_timeout, position.request_timeout if position else 0.0)
        return ttl + timeout

    async def _close_session(self, session: _Session) -> None:
        with anyio.move_on_after(_CLEANUP_SECONDS, shield=True):
            try:
                await session.sink.aclose()
            finally:
                if session.sink.unsettled:  # the next holder must wait for it to land
                    log.warning(
                        "%s -> %s: a request may still land on the server; the lease is "
                        "left to expire",
                        self.config.log,
                        self.target.id,
                    )
                elif session.lease.lost is None:
                    await session.keeper.release(session.lease)

    def _busy(self, exc: LeaseBusy) -> MirrorResult:
        return MirrorResult("busy", self.config.log, self.target.id, 0, 0, 0, stopped=exc.message)

    # -- catching up --------------------------------------------------------------

    async def _catch_up(self, session: _Session) -> MirrorResult:
        started = self._counts.running_since = time.monotonic()
        try:
            return await self._catch_up_timed(session, started)
        finally:
            self._counts.seconds += time.monotonic() - started
            self._counts.running_since = None

    async def _catch_up_timed(self, session: _Session, started: float) -> MirrorResult:
        await self._settle(session)
        head = await self.log.head()
        self._counts.head = head
        session.sink.dims = await self.log.table.read_dims(self.keys.log_id)
        boot_before = self._counts.bootstrapped
        position = await self._start(session)
        before = position.seq
        replay = Replay(after=position.seq, last_seq=position.seq, stopped="end")
        if head > position.seq:
            replay = await self._replay(session, position.seq)
            if replay.error is not None and not replay.advanced:
                raise replay.error
        seconds = time.monotonic() - started
        bootstrapped = self._counts.bootstrapped - boot_before
        moved = replay.advanced or bootstrapped > 0
        return MirrorResult(
            "applied" if moved else "nothing",
            self.config.log,
            self.target.id,
            before,
            replay.last_seq,
            max(head, replay.last_seq),
            entries=replay.entries,
            vectors_upserted=replay.vectors_upserted,
            ids_deleted=replay.ids_deleted,
            ids_patched=replay.ids_patched,
            bootstrapped=bootstrapped,
            stopped=replay.stopped,
            seconds=seconds,
        )

    async def _start(self, session: _Session) -> MirrorPosition:
        """The position to follow from, bootstrapping the target if it has none."""
        position = await self._read_position(session)
        session.position = position
        if position is not None and position.seq > self._counts.head:
            raise Fenced(
                f"{self.target.url} holds the log up to seq {position.seq}, ahead of the log "
                f"(head {self._counts.head}): it was written from another log or by hand. "
                "Stopping: mirror into an empty database",
                log=self.config.log,
            )
        if position is None or position.phase == "bootstrapping":
            return await self._bootstrap(session, restart=position is not None)
        lineage = await self._lineage()
        if position.lineage != lineage:
            log.warning(
                "%s -> %s: the target descends from lineage %r, the committed state from %r "
                "(a published rebuild): bootstrapping it again",
                self.config.log,
                self.target.id,
                position.lineage,
                lineage,
            )
            return await self._bootstrap(session, restart=True)
        return position

    async def _read_state(self) -> LogState:
        return await self.log.table.read_state(self.keys.log_id)

    async def _lineage(self) -> str:
        """The committed state's lineage; of a sharded log, its shards' (the non-empty
        ones, sorted: a published rebuild of any shard makes it another)."""
        layout = await self.log.table.read_layout(self.keys.log_id)
        if not layout.sharded:
            return (await self._read_state()).lineage
        states = await read_states(self.log.table, self.keys, current_shards(layout))
        return ",".join(sorted({state.lineage for state in states} - {""}))

    async def _read_position(self, session: _Session) -> MirrorPosition | None:
        raw = await session.sink.read_control()
        if raw is None:
            return None
        try:
            position = msgspec.convert(raw, MirrorPosition)
        except msgspec.ValidationError as exc:
            raise ConfigurationError(
                f"the collection {CONTROL_COLLECTION!r} on {self.target.url} is not a "
                f"deltalog mirror's ({exc}): mirror into another database",
                log=self.config.log,
            ) from exc
        mirrored = position.identity or position.log
        if position.log != self.keys.log_id or mirrored not in (
            self.keys.identity,
            self.keys.log_id,
        ):
            raise IdentityMismatch(
                f"{self.target.url} ({self.target.tenant}/{self.target.database}) mirrors the "
                f"log {mirrored!r}, not {self.keys.identity!r}: use another database",
                recorded=mirrored,
                wanted=self.keys.identity,
                log=self.config.log,
            )
        if not position.identity:
            log.warning(
                "%s: the mirror position was written before identities; it is %s from its "
                "next write",
                self.target.url,
                self.keys.identity,
            )
        return position

    async def _write_position(
        self,
        session: _Session,
        seq: int,
        phase: Phase = "following",
        snapshot_key: str = "",
        lineage: str | None = None,
    ) -> None:
        old = session.position
        position = MirrorPosition(
            log=self.keys.log_id,
            identity=self.keys.identity,
            seq=seq,
            phase=phase,
            snapshot_key=snapshot_key or (old.snapshot_key if old else ""),
            token=session.lease.token,
            owner=session.lease.owner,
            updated_at=time.time(),
            lineage=lineage if lineage is not None else (old.lineage if old else ""),
            request_timeout=self.request_timeout,
        )
        await session.sink.write_control(msgspec.to_builtins(position))
        session.position = position
        self._counts.position = seq

    async def _check_position(self, session: _Session) -> None:
        """Before a batch: the lease is still ours and the target is where we left it."""
        await session.keeper.renew(session.lease)
        now = await self._read_position(session)
        mine = session.position
        if now is None or mine is None or (now.seq, now.token) != (mine.seq, mine.token):
            found = "no position" if now is None else f"position {now.seq} (token {now.token})"
            expected = mine.seq if mine else 0
            ahead = now is not None and now.seq > expected
            raise Fenced(
                f"{self.target.url} holds {found}, not this mirror's position {expected}"
                + (": the server is ahead of this mirror" if ahead else "")
                + "; another writer changed it. Stopping: run one mirror per target",
                log=self.config.log,
            )

    # -- bootstrap ----------------------------------------------------------------

    async def _bootstrap(self, session: _Session, *, restart: bool) -> MirrorPosition:
        sink = session.sink
        if restart:
            for name in await sink.collections():
                await sink.drop(name)
        else:
            await self._check_empty(sink)
        layout = await self.log.table.read_layout(self.keys.log_id)
        if layout.sharded:
            seq, key, lineage = await self._bootstrap_shards(session, layout)
            await self._write_position(session, seq, snapshot_key=key, lineage=lineage)
            assert session.position is not None
            return session.position
        # No lease of the log's: retention may delete the checkpoint while it downloads.
        state, work = await load_committed(self._read_state, self._download)
        key = state.snapshot_key or ""
        try:
            await self._write_position(
                session, 0, phase="bootstrapping", snapshot_key=key, lineage=state.lineage
            )
            if work is not None:
                await self._copy_from(session, work)
        finally:
            if work is not None:
                with anyio.move_on_after(_CLEANUP_SECONDS, shield=True):
                    await anyio.to_thread.run_sync(self.cache.discard, work)
        seq = state.checkpoint_hwm if work is not None else 0
        await self._write_position(session, seq, snapshot_key=key, lineage=state.lineage)
        self._report()  # the bootstrap is over: following starts from here
        assert session.position is not None
        return session.position

    async def _catch_up_shard(
        self, session: _Session, shard: Shard | None, at: int, seq: int
    ) -> None:
        """Apply ``shard``'s records of ``(at, seq]`` (its checkpoint is older than another's)."""
        if at >= seq:
            return
        quarantined = await self.log.table.read_quarantined(self.keys.log_id)
        replayer = Replayer(self.log, prefetch=self.prefetch, shard=shard)
        replay = await replayer.run(
            _Bootstrap(self, session), after=at, to_seq=seq, quarantined=quarantined
        )
        if replay.error is not None:
            raise replay.error
        if replay.last_seq != seq:
            raise DataError(
                f"the log stops at seq {replay.stop_seq} ({replay.stopped}) below seq {seq}, "
                "which a shard's checkpoint holds",
                log=self.config.log,
                seq=replay.stop_seq,
            )

    async def _bootstrap_shards(self, session: _Session, layout: Layout) -> tuple[int, str, str]:
        """Fill the target from every shard's checkpoint, then bring the shards whose
        checkpoint is older up to the newest one's seq; that seq, the checkpoints' keys
        and the lineage."""
        shards = current_shards(layout)
        held: list[int] = []
        keys: list[str] = []
        for shard in shards:
            cache = self._shard_cache(shard)
            own = self.keys.for_shard(shard)

            async def read_state(own: LogKeys = own) -> LogState:
                return await self.log.table.read_state(own.log_id, sk=own.state_sk)

            def download(state: LogState, cache: SnapshotCache = cache) -> Awaitable[Path | None]:
                return self._download(state, cache)

            # No lease of the shard's: retention may delete the checkpoint while it downloads.
            state, work = await load_committed(read_state, download)
            if not held:
                await self._write_position(session, 0, phase="bootstrapping")
            try:
                if work is not None:
                    await self._copy_from(session, work)
            finally:
                if work is not None:
                    with anyio.move_on_after(_CLEANUP_SECONDS, shield=True):
                        await anyio.to_thread.run_sync(cache.discard, work)
            held.append(state.checkpoint_hwm if work is not None else 0)
            keys.append(state.snapshot_key or "")
        seq = max(held)
        for shard, at in zip(shards, held, strict=True):
            await self._catch_up_shard(session, shard, at, seq)
        return seq, ",".join(keys), await self._lineage()

    async def _check_empty(self, sink: ChromaServerSink) -> None:
        names = await sink.collections()
        await sink.check(names)
        counts = await sink.counts()
        held = {name: n for name, n in counts.items() if n}
        if held:
            listed = ", ".join(f"{name} ({n})" for name, n in sorted(held.items()))
            raise ConfigurationError(
                f"{self.target.url} ({self.target.tenant}/{self.target.database}) holds records "
                f"no mirror wrote: {listed}. A mirror bootstraps an empty database: delete "
                "them or use another database",
                log=self.config.log,
            )

    async def _download(self, state: LogState, cache: SnapshotCache | None = None) -> Path | None:
        """A working copy of the checkpoint ``state`` points to; None without one."""
        if state.snapshot_key is None or state.snapshot_sha256 is None:
            return None
        return await (cache or self.cache).copy_of(
            self.log.store, state.snapshot_key, state.snapshot_sha256, log=self.config.log
        )

    async def _copy_from(self, session: _Session, work: Path) -> None:
        """Copy a checkpoint's working copy into the target."""
        snapshot = await ChromaSink.open(
            work, log=self.config.log, max_batch_size=self.max_batch_size, distinct="off"
        )
        try:
            await self._copy(session, snapshot)
        finally:
            with anyio.move_on_after(_CLEANUP_SECONDS, shield=True):
                await snapshot.aclose()

    def _shard_cache(self, shard: Shard | None) -> SnapshotCache:
        if shard is None:
            return self.cache
        return SnapshotCache.for_log(self._cache_dir, self.keys.for_shard(shard))

    async def _copy(self, session: _Session, snapshot: ChromaSink) -> None:
        """Each collection, then each page, after the lease is renewed and the position
        found as written: a bootstrapper that stalled writes nothing into a new
        holder's collections."""
        sink = session.sink
        names = await snapshot.collections()
        await sink.check(names)
        self._counts.bootstrap_total = sum((await snapshot.counts()).values())
        self._counts.bootstrap_copied = 0
        self._report()
        try:
            await self._copy_collections(session, snapshot, names)
        finally:
            self._counts.bootstrap_total = self._counts.bootstrap_copied = 0

    async def _copy_collections(
        self, session: _Session, snapshot: ChromaSink, names: list[str]
    ) -> None:
        sink = session.sink
        for name in names:
            sink.settings[name] = await snapshot.hnsw(name)
            await self._check_position(session)
            await sink.add(name, [])  # creates it, empty ones included
            if embedder := await snapshot.embedder(name):
                await sink.set_embedder(name, embedder)
            # Read the next page from the snapshot while this one goes to the server.
            send, recv = anyio.create_memory_object_stream[list[Record]](1)
            failure: Exception | None = None  # raised as itself, not as a task group's
            async with anyio.create_task_group() as tg:
                tg.start_soon(_pages_into, snapshot, name, send)
                async with recv:
                    try:
                        async for page in recv:
                            await self._check_position(session)
                            await sink.add(name, page)
                            self._counts.bootstrapped += len(page)
                            self._counts.bootstrap_copied += len(page)
                            self._report()
                    except Exception as exc:
                        failure = exc
                        tg.cancel_scope.cancel()
            if failure is not None:
                raise failure

    # -- following ----------------------------------------------------------------

    async def _replay(self, session: _Session, after: int) -> Replay:
        quarantined = await self.log.table.read_quarantined(self.keys.log_id)
        replayer = Replayer(
            self.log,
            prefetch=self.prefetch,
            chunk_vectors=self.chunk_vectors,
            chunk_entries=self.chunk_entries,
            progress=self._on_replay,
        )
        return await replayer.run(_Batches(self, session), after=after, quarantined=quarantined)

    def _on_replay(self, progress: Progress) -> None:
        self._report()

    async def apply_batch(self, session: _Session, plan: FoldPlan) -> ApplyStats:
        """One batch: check the lease and the position, apply, write the new position."""
        assert plan.last_seq is not None
        await self._check_position(session)
        unknown = [name for name in plan.collections if name not in session.sink.dims]
        if unknown:
            session.sink.dims = await self.log.table.read_dims(self.keys.log_id)
        await session.sink.check(list(plan.collections))
        stats = await session.sink.apply(plan)
        await self._write_position(session, plan.last_seq)
        self._count(plan, stats)
        return stats

    def _count(self, plan: FoldPlan, stats: ApplyStats) -> None:
        c = self._counts
        c.batches += 1
        c.entries += plan.entries
        c.vectors += plan.vectors_upserted
        c.deletes += stats.removed
        c.patches += plan.ids_patched
        c.head = max(c.head, c.position)

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.statistics())


async def _pages_into(
    snapshot: ChromaSink, name: str, send: MemoryObjectSendStream[list[Record]]
) -> None:
    async with send:
        async for page in snapshot.pages(name):
            await send.send(page)


class _Bootstrap:
    """The sink a bootstrap's shard catch-up applies to: the target, each batch after the
    lease is renewed and the position found as written (as a bootstrap's pages), no
    position written."""

    def __init__(self, mirror: Mirror, session: _Session) -> None:
        self.mirror = mirror
        self.session = session

    async def apply(self, plan: FoldPlan) -> ApplyStats:
        await self.mirror._check_position(self.session)
        await self.session.sink.check(list(plan.collections))
        return await self.session.sink.apply(plan)

    async def counts(self) -> dict[str, int]:
        return await self.session.sink.counts()

    async def records(self, collection: str) -> list[Record]:
        return await self.session.sink.records(collection)

    async def collections(self) -> list[str]:
        return await self.session.sink.collections()

    async def aclose(self) -> None:
        return None


class _Batches:
    """The sink the replay applies to: each plan is one mirror batch."""

    def __init__(self, mirror: Mirror, session: _Session) -> None:
        self.mirror = mirror
        self.session = session

    async def apply(self, plan: FoldPlan) -> ApplyStats:
        return await self.mirror.apply_batch(self.session, plan)

    async def counts(self) -> dict[str, int]:
        return await self.session.sink.counts()

    async def records(self, collection: str) -> list[Record]:
        return await self.session.sink.records(collection)

    async def collections(self) -> list[str]:
        return await self.session.sink.collections()

    async def aclose(self) -> None:
        return None
