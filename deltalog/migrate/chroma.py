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
- ``collections`` picks and maps them: ``SRC`` or ``SRC=DST`` (a source
  collection into a log collection of another name); all of them by
  default. A page's key names the destination when it differs, so one
  source may go to two collections.
- Metadata that Chroma accepted and the log accepts passes through
  unchanged, list values included. A record the log refuses (metadata it
  does not take, a record too large for one delta) is ``Refused``:
  ``plan`` (``--dry-run``) lists every one, and ``run`` stops before the
  page holding one is written, with an ``InvalidInput`` that lists the
  page's.
- An empty source collection holds nothing to import: the log creates a
  collection with its first record, so it is skipped (``skipped``), and
  ``verify`` says so rather than comparing nothing.
- Checked before anything is written (``InvalidInput`` or
  ``ConfigurationError``): a path that is not a Chroma directory, an
  unreachable server, a missing collection (the error lists those there
  are), a dimension that clashes with the log's schema.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.to_thread
import numpy as np

from deltalog.entry import Metadata
from deltalog.errors import InvalidInput, ValidationError
from deltalog.fold import Record, record_differences
from deltalog.log import DeltaLog
from deltalog.migrate.pages import (
    CollectionPlan,
    ImportPlan,
    ImportResult,
    MiB,
    Page,
    PageWriter,
    Refused,
    SourceMap,
    check_dims,
    page_key,
    record_bytes,
    refusal_error,
)
from deltalog.snapshot.server import ChromaTarget, close_http_session, connect_client
from deltalog.snapshot.sink import ChromaSink
from deltalog.validate import validate_metadata

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
        collections: Sequence[str | SourceMap] | None = None,
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
        self._wanted = (
            [c if isinstance(c, SourceMap) else SourceMap.parse(c) for c in collections]
            if collections
            else None
        )
        if self._wanted:
            SourceMap.check_distinct(self._wanted)
        self._limiter = anyio.CapacityLimiter(1)
        self.skipped: list[str] = []
        """Source collections left out because they are empty (set by ``check``)."""

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

    async def _collections(self) -> list[tuple[Any, str]]:
        """The source collections wanted, each with the log collection it goes to."""
        listed = await self._run(self._client.list_collections)
        by_name = {c.name: c for c in listed}
        maps = self._wanted if self._wanted is not None else [SourceMap(n, n) for n in by_name]
        missing = [m.source for m in maps if m.source not in by_name]
        if missing:
            raise InvalidInput(
                f"{self.source.name} has no collection {', '.join(map(repr, missing))}; "
                f"it has {', '.join(sorted(by_name)) or 'none'}"
            )
        return [
            (
                await self._run(
                    lambda n=m.source: self._client.get_collection(n, embedding_function=None)
                ),
                m.collection,
            )
            for m in sorted(maps, key=lambda m: m.source)
        ]

    async def check(self) -> list[tuple[Any, str, list[str], int | None]]:
        """Source collections with their destination, sorted ids and dimension; refuses a
        dimension clash. Empty ones are left out (``skipped``)."""
        found = []
        self.skipped = []
        for collection, destination in await self._collections():
            ids = sorted(await self._run(lambda c=collection: c.get(include=[])["ids"]))
            if not ids:
                self.skipped.append(collection.name)
                continue
            dim = await self._run(_dimension, collection)
            found.append((collection, destination, ids, dim))
        log_dims = await self.log.table.read_dims(self.log.keys.log_id)
        dims = {dest: dim for _, dest, _, dim in found}
        check_dims(log_dims, dims, remap="--collection SRC=DST")
        return found

    async def plan(self) -> tuple[ImportPlan, list[Refused]]:
        """What an import would write, and every record the log would refuse: reads every
        record (``--dry-run``), writes nothing."""
        plan = ImportPlan()
        refused: list[Refused] = []
        for collection, destination, ids, dim in await self.check():
            entry = CollectionPlan(collection.name, destination, len(ids), dim)
            async for page, rejected in self._pages(collection, destination, ids):
                entry.bytes += sum(record_bytes(r) for r in page.records)
                entry.pages += 1
                refused += rejected
            plan.collections.append(entry)
        return plan, refused

    # -- the import -----------------------------------------------------------------

    async def run(self, progress: Callable[[ImportResult], None] | None = None) -> ImportResult:
        started = time.monotonic()
        found = await self.check()
        result = ImportResult(
            ImportPlan([CollectionPlan(c.name, dest, len(ids), dim) for c, dest, ids, dim in found])
        )
        writer = PageWriter(self.log, result, max_bytes=self.max_bytes)
        for (collection, destination, ids, _), entry in zip(
            found, result.plan.collections, strict=True
        ):
            async for page, rejected in self._pages(collection, destination, ids):
                if rejected:
                    raise refusal_error(
                        rejected,
                        "records the log refuses, nothing of their page written (change them "
                        "in the source; `--dry-run` lists every one)",
                    )
                await writer.write([page])
                entry.pages += 1
                entry.bytes += sum(record_bytes(r) for r in page.records)
                result.seconds = time.monotonic() - started
                if progress is not None:
                    progress(result)
        result.seconds = time.monotonic() - started
        return result

    async def _pages(
        self, collection: Any, destination: str, ids: list[str]
    ) -> AsyncIterator[tuple[Page, list[Refused]]]:
        source = str(collection.id)
        # The key of an import into a collection of the same name stays what it was.
        name = collection.name
        if destination != name:
            name = f"{name}={destination}"
        for start in range(0, len(ids), self.batch):
            chunk = ids[start : start + self.batch]
            limit = self.log.config.max_delta_bytes
            records, refused = await self._run(_read, collection, chunk, limit)
            yield Page(destination, page_key("chroma", source, name, chunk), records), refused

    # -- verify -----------------------------------------------------------------------

    async def verify(
        self, committed: ChromaSink, *, sample: int = 200, seed: int = 0
    ) -> tuple[dict[str, tuple[int, int]], list[str]]:
        """Counts per collection (source, committed) and the differences found.

        A sample of ``sample`` ids per collection is compared bit-exact
        (vectors, documents, metadata). Empty source collections are not
        compared (``skipped``) unless the log holds records under their name.
        """
        counts = await committed.counts()
        rng = np.random.default_rng(seed)
        seen: dict[str, tuple[int, int]] = {}
        differences: list[str] = []
        found = await self.check()
        for name in self.skipped:
            held = counts.get(self._destination(name), 0)
            if held:
                seen[name] = (0, held)
                differences.append(f"{name}: empty in the source, {held} in the log")
        for collection, destination, ids, _ in found:
            name = collection.name
            seen[name] = (len(ids), counts.get(destination, 0))
            if seen[name][0] != seen[name][1]:
                differences.append(
                    f"{name}: {seen[name][0]} in the source, {seen[name][1]} in the log"
                    + (f" ({destination})" if destination != name else "")
                )
            picked = sorted(rng.choice(ids, min(sample, len(ids)), replace=False))
            expected, _ = await self._run(_read, collection, picked, None)
            differences += await _compare(name, destination, expected, committed)
        return seen, differences

    def _destination(self, source: str) -> str:
        maps = {m.source: m.collection for m in self._wanted or []}
        return maps.get(source, source)


