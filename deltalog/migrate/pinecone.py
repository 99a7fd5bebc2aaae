"""``deltalog import pinecone``: bring Pinecone namespaces into the log's collections.

- The client is the official ``pinecone`` SDK (``pip install
  'deltalog[pinecone]'``), its API key from ``PINECONE_API_KEY``. With
  ``--host`` the index's data plane is reached directly; otherwise the SDK
  asks the control plane for the index's host.
- Per namespace: the ids are listed page by page (``list_paginated`` and its
  pagination tokens), each page's vectors fetched in one request, mapped,
  and appended as one ``Upsert`` delta whose idempotency key is made of the
  index, the namespace and the page (its first and last id and size). A
  page already in the log is not fetched again: an interrupted import
  resumes, a repeated one writes nothing.

**The metadata mapping** (Pinecone metadata to Chroma's, which the log
keeps): string, integer, float and boolean values and lists of strings
pass unchanged; the ``--document-field`` value (default ``text``), a
string, becomes the record's document and leaves the metadata; an empty
metadata becomes none. Refused, never dropped: empty lists, nulls and
nested objects, a non-string document field, non-finite numbers, keys that
are empty or start with ``#``, and sparse values (the log's own metadata
rules, ``deltalog.validate``). A page with a refused record is not written; the error lists every
refusal of the page (``--dry-run`` lists those of the whole index).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import numpy as np

from deltalog.entry import Metadata
from deltalog.errors import (
    ConfigurationError,
    DeltalogError,
    InvalidInput,
    Unavailable,
    ValidationError,
)
from deltalog.fold import Record
from deltalog.log import DeltaLog
from deltalog.migrate.pages import (
    CollectionPlan,
    ImportPlan,
    ImportResult,
    Page,
    PageWriter,
    Refused,
    check_dims,
    durable_claims,
    page_key,
    record_bytes,
    refusal_error,
)
from deltalog.validate import validate_metadata

__all__ = ["API_KEY_VARIABLE", "NamespaceMap", "PineconeImporter", "Refused", "map_vector"]

API_KEY_VARIABLE = "PINECONE_API_KEY"
DEFAULT_NAMESPACE = "__default__"
_PAGE_LIMIT = 100
_ONE_PART = 1 << 62
"""Pages are never split (a page of 100 vectors is far under the delta limit): one key each."""


@dataclass(frozen=True, slots=True)
class NamespaceMap:
    """``NS[=COLLECTION]``: a Pinecone namespace and the log collection it goes to."""

    namespace: str
    collection: str

    @classmethod
    def parse(cls, text: str) -> NamespaceMap:
        namespace, _, collection = text.partition("=")
        collection = collection or namespace
        if namespace in ("", DEFAULT_NAMESPACE) and collection in ("", DEFAULT_NAMESPACE):
            raise InvalidInput(
                f"--namespace {text!r}: the default namespace needs a collection: "
                f"--namespace {DEFAULT_NAMESPACE}=COLLECTION"
            )
        return cls(namespace, collection)

    @property
    def wire(self) -> str:
        """The namespace as requests name it ("" for the default one)."""
        return "" if self.namespace == DEFAULT_NAMESPACE else self.namespace


def map_vector(vector: Any, document_field: str) -> tuple[Record | None, list[str]]:
    """A Pinecone vector as a record, or the reasons it cannot map."""
    reasons: list[str] = []
    sparse = getattr(vector, "sparse_values", None)
    if sparse is not None and len(getattr(sparse, "indices", None) or []):
        reasons.append("sparse values cannot map (Chroma stores dense vectors)")
    document: str | None = None
    metadata: Metadata = {}
    for key, value in (getattr(vector, "metadata", None) or {}).items():
        if key == document_field:
            if isinstance(value, str):
                document = value
            else:
                reasons.append(f"document field {key!r} is a {type(value).__name__}, not a string")
            continue
        why = _refusal(key, value)
        if why:
            reasons.append(why)
        else:
            metadata[key] = value
    values = np.asarray(vector.values, dtype=np.float32)
    if not values.size:
        reasons.append("no dense values")
    if reasons:
        return None, reasons
    return Record(str(vector.id), values, document, metadata or None), []


def _refusal(key: str, value: Any) -> str | None:
    """Why the log would refuse this metadata value (None if it takes it): the log's own
    rules, so a list of strings passes and an empty list, a null or an object does not."""
    try:
        validate_metadata({key: value})
    except ValidationError as exc:
        return f"metadata {key!r}: {exc.reason}"
    return None


@dataclass(slots=True)
class _Scan:
    refused: list[Refused] = field(default_factory=list)


class PineconeImporter:
    """Imports Pinecone namespaces into a log; open with ``PineconeImporter.open``."""

    def __init__(
        self,
        log: DeltaLog,
        index: Any,
        name: str,
        namespaces: Sequence[NamespaceMap],
        *,
        document_field: str = "text",
        page_size: int = _PAGE_LIMIT,
    ) -> None:
        if not namespaces:
            raise InvalidInput("give at least one --namespace NS[=COLLECTION]")
        self.log = log
        self.name = name
        self.namespaces = list(namespaces)
        self.document_field = document_field
        self.page_size = page_size
        self._index = index

    @classmethod
    async def open(
        cls,
        log: DeltaLog,
        *,
        index: str,
        host: str | None,
        namespaces: Sequence[NamespaceMap],
        **options: Any,
    ) -> PineconeImporter:
        """Connect with the SDK (``ConfigurationError`` without the key or the extra)."""
        key = os.environ.get(API_KEY_VARIABLE)
        if not key:
            raise ConfigurationError(
                f"set {API_KEY_VARIABLE} to the Pinecone API key (it is never a flag)"
            )
        try:
            from pinecone import Pinecone
        except ImportError as exc:
            raise ConfigurationError(
                "the pinecone SDK is not installed: pip install 'deltalog[pinecone]'"
            ) from exc
        handle = await _call(
            f"open the index {index!r}",
            lambda: Pinecone(api_key=key).Index(name=index, host=host or ""),
        )
        return cls(log, handle, index, namespaces, **options)

    async def aclose(self) -> None:
        index, self._index = self._index, None
        if index is not None:
            await anyio.to_thread.run_sync(index.close)

    async def __aenter__(self) -> PineconeImporter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- what there is --------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        """Vectors per namespace (``describe_index_stats``), checked against the log's schema."""
        stats = await _call("describe the index", self._index.describe_index_stats)
        found = {name: int(s.vector_count) for name, s in (stats.namespaces or {}).items()}
        missing = [m.namespace for m in self.namespaces if _stat_name(m) not in found]
        if missing:
            raise InvalidInput(
                f"index {self.name!r} has no namespace {', '.join(map(repr, missing))}; "
                f"it has {', '.join(sorted(found)) or 'none'}"
            )
        dims = {m.collection: stats.dimension for m in self.namespaces}
        log_dims = await self.log.table.read_dims(self.log.keys.log_id)
        check_dims(log_dims, dims, remap="--namespace NS=COLLECTION")
        return {m.namespace: found[_stat_name(m)] for m in self.namespaces}

    async def plan(self) -> tuple[ImportPlan, list[Refused]]:
        """Fetch everything, write nothing: what would be written and what is refused."""
        await self.counts()  # the namespaces exist, the dimension fits
        plan, scan = ImportPlan(), _Scan()
        stats = await _call("describe the index", self._index.describe_index_stats)
        for mapping in self.namespaces:
            entry = CollectionPlan(mapping.namespace, mapping.collection, 0, stats.dimension)
            async for ids in self._id_pages(mapping):
                records = await self._fetch(mapping, ids, scan)
                entry.records += len(records)
                entry.bytes += sum(record_bytes(r) for r in records)
                entry.pages += 1
            plan.collections.append(entry)
        return plan, scan.refused

    # -- the import -----------------------------------------------------------------

    async def run(self, progress: Callable[[ImportResult], None] | None = None) -> ImportResult:
        started = time.monotonic()
        counts = await self.counts()
        result = ImportResult(
            ImportPlan(
                [
                    CollectionPlan(m.namespace, m.collection, counts[m.namespace])
                    for m in self.namespaces
                ]
            )
        )
        writer = PageWriter(self.log, result, max_bytes=_ONE_PART)
        for mapping, entry in zip(self.namespaces, result.plan.collections, strict=True):
            async for ids in self._id_pages(mapping):
                entry.pages += 1
                key = page_key("pinecone", self.name, mapping.namespace, ids)
                held = await durable_claims(self.log, [f"{key}/0"])
                if held:
                    result.deltas_skipped += 1
                    result.last_seq = max(result.last_seq, *(c.seq for c in held.values()))
                    continue
                scan = _Scan()
                records = await self._fetch(mapping, ids, scan)
                if scan.refused:
                    raise refusal_error(
                        scan.refused,
                        "records cannot map to Chroma metadata, nothing of their page written "
                        "(see the mapping in `deltalog import pinecone --help`)",
                    )
                entry.bytes += sum(record_bytes(r) for r in records)
                await writer.write([Page(mapping.collection, key, records)])
                result.seconds = time.monotonic() - started
                if progress is not None:
                    progress(result)
        result.seconds = time.monotonic() - started
        return result

    async def _id_pages(self, mapping: NamespaceMap) -> Any:
        token: str | None = None
        while True:
            page = await _call(
                f"list namespace {mapping.namespace!r}",
                functools.partial(
                    self._index.list_paginated,
                    namespace=mapping.wire,
                    limit=self.page_size,
                    pagination_token=token,
                ),
            )
            ids = [str(item.id) for item in page.vectors if item.id]
            if ids:
                yield ids
            token = page.pagination.next if page.pagination is not None else None
            if not token:
                return

    async def _fetch(self, mapping: NamespaceMap, ids: list[str], scan: _Scan) -> list[Record]:
        got = await _call(
            f"fetch from namespace {mapping.namespace!r}",
            lambda: self._index.fetch(ids=ids, namespace=mapping.wire),
        )
        records: list[Record] = []
        for id_ in ids:
            vector = got.vectors.get(id_)
            if vector is None:
                continue  # deleted between the listing and the fetch
            record, reasons = map_vector(vector, self.document_field)
            where = mapping.namespace or DEFAULT_NAMESPACE
            scan.refused += [Refused(where, id_, why) for why in reasons]
            if record is not None:
                records.append(record)
        return records

    # -- verify -----------------------------------------------------------------------

    async def verify(self, counts: dict[str, int]) -> tuple[dict[str, tuple[int, int]], list[str]]:
        """Vectors per namespace against the records of its collection in ``counts``."""
        source = await self.counts()
        seen = {
            m.namespace: (source[m.namespace], counts.get(m.collection, 0)) for m in self.namespaces
        }
        differences = [
            f"{ns or DEFAULT_NAMESPACE}: {a} vectors in Pinecone, {b} records in the log"
            for ns, (a, b) in seen.items()
            if a != b
        ]
        return seen, differences


