"""``deltalog import chroma``: bring an existing Chroma into the log.

- The **source** is a Chroma persistent directory (``--path``, opened with
  ``chromadb.PersistentClient``) or a server (``--url``, as ``deltalog
  mirror`` reaches one: ``HttpClient``, or ``CloudClient`` with
  ``CHROMA_API_KEY``).
- Collections are read one by one, in id order (every id is listed, sorted,
  then read page by page), and each page is appended as ``Upsert`` deltas
  sized by bytes (``deltalog.migrate.pages``). A page's idempotency key is
  made of the source collection's id (Chroma's UUID, the same in a copy of
  the directory), its name and the page's cursor, so an interrupted import
  resumes and a repeated one writes nothing.
- Metadata that Chroma accepted and the log accepts passes through
  unchanged; a value the log refuses (a list, say) stops the import with a
  ``ValidationError`` naming the record, before that page is written.
- Checked before anything is written (``InvalidInput`` or
  ``ConfigurationError``): a path that is not a Chroma directory, an
  unreachable server, a missing collection, a dimension that clashes with
  the log's schema.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np

from deltalog.entry import Metadata
from deltalog.errors import ConfigurationError, InvalidInput
from deltalog.fold import Record, record_differences
from deltalog.log import DeltaLog
from deltalog.migrate.pages import (
    CollectionPlan,
    ImportPlan,
    ImportResult,
    MiB,
    Page,
    PageWriter,
    check_dims,
    page_key,
    record_bytes,
)
from deltalog.snapshot.server import ChromaTarget, close_http_session, connect_client
from deltalog.snapshot.sink import ChromaSink

__all__ = ["ChromaImporter", "ChromaSource"]


@dataclass(frozen=True, slots=True)
class ChromaSource:
    """A Chroma persistent directory, or a server's database."""

    path: Path | None = None
    target: ChromaTarget | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.target is None):
            raise InvalidInput("give a Chroma directory (--path) or a server (--url), not both")

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else (self.target.url if self.target else "")


def _open(source: ChromaSource) -> Any:
    """A chromadb client on the source (blocking)."""
    if source.target is not None:
        return connect_client(source.target)
    import chromadb
    from chromadb.config import Settings

    path = source.path
    assert path is not None
    if not (path / "chroma.sqlite3").is_file():
        raise InvalidInput(
            f"{path} is not a Chroma directory (no chroma.sqlite3 in it): give the directory "
            "that chromadb.PersistentClient(path=...) was opened on"
        )
    return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))