async def _compare(
    name: str, destination: str, expected: list[Record], committed: ChromaSink
) -> list[str]:
    got = {r.id: r for r in await committed.fetch(destination, [r.id for r in expected])}
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


def _read(collection: Any, ids: list[str], limit: int | None) -> tuple[list[Record], list[Refused]]:
    """The records of ``ids``, in that order, and those the log refuses (blocking): metadata
    the log does not take, or a record over ``limit`` bytes (the log's ``max_delta_bytes``:
    it could not be one delta)."""
    if not ids:
        return [], []
    got = collection.get(ids=ids, include=["embeddings", "documents", "metadatas"])
    # Chroma stores float32 and returns float64: the conversion back is exact.
    vectors = np.asarray(got["embeddings"], dtype=np.float64).astype(np.float32)
    documents = got["documents"] or [None] * len(got["ids"])
    metadatas = got["metadatas"] or [None] * len(got["ids"])
    by_id: dict[str, Record] = {}
    refused: list[Refused] = []
    for i, id_ in enumerate(got["ids"]):
        record = Record(id_, vectors[i], documents[i], _metadata(metadatas[i]))
        why = _refusal(record.metadata)
        size = record_bytes(record)
        if not why and limit is not None and size > limit:
            why = f"about {size:,} bytes, over the log's max_delta_bytes ({limit:,}): not one delta"
        if why:
            refused.append(Refused(collection.name, id_, why))
        else:
            by_id[id_] = record
    return [by_id[id_] for id_ in ids if id_ in by_id], refused


def _metadata(raw: Mapping[str, Any] | None) -> Metadata | None:
    """Chroma's metadata as the log would hold it (keys Chroma reports as None dropped)."""
    out = {key: value for key, value in (raw or {}).items() if value is not None}
    return cast("Metadata", out) or None


def _refusal(metadata: Metadata | None) -> str:
    """Why the log would refuse this metadata ("" if it takes it)."""
    if metadata is None:
        return ""
    try:
        validate_metadata(metadata)
    except ValidationError as exc:
        return f"{exc.field}: {exc.reason}"
    return ""
