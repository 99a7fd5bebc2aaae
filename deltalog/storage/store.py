"""The object store seam: where entries and snapshots live.

``ObjectStore`` is the whole contract deltalog needs from S3. Adapters:
``S3Store`` (``deltalog.s3``, any S3-compatible endpoint with conditional
writes) and ``MemoryStore`` here, a real in-memory adapter that honours the
same contract and runs the same contract tests.

Contract:

- ``put_if_absent`` creates an object only if the key is free and returns
  False if it exists (HTTP 412). A failure that leaves it unknown whether
  the write happened raises ``Unavailable(ambiguous=True)``.
- ``get`` returns None for a missing key.
- ``list_after`` yields keys under a prefix in lexicographic order,
  strictly after ``start_after``.
- ``delete`` of a missing key is not an error.
- ``upload`` streams an object of any size in parts (``deltalog.storage.transfer``):
  nothing is created until ``complete``, which is put-if-absent; leaving the
  context without completing aborts it. ``download_file`` fetches ranges in
  parallel and returns the sha256 of what it wrote (None for a missing key).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio

from deltalog.errors import InvalidInput, MissingObject
from deltalog.storage.transfer import (
    Hasher,
    Transferred,
    Upload,
    check_part_size,
    download_ranges,
    part_size_for,
    upload_path,
)

__all__ = ["MemoryStore", "ObjectInfo", "ObjectStore", "StoredObject"]

DEFAULT_PART_SIZE = 8 * 1024 * 1024
DEFAULT_CONCURRENCY = 4


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: float
    """Seconds since the epoch, as the store's clock saw the write."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    data: bytes
    last_modified: float


class ObjectStore(Protocol):
    """The operations deltalog performs on an object store."""

    async def put_if_absent(self, key: str, data: bytes) -> bool: ...

    async def get(self, key: str) -> StoredObject | None: ...

    def list_after(
        self, prefix: str, start_after: str = "", *, page_size: int = 1000
    ) -> AsyncIterator[ObjectInfo]: ...

    async def delete(self, key: str) -> None: ...

    async def clock(self, prefix: str) -> float:
        """The store's own time now (seconds since the epoch), the clock of its
        ``last_modified``; read from an answer to a listing of ``prefix`` (one
        the caller may list), so no local clock is trusted."""
        ...

    def upload(self, key: str) -> AbstractAsyncContextManager[Upload]:
        """A streaming, put-if-absent upload to ``key``; see the module docstring."""
        ...

    async def upload_file(self, key: str, path: Path) -> bool:
        """``put_if_absent`` with the contents of a local file, streamed."""
        ...

    async def download_file(self, key: str, path: Path) -> Transferred | None:
        """Write an object to a local file, with its sha256; None if the key is missing.

        ``MissingObject`` if it is deleted while it downloads (after the first range).
        """
        ...

    async def aclose(self) -> None: ...


class MemoryStore:
    """An object store in a dict: for tests, examples and single-process use."""

    def __init__(self, *, part_size: int = DEFAULT_PART_SIZE) -> None:
        check_part_size(part_size, 1)
        self._objects: dict[str, StoredObject] = {}
        self.part_size = part_size
        self.requests = 0
        self.on_range: Callable[[str, int], Awaitable[None]] | None = None
        """Awaited before each range of a download after the first (fault tests)."""

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        self.requests += 1
        if key in self._objects:
            return False
        self._objects[key] = StoredObject(key, bytes(data), time.time())
        return True

    async def get(self, key: str) -> StoredObject | None:
        self.requests += 1
        return self._objects.get(key)

    async def list_after(
        self, prefix: str, start_after: str = "", *, page_size: int = 1000
    ) -> AsyncIterator[ObjectInfo]:
        self.requests += 1
        for key in sorted(k for k in self._objects if k.startswith(prefix) and k > start_after):
            obj = self._objects.get(key)
            if obj is not None:
                yield ObjectInfo(key, len(obj.data), obj.last_modified)

    async def delete(self, key: str) -> None:
        self.requests += 1
        self._objects.pop(key, None)

    async def clock(self, prefix: str) -> float:
        self.requests += 1
        return time.time()  # the clock ``put_if_absent`` stamps objects with

    @asynccontextmanager
    async def upload(self, key: str) -> AsyncIterator[Upload]:
        yield _MemoryUpload(self, key)

    async def upload_file(self, key: str, path: Path) -> bool:
        async with self.upload(key) as upload:
            return (await upload_path(upload, path, self.part_size)).created

    async def download_file(self, key: str, path: Path) -> Transferred | None:
        obj = await self.get(key)
        if obj is None:
            return None
        data, size = obj.data, self.part_size

        async def fetch(start: int, end: int) -> bytes:
            if self.on_range is not None:
                await self.on_range(key, start)
            if self._objects.get(key) is not obj:  # S3's ranges are pinned to the ETag
                raise MissingObject("the object vanished during the download", key=key)
            return data[start:end]

        async with await anyio.open_file(path, "wb") as out:
            return await download_ranges(
                key, data[:size], len(data), fetch, out.write, part_size=size, concurrency=2
            )

    async def aclose(self) -> None:
        return None

    def overwrite(self, key: str, data: bytes) -> None:
        """Replace an object's bytes behind the protocol's back (fault tests)."""
        self._objects[key] = StoredObject(key, data, time.time())


class _MemoryUpload:
    """An upload into a ``MemoryStore``: parts kept until ``complete`` joins them."""

    def __init__(self, store: MemoryStore, key: str) -> None:
        self._store = store
        self._key = key
        self._parts: list[bytes] = []
        self._buffer = bytearray()
        self._hasher = Hasher()
        self._done = False

    async def write(self, data: bytes) -> None:
        if self._done:
            raise InvalidInput(f"the upload to {self._key} is already complete", key=self._key)
        await self._hasher.update(data)
        self._buffer += data
        while len(self._buffer) >= (
            size := part_size_for(len(self._parts) + 1, self._store.part_size)
        ):
            self._parts.append(bytes(self._buffer[:size]))
            del self._buffer[:size]

    async def complete(self) -> Transferred:
        if self._done:
            raise InvalidInput(f"the upload to {self._key} is already complete", key=self._key)
        self._done = True
        if self._buffer or not self._parts:
            self._parts.append(bytes(self._buffer))
        created = await self._store.put_if_absent(self._key, b"".join(self._parts))
        size, digest = self._hasher.size, self._hasher.hexdigest()
        return Transferred(self._key, size, digest, len(self._parts), created)
