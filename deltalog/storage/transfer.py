"""Streaming transfers of large objects (snapshot archives) through the object store seam.

- An **upload** takes bytes as they are produced (``write``) and sends them
  in **parts** of ``part_size`` bytes, several at a time, so no more than
  ``(concurrency + 1) * part_size`` bytes are ever held, whatever the
  object's size. ``complete`` creates the object only if its key is free
  (put-if-absent, as ``ObjectStore.put_if_absent``), and says what the
  object's sha256 would be either way; leaving the upload
  without completing it aborts it and nothing is created.
- A **download** fetches an object in ranges of ``part_size`` bytes, several
  at a time, and writes them in order to a local file while computing the
  sha256 of the stream: no second pass over the file to check it.
- ``Transferred`` says what went through: size, sha256 and how many parts.
- ``upload_from_thread`` streams what a worker thread writes (``tarfile``,
  ``zstandard``) into an upload, through a small bounded queue.

S3 limits an upload to 10,000 parts; past the first 1,000 parts each
thousand uses parts one ``part_size`` larger than the one before, so 8 MiB
parts reach about 430 GB before the limit.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from deltalog.errors import InvalidInput

__all__ = [
    "MAX_PARTS",
    "Hasher",
    "Transferred",
    "Upload",
    "ThreadWriter",
    "UploadAborted",
    "check_part_size",
    "download_ranges",
    "part_size_for",
    "upload_from_thread",
    "upload_path",
]

T = TypeVar("T")

MAX_PARTS = 10_000
MAX_PART_SIZE = 5 * 1024**3
_GROWTH_EVERY = 1_000
_POLL = 0.1
"""Seconds a worker thread waits for room before it checks whether the upload was abandoned."""
_HASH_IN_THREAD = 256 * 1024
"""Chunks at least this large are hashed in a worker thread (hashlib releases the GIL)."""


@dataclass(frozen=True, slots=True)
class Transferred:
    """What an upload or a download moved."""

    key: str
    size: int
    sha256: str
    """Hex digest of the object's bytes, computed while they streamed."""
    parts: int
    """Parts uploaded or ranges fetched (1 for an object sent in one request)."""
    created: bool = True
    """For an upload: False when the key existed, so nothing was written."""


class Upload(Protocol):
    """A streaming upload to one key; see the module docstring."""

    async def write(self, data: bytes) -> None:
        """Add bytes; waits while ``concurrency`` parts are already in flight."""
        ...

    async def complete(self) -> Transferred:
        """Create the object if its key is free; ``created`` is False (nothing written) if not."""
        ...


