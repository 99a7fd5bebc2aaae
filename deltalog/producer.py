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

When the ``async with`` block is left with an exception or a cancellation,
the producer **stops**: nothing new is written, and every submitter still
waiting gets an answer at once. Deltas still queued or being gathered were
certainly not written: ``Closed``. Entries being written are cancelled and
settled (``Appender.settle``, a shielded read-back of at most
``SETTLE_SECONDS``): their submitters get the seq if the entry is durable,
``Closed`` if it certainly is not, and otherwise
``Unavailable(ambiguous=True)``, which says that a retry needs an
idempotency key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from deltalog.append import Attempt, EncodedDelta, Outcome, Repeat
from deltalog.entry import Delta
from deltalog.errors import Closed, Unavailable

if TYPE_CHECKING:
    from deltalog.log import DeltaLog

__all__ = ["SETTLE_SECONDS", "Producer", "ProducerStatistics"]

MiB = 1024 * 1024
SETTLE_SECONDS = 10.0
"""How long a stopping producer may spend reading back an entry it was writing."""


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


def _wrote(outcome: Outcome | BaseException | None) -> bool:
    """Whether a delta was written by this producer's entry (not a repeat, not refused)."""
    return isinstance(outcome, int) and not isinstance(outcome, Repeat)


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
        # Taken off the queue, not yet handed to a writer.
        self._batch: list[_Submission] = []
        self._carry: _Submission | None = None

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
        if not isinstance(exc, Exception):  # a clean exit (flush) or a cancellation
            return await self._tg.__aexit__(exc_type, exc, tb)
        # The block failed: stop, and let its own error propagate as itself
        # rather than wrapped in the task group's ExceptionGroup.
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        return None

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
        raise Unavailable(  # every path sets an outcome; never claim what is not known
            "the producer stopped without an answer for this delta: it may or may not be "
            "in the log; retry it only with an idempotency key",
            ambiguous=True,
            log=self._log.config.log,
        )

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
        try:
            async with anyio.create_task_group() as writers:
                while await self._gather():
                    await slots.acquire()
                    await writers.start(self._write, self._batch, slots)
                    self._batch = []
        finally:
            self._fail_unwritten()

    async def _gather(self) -> bool:
        """Fill ``_batch`` with one entry's worth; False at the end of the queue."""
        first, self._carry = self._carry or await self._receive(math.inf), None
        if first is None:
            return False
        self._batch = [first]
        size = len(first.delta.data)
        deadline = anyio.current_time() + self.linger
        while len(self._batch) < self.max_deltas:
            item = await self._receive(deadline - anyio.current_time())
            if item is None:
                break
            if size + len(item.delta.data) > self.max_bytes:
                self._carry = item
                break
            self._batch.append(item)
            size += len(item.delta.data)
        return True

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

    async def _write(
        self,
        batch: list[_Submission],
        slots: anyio.Semaphore,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Write one entry; once started, every submitter in ``batch`` gets an answer."""
        self._in_flight += 1
        attempt = Attempt()
        answered = False
        try:
            task_status.started()
            outcomes = await self._log.appender.write([s.delta for s in batch], attempt)
            for s in batch:
                s.outcome = outcomes.get(s.delta.delta_id)
            written = [s for s in batch if _wrote(s.outcome)]
            self._entries += bool(written)  # repeats and conflicts alone write nothing
            self._bytes += sum(len(s.delta.data) for s in written)
            answered = True
        except Exception as exc:  # delivered to every submitter as the cause
            for s in batch:
                s.outcome = exc
            answered = True
        finally:
            self._in_flight -= 1
            slots.release()
            if not answered:  # cancelled: the producer is stopping
                settled = await self._log.appender.settle(attempt, within=SETTLE_SECONDS)
                for s in batch:
                    s.outcome = settled.get(s.delta.delta_id)
            self._resolve(batch)

    def _resolve(self, batch: list[_Submission]) -> None:
        for s in batch:
            if s.done.is_set():
                continue
            if isinstance(s.outcome, int):
                self._acknowledged += 1
            else:
                self._failed += 1
            s.done.set()

    def _fail_unwritten(self) -> None:
        """Answer every submission no writer took: none of them was written."""
        unwritten = [*self._batch, *([self._carry] if self._carry else [])]
        self._batch, self._carry = [], None
        while True:
            try:
                unwritten.append(self._recv.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
        self._recv.close()
        unwritten = [s for s in unwritten if not s.done.is_set()]  # a writer answered
        for s in unwritten:
            s.outcome = Closed(
                "the producer stopped before the delta was written; it is not in the log, "
                "so retrying it writes it once",
                log=self._log.config.log,
            )
        self._resolve(unwritten)
