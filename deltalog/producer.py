"""Group commit: many concurrent submitters, few entries.

A ``Producer`` collects the deltas that concurrent tasks submit for up to
``linger_ms`` (or until ``max_bytes`` / ``max_deltas``), writes them as one
entry through the append protocol, and resolves each submitter with the
shared seq only once the entry is durable. Up to ``max_in_flight`` entries
are written at once. A bounded queue of ``max_pending`` deltas gives
backpressure: ``submit`` waits while it is full.

Each delta is validated and encoded in its submitter's task, so bad input
fails that caller alone and nothing is queued. A failed entry fails every
submitter in it with the cause. Closing the producer flushes what was
submitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from deltalog.append import EncodedDelta, Outcome
from deltalog.entry import Delta
from deltalog.errors import Closed

if TYPE_CHECKING:
    from deltalog.log import DeltaLog

__all__ = ["Producer", "ProducerStatistics"]

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ProducerStatistics:
    deltas_submitted: int
    deltas_acknowledged: int
    deltas_failed: int
    entries_written: int
    bytes_written: int
    queued: int
    in_flight: int

    @property
    def deltas_per_entry(self) -> float:
        return self.deltas_acknowledged / self.entries_written if self.entries_written else 0.0


@dataclass(slots=True)
class _Submission:
    delta: EncodedDelta
    done: anyio.Event = field(default_factory=anyio.Event)
    outcome: Outcome | BaseException | None = None


class Producer:
    """Group-commit appender for one log. Use as ``async with log.producer()``."""

    def __init__(
        self,
        log: DeltaLog,
        *,
        linger_ms: float = 5.0,
        max_bytes: int = 8 * MiB,
        max_deltas: int = 1000,
        max_pending: int = 10_000,
        max_in_flight: int = 8,
    ) -> None:
        if linger_ms < 0 or max_bytes < 1 or max_deltas < 1 or max_pending < 1 or max_in_flight < 1:
            raise ValueError("producer limits must be positive")
        self._log = log
        self.linger = linger_ms / 1000
        self.max_bytes = min(max_bytes, log.config.max_entry_bytes)
        self.max_deltas = max_deltas
        self.max_in_flight = max_in_flight
        self._send: MemoryObjectSendStream[_Submission]
        self._recv: MemoryObjectReceiveStream[_Submission]
        self._send, self._recv = anyio.create_memory_object_stream[_Submission](max_pending)
        self._tg: TaskGroup | None = None
        self._closed = False
        self._submitted = 0
        self._acknowledged = 0
        self._failed = 0
        self._entries = 0
        self._bytes = 0
        self._in_flight = 0
        # Submitters not yet queued (validating, or waiting for room in the
        # queue): the last one out after aclose() closes the queue.
        self._sending = 0

    async def __aenter__(self) -> Producer:
        if self._tg is not None or self._closed:
            raise Closed("a producer can be entered once")
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._collect)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self.aclose()
        assert self._tg is not None
        return await self._tg.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        """Stop taking deltas; what was submitted is still written.

        That includes submitters still validating or waiting for room in the
        queue: the last of them closes the queue once it is in, while the
        collector keeps draining it.
        """
        self._closed = True
        if not self._sending:
            self._send.close()

    async def submit(self, delta: Delta) -> int:
        """Append ``delta`` as part of a shared entry; return the entry's seq."""
        if self._closed or self._tg is None:
            raise Closed("the producer is closed (or was never entered)", log=self._log.config.log)
        self._sending += 1
        try:
            submission = _Submission(await self._log.prepare(delta))
            self._submitted += 1
            await self._send.send(submission)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            raise Closed("the producer stopped before the delta was queued") from exc
        finally:
            self._sending -= 1
            if self._closed and not self._sending:
                self._send.close()
        await submission.done.wait()
        outcome = submission.outcome
        if isinstance(outcome, int):
            return outcome
        if isinstance(outcome, BaseException):
            raise outcome
        raise Closed("the producer stopped before the delta was written")

    def statistics(self) -> ProducerStatistics:
        return ProducerStatistics(
            deltas_submitted=self._submitted,
            deltas_acknowledged=self._acknowledged,
            deltas_failed=self._failed,
            entries_written=self._entries,
            bytes_written=self._bytes,
            queued=self._send.statistics().current_buffer_used,
            in_flight=self._in_flight,
        )

    async def _collect(self) -> None:
        slots = anyio.Semaphore(self.max_in_flight)
        carry: _Submission | None = None
        try:
            async with anyio.create_task_group() as writers, self._recv:
                while True:
                    batch, carry = await self._gather(carry)
                    if not batch:
                        break
                    await slots.acquire()
                    writers.start_soon(self._write, batch, slots)
        finally:
            self._fail_leftovers(carry)

    async def _gather(
        self, carry: _Submission | None
    ) -> tuple[list[_Submission], _Submission | None]:
        """One entry's worth of submissions, and one that did not fit."""
        first = carry or await self._receive(math.inf)
        if first is None:
            return [], None
        batch, size = [first], len(first.delta.data)
        deadline = anyio.current_time() + self.linger
        while len(batch) < self.max_deltas:
            item = await self._receive(deadline - anyio.current_time())
            if item is None:
                break
            if size + len(item.delta.data) > self.max_bytes:
                return batch, item
            batch.append(item)
            size += len(item.delta.data)
        return batch, None

    async def _receive(self, wait: float) -> _Submission | None:
        """The next submission, or None at the deadline or at the end."""
        if wait <= 0:
            try:
                return self._recv.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                return None
        with anyio.move_on_after(wait):
            try:
                return await self._recv.receive()
            except anyio.EndOfStream:
                return None
        return None

    async def _write(self, batch: list[_Submission], slots: anyio.Semaphore) -> None:
        self._in_flight += 1
        try:
            outcomes = await self._log.appender.write([s.delta for s in batch])
            self._entries += 1
            self._bytes += sum(len(s.delta.data) for s in batch)
            for s in batch:
                s.outcome = outcomes.get(s.delta.delta_id)
        except Exception as exc:  # delivered to every submitter as the cause
            for s in batch:
                s.outcome = exc
        finally:
            self._in_flight -= 1
            slots.release()
            for s in batch:
                if isinstance(s.outcome, int):
                    self._acknowledged += 1
                else:
                    self._failed += 1
                s.done.set()

    def _fail_leftovers(self, carry: _Submission | None) -> None:
        leftovers = [carry] if carry is not None else []
        while True:
            try:
                leftovers.append(self._recv.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
        for s in leftovers:
            s.outcome = Closed("the producer stopped before the delta was written")
            s.done.set()
