"""Hypothesis strategies for entries over a small id space, shared by fold and sink tests.

Few ids, collections and metadata keys, so that random ops collide: the same
id is upserted, patched and deleted many times within one example.

Float metadata values default to ``CHROMA_EXACT_FLOATS``: at most 13
significant digits and a moderate exponent. ChromaDB parses stored metadata
with a float parser that can change the last bit of longer ones (see
``tests/snapshot/test_sink.py``), and most tests compare Chroma with the plain-Python
reference exactly. ``ANY_FLOATS`` is for comparing Chroma with Chroma.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from deltalog.entry import (
    Batch,
    Delete,
    Delta,
    Entry,
    Metadata,
    MetadataPatch,
    MetadataValue,
    Seal,
    UpdateMetadata,
    Upsert,
)

IDS = ("a", "b", "c", "d")
COLLECTIONS = ("words", "lines")
KEYS = ("k1", "k2", "k3")
DIM = 3

collections = st.sampled_from(COLLECTIONS)
id_lists = st.lists(st.sampled_from(IDS), min_size=1, max_size=3, unique=True)
floats32 = st.floats(width=32, allow_nan=False, allow_infinity=False)

CHROMA_EXACT_FLOATS = st.floats(-1e6, 1e6).map(lambda v: round(v, 6) + 0.0)  # + 0.0: no -0.0
"""Floats that ChromaDB stores exactly: at most 13 significant digits, no -0.0."""
ANY_FLOATS = st.floats(allow_nan=False, allow_infinity=False)


@functools.cache
def entries(floats: st.SearchStrategy[float] = CHROMA_EXACT_FLOATS) -> st.SearchStrategy[Entry]:
    """Batches (three times in four) and seals, with float metadata drawn from ``floats``."""
    values: st.SearchStrategy[MetadataValue] = st.one_of(
        st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), floats, st.booleans()
    )
    keys = st.sampled_from(KEYS)
    metadatas = st.dictionaries(keys, values, min_size=1, max_size=3)
    patches = st.dictionaries(keys, st.none() | values, min_size=1, max_size=3)
    ops = st.one_of(upserts(metadatas), deletes(), updates(patches))
    deltas = st.builds(Delta, ops=st.lists(ops, min_size=1, max_size=3))
    batches = st.builds(
        Batch, entry_id=st.just("e"), deltas=st.lists(deltas, min_size=1, max_size=2)
    )
    seals = st.builds(Seal, sealed_by=st.just("test"), reason=st.just("hole"))
    return st.one_of(batches, batches, batches, seals)


@st.composite
def upserts(
    draw: st.DrawFn,
    metadatas: st.SearchStrategy[Metadata],
    elements: st.SearchStrategy[float] = floats32,
) -> Upsert:
    ids = draw(id_lists)
    n = len(ids)
    return Upsert(
        collection=draw(collections),
        ids=ids,
        embeddings=draw(hnp.arrays(np.float32, (n, DIM), elements=elements)),
        documents=draw(st.none() | st.lists(st.text(max_size=3), min_size=n, max_size=n)),
        metadatas=draw(st.none() | st.lists(metadatas, min_size=n, max_size=n)),
    )


@st.composite
def deletes(draw: st.DrawFn) -> Delete:
    return Delete(collection=draw(collections), ids=draw(id_lists))


@st.composite
def updates(draw: st.DrawFn, patches: st.SearchStrategy[MetadataPatch]) -> UpdateMetadata:
    ids = draw(id_lists)
    n = len(ids)
    return UpdateMetadata(
        collection=draw(collections),
        ids=ids,
        metadatas=draw(st.lists(patches, min_size=n, max_size=n)),
    )


@st.composite
def logs(
    draw: st.DrawFn, max_size: int = 12, floats: st.SearchStrategy[float] = CHROMA_EXACT_FLOATS
) -> list[tuple[int, Entry]]:
    """``(seq, entry)`` pairs in strictly increasing seq (dense from 1)."""
    return list(enumerate(draw(st.lists(entries(floats), max_size=max_size)), start=1))


@st.composite
def split_logs(
    draw: st.DrawFn, max_size: int = 12, floats: st.SearchStrategy[float] = CHROMA_EXACT_FLOATS
) -> list[list[tuple[int, Entry]]]:
    """A log cut into consecutive chunks at random points (some may be empty)."""
    log = draw(logs(max_size, floats))
    cuts = sorted(draw(st.lists(st.integers(0, len(log)), min_size=1, max_size=6)))
    bounds = [0, *cuts, len(log)]
    return [log[a:b] for a, b in itertools.pairwise(bounds)]
