"""Property: incremental compaction at random points equals the reference fold and a rebuild.

Random upserts, deletes and metadata updates over a small id space (two
collections, six ids, dimension 4) are appended through ``DeltaLog.append``
on the in-memory adapters, and compacted with ``Compactor.run_once`` into
real ChromaDB snapshots at random points, sometimes by a compactor with a
cold cache (it downloads the committed snapshot) and sometimes under an
entry limit (a run commits a prefix and the next one continues). After every
commit the committed snapshot equals the plain-Python reference fold of the
log up to hwm; at the end a rebuild from seq 1 equals both.

Float metadata has at most 13 significant digits (``CHROMA_EXACT_FLOATS``):
ChromaDB changes the last bit of some longer ones, which would make the
comparison with the plain-Python reference fail for reasons not ours.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from compactor import Compactor, Limits
from deltalog import Delete, Delta, DeltaLog, LogConfig, UpdateMetadata, Upsert
from deltalog.entry import Metadata, MetadataPatch, MetadataValue, Op
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import MemoryTable
from tests.compaction import assert_states_equal, committed_state, reference, snapshot_state
from tests.strategies import CHROMA_EXACT_FLOATS

IDS = ("a", "b", "c", "d", "e", "f")
COLLECTIONS = ("words", "lines")
KEYS = ("k1", "k2", "k3")
DIM = 4
CONFIG = LogConfig(bucket="memory", table="memory", log="prop")

values: st.SearchStrategy[MetadataValue] = st.one_of(
    st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), CHROMA_EXACT_FLOATS, st.booleans()
)
metadatas = st.dictionaries(st.sampled_from(KEYS), values, min_size=1, max_size=3)
patches = st.dictionaries(st.sampled_from(KEYS), st.none() | values, min_size=1, max_size=3)
id_lists = st.lists(st.sampled_from(IDS), min_size=1, max_size=4, unique=True)
vectors = st.floats(-1e3, 1e3, width=32)


@st.composite
def ops(draw: st.DrawFn) -> Op:
    collection = draw(st.sampled_from(COLLECTIONS))
    ids = draw(id_lists)
    n = len(ids)
    kind = draw(st.sampled_from(("upsert", "upsert", "delete", "update")))
    if kind == "delete":
        return Delete(collection=collection, ids=ids)
    if kind == "update":
        patch_list: list[MetadataPatch] = draw(st.lists(patches, min_size=n, max_size=n))
        return UpdateMetadata(collection=collection, ids=ids, metadatas=patch_list)
    meta_list: list[Metadata] | None = draw(st.none() | st.lists(metadatas, min_size=n, max_size=n))
    return Upsert(
        collection=collection,
        ids=ids,
        embeddings=draw(hnp.arrays(np.float32, (n, DIM), elements=vectors)),
        documents=draw(st.none() | st.lists(st.text(max_size=4), min_size=n, max_size=n)),
        metadatas=meta_list,
    )


@dataclass(frozen=True)
class Compact:
    """Compact here: with a cold cache (a new compactor) or not, under an entry limit or not."""

    cold: bool
    max_entries: int | None


steps = st.lists(
    st.one_of(
        st.builds(Delta, ops=st.lists(ops(), min_size=1, max_size=3)),
        st.builds(Compact, cold=st.booleans(), max_entries=st.none() | st.integers(1, 3)),
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=steps)
def test_compaction_at_random_points_equals_reference_and_rebuild(
    history: list[Delta | Compact],
) -> None:
    anyio.run(check_history, history)


async def check_history(history: list[Delta | Compact]) -> None:
    store, table = MemoryStore(), MemoryTable()
    with tempfile.TemporaryDirectory(prefix="deltalog-prop-") as tmp:
        caches = iter(Path(tmp) / f"cache-{i}" for i in range(len(history) + 1))
        async with DeltaLog.open(CONFIG, store=store, table=table) as log:
            warm = Compactor(CONFIG, cache_dir=next(caches), store=store, table=table)
            async with warm:
                for step in history:
                    if isinstance(step, Delta):
                        await log.append(step)
                    elif step.cold:
                        async with Compactor(
                            CONFIG,
                            cache_dir=next(caches),
                            store=store,
                            table=table,
                            limits=Limits(max_entries=step.max_entries),
                        ) as cold:
                            await compact_to_head(cold, log)
                    else:
                        warm.limits = Limits(max_entries=step.max_entries)
                        await compact_to_head(warm, log)
                warm.limits = Limits()
                await compact_to_head(warm, log)
                incremental = await committed_state(warm)
                rebuilt = await warm.rebuild()
                assert rebuilt.hwm == await log.head() and not rebuilt.published
                from_scratch = await snapshot_state(
                    warm, rebuilt.snapshot_key, rebuilt.snapshot_sha256
                )
            assert_states_equal(incremental, await reference(log))
            assert_states_equal(from_scratch, incremental)


async def compact_to_head(compactor: Compactor, log: DeltaLog) -> None:
    """Run until hwm reaches the head; after every commit the snapshot equals the reference."""
    head = await log.head()
    limit = compactor.limits.max_entries
    while True:
        before = (await log.table.read_state(log.keys.log_id)).hwm
        result = await compactor.run_once()
        if result.status == "nothing":
            assert result.hwm_after == head == before
            return
        limited = limit is not None and before + limit <= head
        assert result.status == "applied" and result.hwm_before == before
        assert result.hwm_after == (before + limit if limit is not None and limited else head)
        assert result.stopped == ("limit" if limited else "end")
        assert_states_equal(
            await committed_state(compactor), await reference(log, to_seq=result.hwm_after)
        )
