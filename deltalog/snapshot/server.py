"""A Chroma server as a sink: what ``deltalog mirror`` writes to.

- A **target** is one database of one Chroma server: a URL, a tenant and a
  database. Its ``id`` names it in the mirror's lease.
- The server is reached with chromadb's own clients: ``HttpClient`` for a
  self-hosted server (``http://`` or ``https://``), ``CloudClient`` when
  ``CHROMA_API_KEY`` is set in the environment (Chroma Cloud; the key never
  appears on a command line).
- The **control collection** holds no records: its collection metadata is
  where the owner of the target keeps bookkeeping (the mirror's position).
  It is hidden from ``collections`` and ``counts``, so the sink's state is
  exactly the records the log gave it.

``ChromaServerSink`` is ``ChromaSink`` over that client, so a plan means on
the server exactly what it means in a snapshot. It adds what a shared,
long-lived server needs: collections are created with the settings the
owner asks for (the snapshot's HNSW settings), an existing collection of
another dimension than the log's is refused before anything is written
(``ConfigurationError``), and a server that cannot be reached is a
``ConfigurationError`` when it never answered, ``Unavailable`` afterwards.

And what a server others read while it is written needs:

- **Puts replace records in place**: ``upsert``, never a delete then an
  add, so no reader sees an id absent and a writer stopped halfway leaves
  the old record or the new one. Chroma's ``upsert`` keeps what it is not
  given, so the put names every old metadata key it drops as ``None``
  (measured on chromadb 1.5, embedded and ``chroma run``: the key goes, and
  a record whose last key goes has ``None`` metadata). One thing ``upsert``
  cannot do is take a document away: a put without a document over a
  record that has one is the only put applied as a delete then an add.
- **Every request is bounded in time** (``request_timeout``, for each of
  connect, write and read; chromadb sets none) and passes ``fence`` first,
  in the thread that sends it: the owner (``deltalog mirror``) refuses a
  request there once its lease may have expired. ``unsettled`` records a
  request that failed in a way that may still land (a timeout, a reset).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import numpy as np

from deltalog.errors import ConfigurationError, DataError, InvalidInput, Unavailable
from deltalog.fold import CollectionPlan, Record
from deltalog.snapshot.sink import ChromaSink, _add

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection

__all__ = [
    "API_KEY_VARIABLE",
    "DEFAULT_REQUEST_TIMEOUT",
    "ChromaServerSink",
    "ChromaTarget",
    "close_http_session",
    "connect_client",
]

API_KEY_VARIABLE = "CHROMA_API_KEY"
"""Set: the server is reached through ``chromadb.CloudClient`` with this key."""
DEFAULT_REQUEST_TIMEOUT = 60.0
"""Seconds each phase of a request to the server may take (a batch of thousands of
vectors takes seconds to index)."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ChromaTarget:
    """One database of one Chroma server."""

    url: str
    tenant: str = "default_tenant"
    database: str = "default_database"

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInput(
                f"--chroma-url must look like http://HOST:PORT or https://HOST, not {self.url!r}"
            )
        if not self.tenant or not self.database:
            raise InvalidInput("the tenant and the database must not be empty")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 8000)

    @property
    def ssl(self) -> bool:
        return urlsplit(self.url).scheme == "https"

    @property
    def id(self) -> str:
        """``scheme://host:port/tenant/database``: the same server always gets the same id."""
        scheme = "https" if self.ssl else "http"
        return f"{scheme}://{self.host.lower()}:{self.port}/{self.tenant}/{self.database}"


