"""Replay: read entries in seq order, fold them, apply them to a sink.

Two tasks in one task group: the **reader** lists and fetches entries
(``LogReader``'s concurrent prefetch) into a bounded stream, and the
**applier** folds them and applies each chunk's plan to the sink (in a
worker thread, for Chroma) while the next entries download. Applying the
plans of consecutive chunks one after another equals applying the plan of
the whole run, so chunking changes nothing but memory and latency.

A **chunk** ends at ``chunk_vectors`` vectors, ``chunk_entries`` entries or
``chunk_bytes`` stored bytes, whichever comes first. The bytes cap is what
bounds memory: a plan's vectors are ``numpy.frombuffer`` views, each of
which keeps its whole entry object alive until the chunk is applied.

The reader stops at:

- the end of the log, or ``to_seq``;
- a **hole**: sealed and passed if the ``HoleSealer`` says it is old
  enough, otherwise the replay stops before it (``young-hole``);
- a **poison** entry (corrupt, undecodable, or malformed: it decodes but
  breaks a rule its deltas met at append time, such as one vector per id or
  the collection's dimension; see ``LogReader``): passed as a seal if an
  operator quarantined its seq, otherwise the replay stops before it and
  reports the error. Nothing of a poison entry is ever folded, so what
  came before it is a whole prefix that may be committed;
- a configured limit on entries, bytes or seconds, or a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from deltalog.config import MiB
from deltalog.entry import Entry, Seal
from deltalog.errors import CorruptEntry, DeltalogError
from deltalog.fold import Folder
from deltalog.keys import Shard
from deltalog.log import DeltaLog
from deltalog.read import LogReader, ReadEnd
from deltalog.snapshot.sink import Sink

__all__ = ["HoleSealer", "Limits", "Progress", "Replay", "Replayer"]


@dataclass(frozen=True, slots=True)
class Limits:
    """When a run stops early: after this many entries, bytes or seconds, or at a deadline."""

    max_entries: int | None = None
    max_bytes: int | None = None
    max_seconds: float | None = None
    """Seconds from the start of the replay."""
    deadline: float | None = None
    """An absolute time on ``time.monotonic()``'s clock by which the whole run must be
    done, the time it takes to get its working copy included (a Lambda invocation's end
    less a margin). ``Compactor.run_once`` stops the replay early enough to publish and
    commit by then; ``Replayer.run`` stops reading at it."""


@dataclass(frozen=True, slots=True)
class Progress:
    """A progress report: the last seq read and what has been done so far."""

    seq: int
    entries: int
    vectors: int
    elapsed: float
    after: int = 0
    """The seq the run started after (its committed hwm): ``seq - after`` seqs are done."""
    shard: str | None = None
    """The shard replayed (its name, ``g{generation}-s{index}``), or None for a log
    without shards."""


class HoleSealer(Protocol):
    """Decides whether a hole is old enough and seals it (the compactor, under its lease)."""

    async def should_seal(self, end: ReadEnd) -> bool: ...

    async def seal(self, seq: int) -> None: ...


@dataclass(slots=True)
class Replay:
    """What one replay did, and why it stopped."""

    after: int
    last_seq: int
    entries: int = 0
    bytes_read: int = 0
    """Bytes fetched, prefetched entries included."""
    bytes_passed: int = 0
    """Stored bytes of the entries passed on to be applied (what ``max_bytes`` limits)."""
    vectors_upserted: int = 0
    ids_deleted: int = 0
    """Ids deleted that the sink held (a delete of an absent id is not counted)."""
    ids_patched: int = 0
    seals_written: int = 0
    quarantined_passed: int = 0
    stopped: str = "end"
    """``end``, ``limit``, ``hole`` (not sealable), ``poison``."""
    stop_seq: int | None = None
    error: DeltalogError | None = None
    seconds: float = 0.0
    ends: list[ReadEnd] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    """Records per collection in the sink after the replay, when known."""

    @property
    def advanced(self) -> bool:
        return self.last_seq > self.after


_Item = tuple[int, Entry, int]
"""What the reader task passes on: seq, entry, and the entry's stored size in bytes."""


@dataclass(frozen=True, slots=True)
class _Reading:
    """What the reader task of one run goes by."""

    to_seq: int | None
    quarantined: dict[int, str]
    sealer: HoleSealer | None
    limits: Limits
    start: float
    dims: dict[str, int]
    """The log's schema: an entry with other dimensions is malformed (poison)."""


