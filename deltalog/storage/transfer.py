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
- ``UploadWriter`` is the blocking, file-like face of an upload, for code
  that writes in a worker thread (``tarfile``, ``zstandard``).

S3 limits an upload to 10,000 parts; past the first 1,000 parts each
thousand uses parts one ``part_size`` larger than the one before, so 8 MiB
parts reach about 430 GB before the limit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread

from deltalog.errors import InvalidInput

__all__ = [
    "MAX_PARTS",
    "Hasher",
    "Transferred",
    "Upload",
    "UploadWriter",
    "check_part_size",
    "download_ranges",
    "part_size_for",
    "upload_path",
]

MAX_PARTS = 10_000
MAX_PART_SIZE = 5 * 1024**3
_GROWTH_EVERY = 1_000
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


class UploadWriter:
    """A blocking, write-only file object over an ``Upload``, for a worker thread.

    ``write`` buffers ``chunk`` bytes, then hands them to the upload on the
    event loop and waits until it took them (backpressure from the upload's
    parts in flight). Call ``flush`` (still in the thread) after the last
    write. Only for threads started by ``anyio.to_thread.run_sync``.
    """

    def __init__(self, upload: Upload, *, chunk: int = 1 << 20) -> None:
        self._upload = upload
        self._chunk = chunk
        self._buffer = bytearray()
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buffer += data
        self.written += len(data)
        if len(self._buffer) >= self._chunk:
            self._hand_over()
        return len(data)

    def flush(self) -> None:
        if self._buffer:
            self._hand_over()

    def _hand_over(self) -> None:
        data, self._buffer = bytes(self._buffer), bytearray()
        anyio.from_thread.run(self._upload.write, data)

    def tell(self) -> int:
        return self.written

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.flush()

    @property
    def closed(self) -> bool:
        return False


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
