"""The distinct index: one HNSW point per distinct vector, beside a snapshot's Chroma directory.

Why: receipts repeat texts (every receipt's ``THANK YOU FOR SHOPPING``), so
many records carry bit-identical vectors. hnswlib's neighbour selection keeps
a candidate unless it is strictly closer to an already selected neighbour
than to the new point; two copies are at distance 0 from both, so copies are
never pruned and a group of copies larger than ``max_neighbors`` fills its
members' neighbour lists with each other. A search whose descent ends on a
member fills its ``ef`` result slots with copies at one distance, admits
nothing that is not strictly closer, and returns the copies: ``walmart``
answered ``YOU`` at 1.50 while ``WAL*MART`` sat at 0.06 (README
"Search quality" has the measurements). An index of distinct vectors has no
such groups.

Vocabulary:

- **digest**: blake2b-128 of a vector's float32 bytes: records whose vectors
  are bit-identical share it.
- **members**: a SQLite table, (collection, id) -> digest, in
  ``DISTINCT_DIR/members.sqlite3``.
- **distinct collection**: in the Chroma directory ``DISTINCT_DIR`` inside
  the snapshot directory, one collection per snapshot collection, of the
  same name and distance space, holding one record per digest (id: the
  digest in hex; no document, no metadata).

A query asks the distinct collection for the nearest digests and expands
each into its records (``members``, by id order), nearest first. The
snapshot's own collections stay exactly what the log says (every record,
bit for bit), so plain Chroma clients, exports and mirrors see nothing of
this; exports leave the directory out. Every function blocks: the sink
calls them in a worker thread.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from deltalog.fold import Record
from deltalog.snapshot.hnsw import PERSIST_EVERY

if TYPE_CHECKING:
    from chromadb.api.client import Client
    from chromadb.api.models.Collection import Collection

__all__ = [
    "DISTINCT_DIR",
    "DISTINCT_HNSW",
    "GROUP_LIMIT",
    "DistinctHit",
    "DistinctIndex",
    "digest",
    "remove",
]

DISTINCT_DIR = "deltalog-distinct"
DISTINCT_HNSW: dict[str, Any] = {
    "ef_construction": 200,
    "ef_search": 100,
    "max_neighbors": 16,
    "sync_threshold": PERSIST_EVERY,
}
"""The distinct collections' HNSW settings (README "Search quality": ef_construction 200
where Chroma's 100 left a query or two short; the index saved every ``PERSIST_EVERY``
records, ``deltalog.snapshot.hnsw``; the rest are Chroma's defaults)."""
GROUP_LIMIT = 16
"""A collection gets its points once a vector has more copies than this (Chroma's
``max_neighbors``: more copies than that can fill each other's neighbour lists).
Until then members are kept (cheap) and queries go to Chroma's own collection."""
_SQL_CHUNK = 500
"""Ids per ``IN (...)``: under SQLite's host parameter limit."""


def digest(vector: npt.NDArray[np.float32]) -> bytes:
    """The digest of one vector (its float32 bytes)."""
    data = np.ascontiguousarray(vector, np.float32).tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class DistinctHit:
    """A record found by a vector query, at its vector's distance."""

    id: str
    distance: float