def part_size_for(number: int, part_size: int) -> int:
    """The size of part ``number`` (from 1): grows every 1,000 parts to stay under 10,000."""
    return part_size * (1 + (number - 1) // _GROWTH_EVERY)


class Hasher:
    """sha256 and size of a stream, fed in order; large chunks hashed off the event loop."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self.size = 0

    async def update(self, data: bytes) -> None:
        self.size += len(data)
        if len(data) >= _HASH_IN_THREAD:
            await anyio.to_thread.run_sync(self._digest.update, data)
        else:
            self._digest.update(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def check_part_size(part_size: int, concurrency: int) -> None:
    """Refuse a part size below one byte or above S3's 5 GiB, or no concurrency."""
    if not 1 <= part_size <= MAX_PART_SIZE:
        raise InvalidInput(f"part_size must be 1 byte to 5 GiB, not {part_size}")
    if concurrency < 1:
        raise InvalidInput(f"transfer concurrency must be at least 1, not {concurrency}")


async def upload_path(upload: Upload, path: Path, chunk: int) -> Transferred:
    """Stream a local file into ``upload`` and complete it."""
    async with await anyio.open_file(path, "rb") as f:
        while data := await f.read(chunk):
            await upload.write(data)
    return await upload.complete()


class ThreadWriter:
    """The blocking, write-only file a worker thread writes to in ``upload_from_thread``.

    ``write`` buffers ``chunk`` bytes, then queues them for the event loop,
    waiting while ``depth`` chunks are queued already (backpressure from the
    upload). It never waits on the event loop itself, so a cancelled upload
    cannot leave it stuck: once the loop side gives up, the next ``write``
    raises ``UploadAborted``.
    """

    def __init__(self, send: MemoryObjectSendStream[bytes], *, chunk: int, depth: int) -> None:
        self._send = send
        self._chunk = chunk
        self._slots = threading.BoundedSemaphore(depth)
        self._buffer = bytearray()
        self._aborted = threading.Event()
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buffer += data
        self.written += len(data)
        if len(self._buffer) >= self._chunk:
            self._queue()
        return len(data)

    def flush(self) -> None:
        if self._buffer:
            self._queue()

    def writable(self) -> bool:
        return True

    def _queue(self) -> None:
        data, self._buffer = bytes(self._buffer), bytearray()
        while not self._slots.acquire(timeout=_POLL):
            self._check()
        self._check()
        anyio.from_thread.run_sync(self._send.send_nowait, data)

    def _check(self) -> None:
        if self._aborted.is_set():
            raise UploadAborted("the upload this archive was streaming to was abandoned")

    def taken(self) -> None:
        """The event loop took a chunk: room for one more."""
        self._slots.release()

    def abort(self) -> None:
        self._aborted.set()


class UploadAborted(Exception):
    """Raised in the worker thread of ``upload_from_thread`` once the upload was abandoned."""


async def upload_from_thread(
    upload: Upload,
    produce: Callable[[ThreadWriter], T],
    *,
    chunk: int = 1 << 20,
    depth: int = 4,
) -> T:
    """Run ``produce(writer)`` in a worker thread; what it writes streams into ``upload``.

    At most ``depth`` chunks of ``chunk`` bytes wait between the thread and
    the upload. Returns what ``produce`` returned, once all it wrote went to
    ``upload`` (the caller completes it); when ``produce`` raises, its
    exception is raised; when the caller is cancelled, the thread stops at
    its next write.
    """
    send, receive = anyio.create_memory_object_stream[bytes](depth + 1)
    writer = ThreadWriter(send, chunk=chunk, depth=depth)
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(produce(writer))
            writer.flush()
        except BaseException as exc:  # handed to the event loop side below
            failure.append(exc)
        finally:
            anyio.from_thread.run_sync(send.close)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, run)
            try:
                async with receive:
                    async for data in receive:
                        writer.taken()
                        await upload.write(data)
            except Exception as exc:  # raised below, after the thread stopped: not in a group
                failure.insert(0, exc)
            finally:
                writer.abort()  # the thread stops at its next write, if it is still writing
    finally:
        send.close()  # when cancelled before the thread started, it never closes it itself
    if failure:
        raise failure[0]
    return outcome[0]


FetchRange = Callable[[int, int], Awaitable[bytes]]
"""Fetch bytes ``[start, end)`` of the object being downloaded."""


async def download_ranges(
    key: str,
    first: bytes,
    total: int,
    fetch: FetchRange,
    out: Callable[[bytes], Awaitable[object]],
    *,
    part_size: int,
    concurrency: int,
) -> Transferred:
    """Write an object with ``out`` from its first range and ``fetch`` for the rest.

    Up to ``concurrency`` ranges are fetched at once; they are written and
    hashed strictly in order, so at most ``concurrency`` ranges are held. The
    first failure stops the download and is raised as it is.
    """
    ranges = [(s, min(total, s + part_size)) for s in range(len(first), total, part_size)]
    hasher = Hasher()
    await _write(out, hasher, first)
    fetched: dict[int, bytes | Exception] = {}
    ready = {start: anyio.Event() for start, _ in ranges}
    slots = anyio.Semaphore(concurrency)
    failure: Exception | None = None

    async def get(start: int, end: int) -> None:
        try:
            fetched[start] = await fetch(start, end)
        except Exception as exc:  # handed to the writer, which stops the download
            fetched[start] = exc
        ready[start].set()

    async def schedule(tg: anyio.abc.TaskGroup) -> None:
        for start, end in ranges:
            await slots.acquire()
            tg.start_soon(get, start, end)

    async with anyio.create_task_group() as tg:
        tg.start_soon(schedule, tg)
        for start, _end in ranges:
            await ready[start].wait()
            data = fetched.pop(start)
            if isinstance(data, Exception):
                failure = data
                tg.cancel_scope.cancel()
                break
            await _write(out, hasher, data)
            slots.release()
    if failure is not None:
        raise failure
    return Transferred(key, total, hasher.hexdigest(), 1 + len(ranges))


async def _write(out: Callable[[bytes], Awaitable[object]], hasher: Hasher, data: bytes) -> None:
    await hasher.update(data)
    await out(data)