def _stat_name(mapping: NamespaceMap) -> str:
    return DEFAULT_NAMESPACE if mapping.wire == "" else mapping.namespace


async def _call(what: str, func: Callable[[], Any]) -> Any:
    """Run an SDK call in a worker thread; its errors become deltalog's."""
    from pinecone.errors import (
        ApiError,
        ForbiddenError,
        NotFoundError,
        PineconeConnectionError,
        PineconeError,
        PineconeTimeoutError,
        UnauthorizedError,
    )

    try:
        return await anyio.to_thread.run_sync(func)
    except (UnauthorizedError, ForbiddenError) as exc:
        raise ConfigurationError(
            f"pinecone refused the API key ({what}): check {API_KEY_VARIABLE}"
        ) from exc
    except NotFoundError as exc:
        raise InvalidInput(f"pinecone: {what}: not found ({exc})") from exc
    except (PineconeConnectionError, PineconeTimeoutError) as exc:
        raise Unavailable(f"pinecone: {what}: {exc}") from exc
    except ApiError as exc:
        status = getattr(exc, "status_code", None) or getattr(exc, "status", 0) or 0
        if int(status) >= 500 or int(status) == 429:
            raise Unavailable(f"pinecone: {what}: {exc}; run the import again to resume") from exc
        raise InvalidInput(f"pinecone: {what}: {exc}") from exc
    except PineconeError as exc:
        raise ConfigurationError(f"pinecone: {what}: {exc}") from exc
    except DeltalogError:
        raise