class DistinctIndex:
    """The distinct index of one snapshot directory; see the module docstring."""

    def __init__(
        self, root: Path, opener: Callable[[Path], Client], db: sqlite3.Connection
    ) -> None:
        self.root = root
        self._opener = opener
        self._opened: Client | None = None
        self._db = db
        self._lock = threading.Lock()
        self._handles: dict[str, Collection] = {}

    @classmethod
    def open(
        cls, directory: Path, opener: Callable[[Path], Client], *, create: bool
    ) -> DistinctIndex | None:
        """The index of the snapshot at ``directory``; None when it has none and not ``create``.

        ``opener`` opens a Chroma persistent directory.
        """
        root = directory / DISTINCT_DIR
        if not create and not (root / "members.sqlite3").exists():
            return None
        root.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(root / "members.sqlite3", check_same_thread=False)
        db.executescript(
            "CREATE TABLE IF NOT EXISTS members (collection TEXT NOT NULL, id TEXT NOT NULL, "
            "digest BLOB NOT NULL, PRIMARY KEY (collection, id)) WITHOUT ROWID;"
            "CREATE INDEX IF NOT EXISTS by_digest ON members (collection, digest, id);"
            "CREATE TABLE IF NOT EXISTS indexed (collection TEXT PRIMARY KEY) WITHOUT ROWID;"
            "CREATE TABLE IF NOT EXISTS searched (collection TEXT PRIMARY KEY) WITHOUT ROWID;"
        )
        return cls(root, opener, db)

    @property
    def _client(self) -> Client:
        """The points' Chroma directory, opened on first use (most collections never
        need points, and opening Chroma costs more than the rest of an apply on small
        ones)."""
        if self._opened is None:
            self._opened = self._opener(self.root / "chroma")
        return self._opened

    def close(self) -> None:
        self._handles.clear()
        self._db.close()
        if self._opened is not None:
            self._opened.close()
            self._opened = None

    # -- what it indexes --------------------------------------------------------

    def indexes(self, collection: str) -> bool:
        """Whether every record of ``collection`` is a member."""
        return self._listed("indexed", collection)

    def searchable(self, collection: str) -> bool:
        """Whether ``collection`` has its points, all of them: queries go through them."""
        return self._listed("searched", collection)

    def _listed(self, table: str, collection: str) -> bool:
        with self._lock:
            query = f"SELECT 1 FROM {table} WHERE collection = ?"
            return self._db.execute(query, (collection,)).fetchone() is not None

    def reset(self, collection: str) -> None:
        """Start indexing ``collection`` from nothing: ``update`` with every record, then
        ``mark_indexed``."""
        self._drop(collection)

    def mark_indexed(self, collection: str) -> None:
        self._mark("indexed", collection)

    def mark_searchable(self, collection: str) -> None:
        """``add_points`` was given every record: queries may go through the points."""
        self._mark("searched", collection)

    def _mark(self, table: str, collection: str) -> None:
        with self._lock, self._db:
            self._db.execute(f"INSERT OR IGNORE INTO {table} VALUES (?)", (collection,))

    def update(
        self,
        collection: str,
        space: str,
        removed: Sequence[str],
        puts: Sequence[Record],
        batch: int,
    ) -> bool:
        """``removed`` ids are gone and ``puts`` were added (a put's id may be in both):
        keep members, and the points of a searchable collection, in step (Chroma calls
        of at most ``batch`` ids).

        True when the collection is not searchable yet and now has a group of more
        than ``GROUP_LIMIT`` copies: give ``add_points`` every record, then
        ``mark_searchable``.
        """
        new = {r.id: digest(r.embedding) for r in puts}
        vectors = {new[r.id]: r.embedding for r in puts}
        with self._lock, self._db:
            old = self._forget(collection, removed)
            self._db.executemany(
                "INSERT OR REPLACE INTO members VALUES (?, ?, ?)",
                [(collection, id_, d) for id_, d in new.items()],
            )
            alive = self._alive(collection, old | set(vectors))
        if not self.searchable(collection):
            return self._largest_group(collection, set(vectors)) > GROUP_LIMIT
        handle = self._handle(collection, space)
        dead = sorted(d.hex() for d in old - alive)
        for start in range(0, len(dead), batch):
            handle.delete(ids=dead[start : start + batch])
        self._add(handle, {d: v for d, v in vectors.items() if d not in old}, batch)
        return False

    def add_points(
        self, collection: str, space: str, records: Sequence[Record], batch: int
    ) -> None:
        """Make sure the points of ``records``' vectors exist."""
        self._add(
            self._handle(collection, space),
            {digest(r.embedding): r.embedding for r in records},
            batch,
        )

    def _add(
        self, handle: Collection, vectors: dict[bytes, npt.NDArray[np.float32]], batch: int
    ) -> None:
        wanted = sorted(d.hex() for d in vectors)
        for start in range(0, len(wanted), batch):
            some = wanted[start : start + batch]
            have = set(handle.get(ids=some, include=[])["ids"])
            fresh = [d for d in some if d not in have]
            if fresh:
                vs = np.stack([vectors[bytes.fromhex(d)] for d in fresh])
                handle.add(ids=fresh, embeddings=vs)

    def _largest_group(self, collection: str, digests: set[bytes]) -> int:
        listed = sorted(digests)
        largest = 0
        with self._lock:
            for start in range(0, len(listed), _SQL_CHUNK):
                chunk = listed[start : start + _SQL_CHUNK]
                marks = ",".join("?" * len(chunk))
                row = self._db.execute(
                    f"SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM members WHERE collection = ? "
                    f"AND digest IN ({marks}) GROUP BY digest)",
                    (collection, *chunk),
                ).fetchone()
                largest = max(largest, row[0] or 0)
        return largest

    def _forget(self, collection: str, ids: Sequence[str]) -> set[bytes]:
        """Remove ``ids`` from members; the digests they had."""
        old: set[bytes] = set()
        for start in range(0, len(ids), _SQL_CHUNK):
            chunk = list(ids[start : start + _SQL_CHUNK])
            marks = ",".join("?" * len(chunk))
            old |= {
                row[0]
                for row in self._db.execute(
                    f"SELECT digest FROM members WHERE collection = ? AND id IN ({marks})",
                    (collection, *chunk),
                )
            }
            self._db.execute(
                f"DELETE FROM members WHERE collection = ? AND id IN ({marks})",
                (collection, *chunk),
            )
        return old

    def _alive(self, collection: str, digests: set[bytes]) -> set[bytes]:
        """Which of ``digests`` some member still has."""
        listed = sorted(digests)
        alive: set[bytes] = set()
        for start in range(0, len(listed), _SQL_CHUNK):
            chunk = listed[start : start + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            alive |= {
                row[0]
                for row in self._db.execute(
                    f"SELECT DISTINCT digest FROM members WHERE collection = ? "
                    f"AND digest IN ({marks})",
                    (collection, *chunk),
                )
            }
        return alive

    def _drop(self, collection: str) -> None:
        with self._lock, self._db:
            for table in ("members", "indexed", "searched"):
                self._db.execute(f"DELETE FROM {table} WHERE collection = ?", (collection,))
        self._handles.pop(collection, None)
        if not (self.root / "chroma").exists():
            return
        if collection in {c.name for c in self._client.list_collections()}:
            self._client.delete_collection(collection)

    def _handle(self, collection: str, space: str) -> Collection:
        handle = self._handles.get(collection)
        if handle is None:
            handle = self._client.get_or_create_collection(
                collection,
                embedding_function=None,
                configuration={"hnsw": {**DISTINCT_HNSW, "space": space}},  # type: ignore[arg-type]
            )
            self._handles[collection] = handle
        return handle

    # -- queries ----------------------------------------------------------------

    def query(
        self,
        collection: str,
        space: str,
        embeddings: npt.NDArray[np.float32],
        n_results: int,
    ) -> list[list[DistinctHit]]:
        """The nearest ``n_results`` records per query vector.

        Chroma is asked for the nearest ``n_results`` digests (the records
        wanted are among theirs); each is expanded into its records, by id,
        until ``n_results`` are found.
        """
        handle = self._handle(collection, space)
        asked = min(n_results, handle.count())
        if asked == 0:
            return [[] for _ in range(len(embeddings))]
        got = handle.query(query_embeddings=embeddings, n_results=asked, include=["distances"])
        distances = got["distances"] or []
        return [
            self._expand(collection, list(ids), list(dists), n_results)
            for ids, dists in zip(got["ids"], distances, strict=True)
        ]

    def _expand(
        self, collection: str, digests: list[str], distances: list[float], n: int
    ) -> list[DistinctHit]:
        out: list[DistinctHit] = []
        with self._lock:
            for hexed, distance in zip(digests, distances, strict=True):
                rows = self._db.execute(
                    "SELECT id FROM members WHERE collection = ? AND digest = ? "
                    "ORDER BY id LIMIT ?",
                    (collection, bytes.fromhex(hexed), n - len(out)),
                )
                out += [DistinctHit(row[0], float(distance)) for row in rows]
                if len(out) >= n:
                    break
        return out


def remove(directory: Path) -> None:
    """Leave a snapshot directory without its distinct index (a plain Chroma directory)."""
    shutil.rmtree(directory / DISTINCT_DIR, ignore_errors=True)
