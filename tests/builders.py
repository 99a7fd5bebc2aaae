"""Deltas and entries for the log's tests: small vectors, readable ids."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from deltalog import Batch, Delete, Delta, DeltaLog, Entry, Seal, UpdateMetadata, Upsert
from deltalog.entry import MetadataPatch, Op

DIM = 8


def vectors(rng: np.random.Generator, rows: int, dim: int = DIM) -> np.ndarray:
    return rng.standard_normal((rows, dim), dtype=np.float32)


def upsert(
    rng: np.random.Generator,
    ids: list[str],
    *,
    collection: str = "words",
    dim: int = DIM,
) -> Upsert:
    return Upsert(
        collection=collection,
        ids=ids,
        embeddings=vectors(rng, len(ids), dim),
        documents=[f"doc {i}" for i in ids],
        metadatas=[
            {"n": n, "label": f"l{n}", "ok": n % 2 == 0, "x": n / 3} for n in range(len(ids))
        ],
    )


def delta(
    rng: np.random.Generator,
    name: str,
    *,
    rows: int = 2,
    collection: str = "words",
    dim: int = DIM,
    idempotency_key: str | None = None,
) -> Delta:
    """An upsert of ``rows`` records named after ``name``."""
    ids = [f"{name}#{i}" for i in range(rows)]
    return Delta(
        ops=[upsert(rng, ids, collection=collection, dim=dim)], idempotency_key=idempotency_key
    )


def delete(*ids: str, collection: str = "words", key: str | None = None) -> Delta:
    """A delta with one ``Delete``: no vectors, so no schema read."""
    return Delta(ops=[Delete(collection=collection, ids=list(ids))], idempotency_key=key)


def patch(ids: list[str], metadatas: list[MetadataPatch]) -> Delta:
    return Delta(ops=[UpdateMetadata(collection="words", ids=ids, metadatas=metadatas)])


def assert_ops_equal(got: Iterable[Op], want: Iterable[Op]) -> None:
    """Ops equal field by field, vectors bit for bit."""
    got, want = list(got), list(want)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert type(a) is type(b)
        assert (a.collection, a.ids) == (b.collection, b.ids)
        if isinstance(a, Upsert):
            assert isinstance(b, Upsert)
            assert a.embeddings.dtype == np.float32 and a.embeddings.shape == b.embeddings.shape
            assert a.embeddings.tobytes() == b.embeddings.tobytes()
            assert (a.documents, a.metadatas) == (b.documents, b.metadatas)
        elif isinstance(a, UpdateMetadata):
            assert isinstance(b, UpdateMetadata)
            assert a.metadatas == b.metadatas


def assert_delta_equal(got: Delta, want: Delta) -> None:
    assert (got.delta_id, got.producer_id, got.created_at, got.idempotency_key) == (
        want.delta_id,
        want.producer_id,
        want.created_at,
        want.idempotency_key,
    )
    assert_ops_equal(got.ops, want.ops)


def batch_of(entry: Entry) -> Batch:
    assert isinstance(entry, Batch), entry
    return entry


def seal_of(entry: Entry) -> Seal:
    assert isinstance(entry, Seal), entry
    return entry


async def read_all(log: DeltaLog, after: int = 0) -> list[tuple[int, Entry]]:
    return [item async for item in log.read(after=after)]


async def delta_seqs(log: DeltaLog) -> dict[str, list[int]]:
    """Every delta_id in the log with the seqs of the entries that hold it."""
    seen: dict[str, list[int]] = {}
    async for seq, entry in log.read():
        for d in entry.deltas:
            seen.setdefault(d.delta_id, []).append(seq)
    return seen
