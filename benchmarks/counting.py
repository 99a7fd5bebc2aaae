"""``CountingStore``: an object store that counts the bytes written and read through it.

It wraps the real store (``S3Store`` on the embedded endpoint) and is handed
to ``DeltaLog`` or ``Compactor`` through their ``store=`` seam, so what it
counts is exactly what deltalog sent: entries and seals (``put_if_absent``),
snapshot archives (the streaming ``upload``, part by part) and downloads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from deltalog.storage.store import ObjectInfo, ObjectStore, StoredObject
from deltalog.storage.transfer import Transferred, Upload

__all__ = ["CountingStore", "StoreCounts"]


@dataclass(frozen=True, slots=True)
class StoreCounts:
    """Bytes through the store since it was made (or since ``reset``)."""

    bytes_written: int
    bytes_read: int
    puts: int
    uploads: int


class _CountingUpload:
    def __init__(self, inner: Upload, store: CountingStore) -> None:
        self._inner = inner
        self._store = store

    async def write(self, data: bytes) -> None:
        await self._inner.write(data)
        self._store._written += len(data)

    async def complete(self) -> Transferred:
        return await self._inner.complete()


class CountingStore:
    """Delegates every call to ``inner``; ``statistics()`` says how many bytes went through."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self._written = self._read = self._puts = self._uploads = 0

    def statistics(self) -> StoreCounts:
        return StoreCounts(self._written, self._read, self._puts, self._uploads)

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        self._puts += 1
        self._written += len(data)
        return await self.inner.put_if_absent(key, data)

    async def get(self, key: str) -> StoredObject | None:
        got = await self.inner.get(key)
        if got is not None:
            self._read += len(got.data)
        return got

    def list_after(
        self, prefix: str, start_after: str = "", *, page_size: int = 1000
    ) -> AsyncIterator[ObjectInfo]:
        return self.inner.list_after(prefix, start_after, page_size=page_size)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def clock(self, prefix: str) -> float:
        return await self.inner.clock(prefix)

    @asynccontextmanager
    async def upload(self, key: str) -> AsyncIterator[Upload]:
        self._uploads += 1
        async with self.inner.upload(key) as upload:
            yield _CountingUpload(upload, self)

    async def upload_file(self, key: str, path: Path) -> bool:
        self._uploads += 1
        self._written += (await anyio.Path(path).stat()).st_size
        return await self.inner.upload_file(key, path)

    async def download_file(self, key: str, path: Path) -> Transferred | None:
        got = await self.inner.download_file(key, path)
        if got is not None:
            self._read += got.size
        return got

    async def aclose(self) -> None:
        await self.inner.aclose()
