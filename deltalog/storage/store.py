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
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio

__all__ = ["MemoryStore", "ObjectInfo", "ObjectStore", "StoredObject"]


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

    async def upload_file(self, key: str, path: Path) -> bool:
        """``put_if_absent`` with the contents of a local file."""
        ...

    async def download_file(self, key: str, path: Path) -> bool:
        """Write an object to a local file; False if the key is missing."""
        ...

    async def aclose(self) -> None: ...


class MemoryStore:
    """An object store in a dict: for tests, examples and single-process use."""

    def __init__(self) -> None:
        self._objects: dict[str, StoredObject] = {}
        self.requests = 0

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

    async def upload_file(self, key: str, path: Path) -> bool:
        return await self.put_if_absent(key, await anyio.Path(path).read_bytes())

    async def download_file(self, key: str, path: Path) -> bool:
        obj = await self.get(key)
        if obj is None:
            return False
        await anyio.Path(path).write_bytes(obj.data)
        return True

    async def aclose(self) -> None:
        return None

    def overwrite(self, key: str, data: bytes) -> None:
        """Replace an object's bytes behind the protocol's back (fault tests)."""
        self._objects[key] = StoredObject(key, data, time.time())
