"""Property: incremental compaction at random points equals the reference fold and a rebuild.

Random upserts, deletes and metadata updates over a small id space (two
collections, six ids, dimension 4) are appended through ``DeltaLog.append``
on the in-memory adapters, and compacted with ``Compactor.run_once`` into
real ChromaDB at random points, under a random checkpoint policy (publish
every run, at a ratio, (almost) never, with an entry cap; sometimes a
checkpoint requested), sometimes by a compactor with a cold cache (it
downloads the checkpoint and replays the committed tail) and sometimes
under an entry limit (a run commits a prefix and the next one continues).
After every commit, the plain-Python reference fold of the log up to hwm
equals: the committed state as ``export`` writes it (the checkpoint plus
the committed tail), what a snapshot reader open all along answers, and a
rebuild from seq 1 to hwm.

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
from compactor.checkpoint import CheckpointPolicy
from deltalog import Delete, Delta, DeltaLog, LogConfig, Reader, UpdateMetadata, Upsert
from deltalog.entry import Metadata, MetadataPatch, MetadataValue, Op
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import MemoryTable
from tests.compaction import (
    State,
    assert_states_equal,
    committed_state,
    reference,
    snapshot_state,
)
from tests.conftest import examples
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
    """Compact here: with a cold cache (a new compactor) or not, under an entry limit or
    not, under a checkpoint policy, with a checkpoint requested or not."""

    cold: bool
    max_entries: int | None
    ratio: float = 0.1
    max_tail_entries: int | None = None
    requested: bool = False


steps = st.lists(
    st.one_of(
        st.builds(Delta, ops=st.lists(ops(), min_size=1, max_size=3)),
        st.builds(
            Compact,
            cold=st.booleans(),
            max_entries=st.none() | st.integers(1, 3),
            ratio=st.sampled_from((0.0, 0.1, 1.0, 1e9)),
            max_tail_entries=st.none() | st.integers(1, 4),
            requested=st.booleans(),
        ),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=steps)
def test_compaction_at_random_points_equals_reference_and_rebuild(
    history: list[Delta | Compact],
) -> None:
    anyio.run(check_history, history)


async def check_history(history: list[Delta | Compact]) -> None:
    store, table = MemoryStore(), MemoryTable()
    with tempfile.TemporaryDirectory(prefix="deltalog-prop-") as tmp:
        caches = iter(Path(tmp) / f"cache-{i}" for i in range(len(history) + 1))
        async with (
            DeltaLog.open(CONFIG, store=store, table=table) as log,
            Reader.open(CONFIG, cache_dir=Path(tmp) / "reader", store=store, table=table) as seen,
        ):
            warm = Compactor(CONFIG, cache_dir=next(caches), store=store, table=table)
            async with warm:
                for step in history:
                    if isinstance(step, Delta):
                        await log.append(step)
                        continue
                    if step.cold:
                        cache = next(caches)
                        cold = Compactor(CONFIG, cache_dir=cache, store=store, table=table)
                        async with cold:
                            _configure(cold, step)
                            await compact_to_head(cold, log, seen, step.requested)
                    else:
                        _configure(warm, step)
                        await compact_to_head(warm, log, seen, step.requested)
                warm.limits = Limits()
                await compact_to_head(warm, log, seen, False)
                incremental = await committed_state(warm)
                rebuilt = await warm.rebuild()
                assert rebuilt.hwm == await log.head() and not rebuilt.published
                from_scratch = await snapshot_state(
                    warm, rebuilt.snapshot_key, rebuilt.snapshot_sha256
                )
            assert_states_equal(incremental, await reference(log))
            assert_states_equal(from_scratch, incremental)


def _configure(compactor: Compactor, step: Compact) -> None:
    compactor.limits = Limits(max_entries=step.max_entries)
    compactor.policy = CheckpointPolicy(step.ratio, step.max_tail_entries, None)


async def compact_to_head(
    compactor: Compactor, log: DeltaLog, seen: Reader, requested: bool
) -> None:
    """Run until hwm reaches the head; after every commit, export, a snapshot reader and a
    rebuild equal the reference at hwm."""
    head = await log.head()
    limit = compactor.limits.max_entries
    while True:
        before = await log.table.read_state(log.keys.log_id)
        result = await compactor.run_once(checkpoint=requested)
        requested = False
        if result.status in ("nothing", "checkpointed"):
            assert result.hwm_after == head == before.hwm
            if result.status == "nothing":
                return
        else:
            limited = limit is not None and before.hwm + limit <= head
            assert result.status == "applied" and result.hwm_before == before.hwm
            assert result.hwm_after == (
                before.hwm + limit if limit is not None and limited else head
            )
            assert result.stopped == ("limit" if limited else "end")
        want = await reference(log, to_seq=result.hwm_after)
        assert_states_equal(await committed_state(compactor), want)
        assert await _read_everything(seen) == _visible(want)
        rebuilt = await compactor.rebuild(result.hwm_after)
        assert_states_equal(
            await snapshot_state(compactor, rebuilt.snapshot_key, rebuilt.snapshot_sha256), want
        )
        await log.store.delete(rebuilt.snapshot_key)  # an unpublished rebuild: not retained


Visible = dict[str, dict[str, tuple[str | None, Metadata | None]]]


def _visible(state: State) -> Visible:
    """What a reader's ``get`` shows of a state: documents and metadata by id."""
    return {
        c: {i: (r.document, r.metadata or None) for i, r in records.items()}
        for c, records in state.items()
        if records
    }


async def _read_everything(reader: Reader) -> Visible:
    got: Visible = {}
    for collection in COLLECTIONS:
        rows = await reader.get(collection=collection)
        if rows["ids"]:
            got[collection] = {
                i: (d, m or None)
                for i, d, m in zip(rows["ids"], rows["documents"], rows["metadatas"], strict=True)
            }
    return got
