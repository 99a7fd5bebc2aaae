"""How often Chroma saves a collection's HNSW index: every ``PERSIST_EVERY`` records.

Chroma (1.5, embedded) saves a collection's HNSW index to disk only once
``sync_threshold`` records (1,000 by default) were written since it last
saved it, and closing the client does not save it: the records written
since stay in Chroma's write-ahead log (its SQLite file), and the next
process that opens the directory inserts them into the index again, on its
first operation on the collection, which takes as long as inserting them
took the first time. A compactor closes its copy to publish each
checkpoint, and every reader opens each checkpoint, so each of them paid
for up to 999 inserts per collection again (measured on a 20,000-vector
collection of 384 dims: 800 records written, then the client closed; the
first ``get`` after reopening it took 2.5-3.1 s, against 0.10-0.13 s with a
threshold of 100, and the writes cost the same, 2.6-2.7 s, with either).

So every collection a ``ChromaSink`` opens saves its index every
``PERSIST_EVERY`` records (``persist_often``; Chroma's ``batch_size``, the
lowest threshold it accepts). Chroma reads the threshold when it loads the
collection's index, on its first operation: it is set before that, and it
is kept in the collection's configuration (a plain Chroma client sees
``sync_threshold: 100``), so a copy opened later loads with it. The
distinct index's collections are created with it (``DISTINCT_HNSW``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chromadb.api.models.Collection import Collection

__all__ = ["PERSIST_EVERY", "persist_often"]

PERSIST_EVERY = 100
"""Records written between two saves of a collection's HNSW index (Chroma's
``sync_threshold``; its default is 1,000)."""


def persist_often(collection: Collection) -> bool:
    """Lower the collection's ``sync_threshold`` to ``PERSIST_EVERY`` (blocking).

    Call it before the collection's first operation (a ``get``, ``add`` or
    query loads its index with the threshold it had). Returns whether it was
    changed; a collection without HNSW settings (another index) is left alone.
    """
    config = getattr(collection, "configuration_json", None) or {}
    hnsw = config.get("hnsw")
    if not isinstance(hnsw, dict):
        return False
    threshold = hnsw.get("sync_threshold")
    if isinstance(threshold, int) and threshold <= PERSIST_EVERY:
        return False
    collection.modify(configuration={"hnsw": {"sync_threshold": PERSIST_EVERY}})
    return True