class ChromaImporter:
    """Imports collections of a Chroma source into a log; open with ``ChromaImporter.open``."""

    def __init__(
        self,
        log: DeltaLog,
        client: Any,
        source: ChromaSource,
        *,
        collections: Sequence[str] | None = None,
        batch: int = 500,
        max_bytes: int = 4 * MiB,
    ) -> None:
        if batch < 1:
            raise InvalidInput("--batch must be at least 1")
        self.log = log
        self.source = source
        self.batch = batch
        self.max_bytes = max_bytes
        self._client = client
        self._wanted = list(collections) if collections else None
        self._limiter = anyio.CapacityLimiter(1)

    @classmethod
    async def open(cls, log: DeltaLog, source: ChromaSource, **options: Any) -> ChromaImporter:
        client = await anyio.to_thread.run_sync(_open, source)
        return cls(log, client, source, **options)

    async def __aenter__(self) -> ChromaImporter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await anyio.to_thread.run_sync(client.close)
            await anyio.to_thread.run_sync(close_http_session, client)

    async def _run(self, func: Callable[..., Any], *args: Any) -> Any:
        if self._client is None:
            raise InvalidInput("the importer is closed")
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter)

    # -- what there is --------------------------------------------------------------

    async def _collections(self) -> list[Any]:
        listed = await self._run(self._client.list_collections)
        by_name = {c.name: c for c in listed}
        names = self._wanted if self._wanted is not None else sorted(by_name)
        missing = [n for n in names if n not in by_name]
        if missing:
            raise InvalidInput(
                f"{self.source.name} has no collection {', '.join(map(repr, missing))}; "
                f"it has {', '.join(sorted(by_name)) or 'none'}"
            )
        return [
            await self._run(lambda n=n: self._client.get_collection(n, embedding_function=None))
            for n in names
        ]

    async def check(self) -> list[tuple[Any, list[str], int | None]]:
        """Collections with their sorted ids and dimension; refuses a dimension clash."""
        found = []
        for collection in await self._collections():
            ids = sorted(await self._run(lambda c=collection: c.get(include=[])["ids"]))
            dim = await self._run(_dimension, collection) if ids else None
            found.append((collection, ids, dim))
        log_dims = await self.log.table.read_dims(self.log.keys.log_id)
        check_dims(log_dims, {c.name: dim for c, _, dim in found})
        return found

    async def plan(self) -> ImportPlan:
        """What an import would write: reads every record (``--dry-run``), writes nothing."""
        plan = ImportPlan()
        for collection, ids, dim in await self.check():
            entry = CollectionPlan(collection.name, collection.name, len(ids), dim)
            async for page in self._pages(collection, ids):
                entry.bytes += sum(record_bytes(r) for r in page.records)
                entry.pages += 1
            plan.collections.append(entry)
        return plan

    # -- the import -----------------------------------------------------------------

    async def run(self, progress: Callable[[ImportResult], None] | None = None) -> ImportResult:
        started = time.monotonic()
        found = await self.check()
        result = ImportResult(
            ImportPlan([CollectionPlan(c.name, c.name, len(ids), dim) for c, ids, dim in found])
        )
        writer = PageWriter(self.log, result, max_bytes=self.max_bytes)
        for (collection, ids, _), entry in zip(found, result.plan.collections, strict=True):
            async for page in self._pages(collection, ids):
                await writer.write([page])
                entry.pages += 1
                entry.bytes += sum(record_bytes(r) for r in page.records)
                result.seconds = time.monotonic() - started
                if progress is not None:
                    progress(result)
        result.seconds = time.monotonic() - started
        return result

    async def _pages(self, collection: Any, ids: list[str]) -> Any:
        source = str(collection.id)
        for start in range(0, len(ids), self.batch):
            chunk = ids[start : start + self.batch]
            records = await self._run(_read, collection, chunk)
            yield Page(collection.name, page_key("chroma", source, collection.name, chunk), records)

    # -- verify -----------------------------------------------------------------------

    async def verify(
        self, committed: ChromaSink, *, sample: int = 200, seed: int = 0
    ) -> tuple[dict[str, tuple[int, int]], list[str]]:
        """Counts per collection (source, committed) and the differences found.

        A sample of ``sample`` ids per collection is compared bit-exact
        (vectors, documents, metadata).
        """
        counts = await committed.counts()
        rng = np.random.default_rng(seed)
        seen: dict[str, tuple[int, int]] = {}
        differences: list[str] = []
        for collection, ids, _ in await self.check():
            name = collection.name
            seen[name] = (len(ids), counts.get(name, 0))
            if seen[name][0] != seen[name][1]:
                differences.append(
                    f"{name}: {seen[name][0]} in the source, {seen[name][1]} in the log"
                )
            picked = sorted(rng.choice(ids, min(sample, len(ids)), replace=False)) if ids else []
            differences += await _compare(
                name, await self._run(_read, collection, picked), committed
            )
        return seen, differences


async def _compare(name: str, expected: list[Record], committed: ChromaSink) -> list[str]:
    got = {r.id: r for r in await committed.fetch(name, [r.id for r in expected])}
    out = []
    for record in expected:
        other = got.get(record.id)
        if other is None:
            out.append(f"{name}/{record.id}: missing from the log")
        else:
            out += [f"{name}/{record.id}: {d}" for d in record_differences(record, other)]
    return out


def _dimension(collection: Any) -> int:
    got = collection.get(limit=1, include=["embeddings"])
    return int(np.asarray(got["embeddings"][0]).shape[0])


def _read(collection: Any, ids: list[str]) -> list[Record]:
    """The records of ``ids``, in that order (blocking)."""
    if not ids:
        return []
    got = collection.get(ids=ids, include=["embeddings", "documents", "metadatas"])
    # Chroma stores float32 and returns float64: the conversion back is exact.
    vectors = np.asarray(got["embeddings"], dtype=np.float64).astype(np.float32)
    documents = got["documents"] or [None] * len(got["ids"])
    metadatas = got["metadatas"] or [None] * len(got["ids"])
    by_id = {
        id_: Record(id_, vectors[i], documents[i], _metadata(collection.name, id_, metadatas[i]))
        for i, id_ in enumerate(got["ids"])
    }
    return [by_id[id_] for id_ in ids if id_ in by_id]


def _metadata(collection: str, id_: str, raw: Mapping[str, Any] | None) -> Metadata | None:
    out: Metadata = {}
    for key, value in (raw or {}).items():
        if value is None:
            continue  # Chroma reports keys it does not hold as None
        if not isinstance(value, str | int | float | bool):
            raise ConfigurationError(
                f"{collection}/{id_}: metadata {key!r} is a {type(value).__name__}; the log "
                "takes str, int, float and bool values: change it in the source first"
            )
        out[key] = value
    return out or None
