"""Reader tests' deltas, and reader answers held against the test oracle (``tests.oracle``).

The deltas touch one collection, ``words``, of ``DIM``-dimensional vectors.

A reader does not return vectors; ``query`` distances are how its answers
show them. Chroma computes distances in float32 and the overlay in
float64, so distances match the oracle's within ``REL``/``ABS``; ids,
documents and metadata match exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from deltalog import Delta, UpdateMetadata, Upsert
from deltalog.entry import MetadataPatch
from deltalog.fold import Record
from deltalog.reader import GetResult, QueryResult
from tests.builders import delete
from tests.oracle import nearest

__all__ = [
    "ABS",
    "REL",
    "DIM",
    "assert_get_matches",
    "assert_query_matches",
    "basis",
    "random_word_deltas",
    "upsert_words",
]

DIM = 8

REL, ABS = 1e-4, 1e-2
"""The tolerance of a distance (squared L2 of vectors within +-100)."""


def assert_get_matches(got: GetResult, records: dict[str, Record], label: str) -> None:
    """``get`` of a whole collection returned exactly ``records``."""
    assert sorted(got["ids"]) == sorted(records), label
    for id_, document, metadata in zip(got["ids"], got["documents"], got["metadatas"], strict=True):
        want = records[id_]
        assert (document, metadata or None) == (want.document, want.metadata), (label, id_)


def assert_query_matches(
    got: QueryResult,
    records: dict[str, Record],
    queries: np.ndarray,
    n_results: int,
    label: str,
) -> None:
    """Per query vector: the ``n_results`` nearest of ``records`` (ties in any order)."""
    assert len(got["ids"]) == len(queries), label
    for q, query in enumerate(queries):
        ids, distances = got["ids"][q], got["distances"][q]
        everything = {id_: d for d, id_ in nearest(records, query, len(records))}
        want = nearest(records, query, n_results)
        assert len(ids) == len(set(ids)) == len(want), (label, q, ids, want)
        assert sorted(distances) == pytest.approx([d for d, _ in want], rel=REL, abs=ABS), (
            label,
            q,
        )
        rows = zip(ids, distances, got["documents"][q], got["metadatas"][q], strict=True)
        for id_, distance, document, metadata in rows:
            assert id_ in everything, f"{label}: {id_} is not in the collection"
            assert distance == pytest.approx(everything[id_], rel=REL, abs=ABS), (label, id_)
            record = records[id_]
            assert (document, metadata or None) == (record.document, record.metadata), id_


def upsert_words(ids: list[str], vectors: np.ndarray, merchant: str) -> Delta:
    """An upsert of ``ids`` into ``words``: documents ``doc {id}``, metadata
    ``merchant_name`` and ``n`` (the position in ``ids``)."""
    return Delta(
        ops=[
            Upsert(
                collection="words",
                ids=ids,
                embeddings=vectors,
                documents=[f"doc {i}" for i in ids],
                metadatas=[{"merchant_name": merchant, "n": n} for n in range(len(ids))],
            )
        ]
    )


def basis(i: int, scale: float = 1.0) -> np.ndarray:
    """One ``(1, DIM)`` vector: ``scale`` on axis ``i``."""
    v = np.zeros((1, DIM), np.float32)
    v[0, i] = scale
    return v


def random_word_deltas(rng: np.random.Generator, count: int) -> list[Delta]:
    """Upserts, deletes and metadata updates over six ids of ``words``."""
    out = []
    for _ in range(count):
        chosen = rng.choice(["a", "b", "c", "d", "e", "f"], rng.integers(1, 4), replace=False)
        ids = sorted(str(id_) for id_ in chosen)
        kind = rng.integers(3)
        if kind == 0:
            vectors = rng.uniform(-1, 1, (len(ids), DIM)).astype(np.float32)
            out.append(upsert_words(ids, vectors, str(rng.choice(["X", "Y"]))))
        elif kind == 1:
            out.append(delete(*ids))
        else:
            patches: list[MetadataPatch] = [
                {"merchant_name": str(rng.choice(["X", "Y"])), "n": None} for _ in ids
            ]
            out.append(Delta(ops=[UpdateMetadata(collection="words", ids=ids, metadatas=patches)]))
    return out