class Replayer:
    """Replays a log into a sink; see the module docstring."""

    def __init__(
        self,
        log: DeltaLog,
        *,
        prefetch: int = 32,
        chunk_vectors: int = 10_000,
        chunk_entries: int = 2_000,
        chunk_bytes: int = 128 * MiB,
        progress: Callable[[Progress], None] | None = None,
        shard: Shard | None = None,
    ) -> None:
        self.log = log
        self.shard = shard
        """Apply only the records of this shard of a sharded log (None: every record)."""
        self.prefetch = prefetch
        self.chunk_vectors = chunk_vectors
        self.chunk_entries = chunk_entries
        self.chunk_bytes = chunk_bytes
        self.progress = progress

    async def run(
        self,
        sink: Sink,
        *,
        after: int,
        to_seq: int | None = None,
        quarantined: dict[int, str] | None = None,
        sealer: HoleSealer | None = None,
        limits: Limits | None = None,
    ) -> Replay:
        """Replay entries after ``after`` into ``sink``.

        A failure to read stops the replay and is reported in ``error``: what
        was applied before it is a contiguous prefix and may be committed. A
        failure to apply raises, since the sink's state is then unknown.
        """
        replay = Replay(after=after, last_seq=after)
        start = time.monotonic()
        reading = _Reading(
            to_seq,
            quarantined or {},
            sealer,
            limits or Limits(),
            start,
            await self.log.table.read_dims(self.log.keys.log_id),
        )
        send, recv = anyio.create_memory_object_stream[_Item](self.prefetch)
        failed: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._read, send, replay, reading)
            try:
                await self._apply_all(recv, sink, replay, start)
            except Exception as exc:
                failed = exc
                tg.cancel_scope.cancel()
        replay.seconds = time.monotonic() - start
        if failed is not None:
            raise failed
        return replay

    async def _read(
        self,
        send: MemoryObjectSendStream[_Item],
        replay: Replay,
        reading: _Reading,
    ) -> None:
        async with send:
            next_after: int | None = replay.after
            try:
                while next_after is not None:
                    next_after = await self._read_pass(send, replay, next_after, reading)
            except DeltalogError as exc:
                replay.stopped, replay.error = "error", exc

    async def _read_pass(
        self,
        send: MemoryObjectSendStream[_Item],
        replay: Replay,
        after: int,
        reading: _Reading,
    ) -> int | None:
        """One listing pass; return where the next pass starts, or None to stop."""
        reader = self.log.read(
            after=after, to_seq=reading.to_seq, prefetch=self.prefetch, dims=reading.dims
        )
        passed = 0
        try:
            async with aclosing(reader.__aiter__()) as entries:
                async for seq, entry in entries:
                    size, passed = reader.bytes_yielded - passed, reader.bytes_yielded
                    await send.send((seq, entry, size))
                    replay.entries += 1
                    if self._over(reading.limits, replay, reader.bytes_yielded, reading.start):
                        replay.stopped, replay.stop_seq = "limit", seq + 1
                        return None
        except CorruptEntry as exc:
            self._count_bytes(replay, reader)
            return await self._poison(send, replay, exc, reading.quarantined)
        self._count_bytes(replay, reader)
        end = reader.end
        assert end is not None
        replay.ends.append(end)
        return await self._at_end(replay, end, reading.sealer)

    def _count_bytes(self, replay: Replay, reader: LogReader) -> None:
        replay.bytes_read += reader.bytes_read
        replay.bytes_passed += reader.bytes_yielded

    def _over(self, limits: Limits, replay: Replay, pass_bytes: int, start: float) -> bool:
        """Checked after each entry passed on; bytes count entries passed, not prefetched."""
        return (
            (limits.max_entries is not None and replay.entries >= limits.max_entries)
            or (
                limits.max_bytes is not None
                and replay.bytes_passed + pass_bytes >= limits.max_bytes
            )
            or (limits.max_seconds is not None and time.monotonic() - start >= limits.max_seconds)
            or (limits.deadline is not None and time.monotonic() >= limits.deadline)
        )

    async def _poison(
        self,
        send: MemoryObjectSendStream[_Item],
        replay: Replay,
        exc: CorruptEntry,
        quarantined: dict[int, str],
    ) -> int | None:
        seq = exc.seq
        if seq is not None and seq in quarantined:
            seal = Seal(sealed_by="quarantine", reason=quarantined[seq], kind="quarantine")
            await send.send((seq, seal, 0))
            replay.entries += 1
            replay.quarantined_passed += 1
            return seq
        replay.stopped, replay.stop_seq, replay.error = "poison", seq, exc
        return None

    async def _at_end(self, replay: Replay, end: ReadEnd, sealer: HoleSealer | None) -> int | None:
        replay.stop_seq = end.seq
        if end.reason != "hole":
            replay.stopped = end.reason
            return None
        if sealer is None or not await sealer.should_seal(end):
            replay.stopped = "hole"
            return None
        await sealer.seal(end.seq)
        replay.seals_written += 1
        return end.seq - 1

    async def _apply_all(
        self,
        recv: MemoryObjectReceiveStream[_Item],
        sink: Sink,
        replay: Replay,
        start: float,
    ) -> None:
        folder = Folder(log=self.log.config.log, shard=self.shard)
        vectors = entries = size = 0
        async with recv:
            async for seq, entry, stored in recv:
                before = folder.vectors
                folder.add(seq, entry)
                # the vectors this replay applies (its shard's), not every vector read
                vectors += folder.vectors - before
                entries, size = entries + 1, size + stored
                if (
                    vectors >= self.chunk_vectors
                    or entries >= self.chunk_entries
                    or size >= self.chunk_bytes
                ):
                    await self._apply(sink, folder, replay, start)
                    vectors = entries = size = 0
        await self._apply(sink, folder, replay, start)

    async def _apply(self, sink: Sink, folder: Folder, replay: Replay, start: float) -> None:
        plan = folder.plan()
        if plan.first_seq is None or plan.last_seq is None:  # nothing since the last chunk
            return
        stats = await sink.apply(plan)
        replay.last_seq = plan.last_seq
        replay.vectors_upserted += plan.vectors_upserted
        replay.ids_deleted += stats.removed  # deletes of ids that were there
        replay.ids_patched += plan.ids_patched
        folder.reset()
        if self.progress is not None:
            self.progress(
                Progress(
                    plan.last_seq,
                    replay.entries,
                    replay.vectors_upserted,
                    time.monotonic() - start,
                    replay.after,
                    None if self.shard is None else self.shard.name,
                )
            )