def connect_client(target: ChromaTarget) -> ClientAPI:
    """A chromadb client for ``target`` (blocking); ``ConfigurationError`` if unreachable."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    key = os.environ.get(API_KEY_VARIABLE)
    try:
        if key:
            return chromadb.CloudClient(
                tenant=target.tenant,
                database=target.database,
                api_key=key,
                settings=settings,
                cloud_host=target.host,
                cloud_port=target.port,
                enable_ssl=target.ssl,
            )
        return chromadb.HttpClient(
            host=target.host,
            port=target.port,
            ssl=target.ssl,
            tenant=target.tenant,
            database=target.database,
            settings=settings,
        )
    except Exception as exc:  # chromadb says ValueError, or its own errors, or httpx's
        raise ConfigurationError(
            f"cannot use the Chroma server at {target.url} (tenant {target.tenant!r}, "
            f"database {target.database!r}): {exc}; check that it runs, the URL, "
            f"the tenant and the database" + (f", and {API_KEY_VARIABLE}" if key else "")
        ) from exc


class ChromaServerSink(ChromaSink):
    """A database of a Chroma server as a sink; open it with ``ChromaServerSink.connect``."""

    def __init__(
        self,
        client: ClientAPI,
        target: ChromaTarget,
        *,
        control: str,
        limiter: anyio.CapacityLimiter | None = None,
        log: str | None = None,
        batch_size: int,
    ) -> None:
        super().__init__(
            client,  # type: ignore[arg-type]  # any chromadb client will do
            Path(),
            limiter=limiter,
            log=log,
            batch_size=batch_size,
            where=f"the Chroma server {target.url} ({target.tenant}/{target.database})",
        )
        self.target = target
        self.control = control
        self.dims: dict[str, int] = {}
        """The dimension each collection must have (the log's schema)."""
        self.settings: dict[str, dict[str, Any]] = {}
        """Per collection, the HNSW settings to create it with (default: Chroma's)."""
        self.fence: Callable[[], None] | None = None
        """Called before every request, in the thread that sends it; raises to stop it."""
        self.unsettled = False
        """Whether a request failed in a way that may still land on the server."""

    @classmethod
    async def connect(
        cls,
        target: ChromaTarget,
        *,
        control: str,
        limiter: anyio.CapacityLimiter | None = None,
        log: str | None = None,
        max_batch_size: int | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> ChromaServerSink:
        """Connect to the target; ``control`` names the hidden control collection."""
        client = await anyio.to_thread.run_sync(connect_client, target, limiter=limiter)
        sink = cls(client, target, control=control, limiter=limiter, log=log, batch_size=1)
        try:
            _bound_requests(client, request_timeout, sink._before_request)
        except BaseException:
            await sink.aclose()
            raise
        most = await sink._run("ask the batch size", client.get_max_batch_size)
        sink._batch = min(most, max_batch_size or most)
        return sink

    # -- collections ------------------------------------------------------------

    async def collections(self) -> list[str]:
        return [name for name in await self.all_collections() if name != self.control]

    async def all_collections(self) -> list[str]:
        """Every collection of the database, the control collection included."""
        return await super().collections()

    async def check(self, names: list[str]) -> None:
        """Refuse (``ConfigurationError``) an existing collection of another dimension.

        Call it before a batch that may create or write ``names``: it reads
        and changes nothing else.
        """
        existing = set(await self.all_collections())
        for name in names:
            if name == self.control:
                raise ConfigurationError(
                    f"the log writes a collection named {name!r}, the mirror's control "
                    "collection: mirror it into another database",
                    log=self._log,
                )
            if name in existing and name not in self._handles:
                handle = await self._run(f"open {name!r}", self._client_get, name)
                await self._check_dim(name, handle)

    def _client_get(self, name: str) -> Collection:
        return self._open_client().get_collection(name, embedding_function=None)

    async def _check_dim(self, name: str, handle: Collection) -> None:
        want = self.dims.get(name)
        have = await self._run(f"read {name!r}", _dimension, handle)
        if want is not None and have is not None and have != want:
            raise ConfigurationError(
                f"collection {name!r} on {self.target.url} holds {have}-dimensional vectors; "
                f"the log's are {want}-dimensional: delete or rename it, or mirror into "
                "another database",
                log=self._log,
            )

    async def _open_collection(self, name: str) -> Collection:
        if name in await self.all_collections():
            handle = await self._run(f"open {name!r}", self._client_get, name)
            await self._check_dim(name, handle)
            return handle
        settings = self.settings.get(name)
        return await self._run(f"create {name!r}", self._create, name, settings)

    def _create(self, name: str, hnsw: dict[str, Any] | None) -> Collection:
        client = self._open_client()
        if not hnsw:
            return client.create_collection(name, embedding_function=None)
        return client.create_collection(
            name,
            embedding_function=None,
            configuration=cast("Any", {"hnsw": _creatable(hnsw)}),
        )

    async def drop(self, name: str) -> None:
        """Delete a collection and its records."""
        self._handles.pop(name, None)
        await self._run(f"delete {name!r}", self._open_client().delete_collection, name)

    async def add(self, name: str, records: list[Record]) -> None:
        """Add records to a collection known to lack them (a bulk load into a new one)."""
        handle = await self._collection(name)
        for start in range(0, len(records), self._batch):
            await self._run(f"add to {name!r}", _add, handle, records[start : start + self._batch])

    # -- the control collection ---------------------------------------------------

    async def read_control(self) -> dict[str, Any] | None:
        """The control collection's metadata; None if it does not exist."""
        if self.control not in await self.all_collections():
            return None
        handle = await self._run("read the control collection", self._client_get, self.control)
        return dict(handle.metadata or {})

    async def write_control(self, metadata: Mapping[str, str | int | float | bool]) -> None:
        """Replace the control collection's metadata (creating it if needed)."""
        await self._run("write the control collection", self._write_control, dict(metadata))

    def _write_control(self, metadata: dict[str, Any]) -> None:
        client = self._open_client()
        handle = client.get_or_create_collection(self.control, embedding_function=None)
        handle.modify(metadata=metadata)

    # -- puts in place -------------------------------------------------------------

    def _removals(self, changes: CollectionPlan) -> set[str]:
        return set(changes.deletes)  # a put replaces its record in place (``_put``)

    def _put(self, collection: Collection, records: list[Record]) -> int:
        return _put_in_place(collection, records)

    async def aclose(self) -> None:
        client = self._client
        await super().aclose()
        if client is not None:
            await anyio.to_thread.run_sync(close_http_session, client)

    def _before_request(self, request: Any) -> None:
        if self.fence is not None:
            self.fence()

    async def _run(self, what: str, func: Callable[..., T], *args: Any) -> T:
        try:
            with _transport_errors(f"{what} in {self._where}", self._log):
                return await super()._run(what, func, *args)
        except Unavailable:
            self.unsettled = True
            raise


def _bound_requests(client: Any, timeout: float, before: Callable[[Any], None]) -> None:
    """Give every request of ``client`` a timeout and pass it through ``before`` first.

    chromadb 1.5's HTTP clients (``HttpClient``, ``CloudClient``) send through
    one ``httpx.Client`` session, created without a timeout.
    """
    import httpx

    session = getattr(getattr(client, "_server", None), "_session", None)
    if not isinstance(session, httpx.Client):
        raise ConfigurationError(
            "this chromadb client sends no requests through an httpx session that deltalog "
            "can bound in time: use chromadb 1.5's HttpClient or CloudClient"
        )
    session.timeout = httpx.Timeout(timeout)
    session.event_hooks["request"].append(before)


def _put_in_place(collection: Collection, records: list[Record]) -> int:
    """Replace whole records without ever leaving an id absent; see the module docstring."""
    ids = [r.id for r in records]
    old = collection.get(ids=ids, include=["documents", "metadatas"])
    found = list(old["ids"])
    none: list[Any] = [None] * len(found)
    documents = dict(zip(found, old["documents"] or none, strict=True))
    metadatas: dict[str, Any] = dict(zip(found, old["metadatas"] or none, strict=True))
    cleared = [r for r in records if r.document is None and documents.get(r.id) is not None]
    taken = {r.id for r in cleared}
    upserts = [r for r in records if r.id not in taken]
    calls = 1
    if upserts:
        docs = [r.document for r in upserts]
        metas = [_replacing(r.metadata, metadatas.get(r.id)) for r in upserts]
        collection.upsert(
            ids=[r.id for r in upserts],
            embeddings=np.stack([r.embedding for r in upserts]),
            documents=cast("Any", docs) if any(d is not None for d in docs) else None,
            metadatas=cast("Any", metas) if any(m is not None for m in metas) else None,
        )
        calls += 1
    if cleared:  # upsert keeps a document it is not given: delete, then add
        collection.delete(ids=[r.id for r in cleared])
        calls += 1 + _add(collection, cleared)
    return calls


def _replacing(
    new: Mapping[str, Any] | None, old: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The metadata to upsert so a record ends with exactly ``new``: keys it drops as None."""
    out: dict[str, Any] = {key: None for key in (old or {}) if key not in (new or {})}
    out.update(new or {})
    return out or None


def close_http_session(client: Any) -> None:
    """Close the HTTP connections of a chromadb client that was closed.

    chromadb 1.5's ``close()`` releases the client's systems (its own and its
    admin client's, each with an ``httpx`` session; HTTP clients never share
    them) but never closes those sessions: their sockets stay open until
    garbage collection.
    """
    for owner in (client, getattr(client, "_admin_client", None)):
        session = getattr(getattr(owner, "_server", None), "_session", None)
        if session is not None:
            session.close()


_CREATABLE = (
    "space",
    "ef_construction",
    "ef_search",
    "max_neighbors",
    "resize_factor",
    "sync_threshold",
)


def _creatable(hnsw: dict[str, Any]) -> dict[str, Any]:
    """The HNSW settings a collection can be created with."""
    return {key: hnsw[key] for key in _CREATABLE if hnsw.get(key) is not None}


def _dimension(handle: Collection) -> int | None:
    got = handle.get(limit=1, include=["embeddings"])
    embeddings = got.get("embeddings")
    if embeddings is None or len(embeddings) == 0:
        return None
    return int(np.asarray(embeddings[0]).shape[0])


@contextmanager
def _transport_errors(what: str, log: str | None) -> Iterator[None]:
    """A server that answered once and now does not is ``Unavailable`` (retry)."""
    import httpx

    try:
        yield
    except httpx.TransportError as exc:
        raise Unavailable(f"could not {what}: {exc}", ambiguous=True, log=log) from exc
    except DataError as exc:
        cause = exc.__cause__
        if cause is not None and "Could not connect" in str(cause):
            raise Unavailable(f"could not {what}: {cause}", ambiguous=True, log=log) from exc
        raise
