"""Shard compactors (DESIGN.md "Shards"), on the memory adapters and on moto's server.

A log of 3 shards: each shard's compactor folds only its records, under its
own lease, state item, checkpoint keys and live copy; together they hold
the whole fold. Shards never wait on each other: a busy, crashed or failing
shard leaves the others to commit. Holes and poison entries stay the log's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compactor import Compactor
from compactor.shards import ShardedCompactor
from deltalog import DeltaLog
from deltalog.codec import Frame
from deltalog.errors import CorruptEntry, Resharded
from deltalog.keys import Shard
from deltalog.shards import init_layout
from tests.builders import delete, delta, patch
from tests.compaction import (
    Crash,
    State,
    assert_states_equal,
    committed_state,
    faulty_sinks,
    reference,
)
from tests.compactor.conftest import Backend

SHARDS = 3


async def sharded_log(backend: Backend, rng: np.random.Generator, deltas: int = 6) -> None:
    """Make the backend's log one of ``SHARDS`` shards and append deltas to it."""
    await init_layout(backend.table, backend.config.keys, SHARDS, now=time.time())
    async with backend.open_log() as log:
        for i in range(deltas):
            await log.append(delta(rng, f"r{i}", rows=5))
        await log.append(patch(["r0#1", "r1#2"], [{"k": 1}, {"k": None}]))
        await log.append(delete("r2#0", "r2#3"))


def sharded(backend: Backend, tmp_path: Path, **options: Any) -> ShardedCompactor:
    return ShardedCompactor(
        backend.config,
        store=backend.store,
        table=backend.table,
        cache_dir=tmp_path / "cache",
        lease_ttl=backend.lease_ttl,
        **options,
    )


async def union_of_shards(c: ShardedCompactor) -> State:
    """Every shard's committed state (as export writes it), checked to hold only its ids."""
    union: State = {}
    for compactor in c.compactors:
        shard = compactor.shard
        assert shard is not None
        for collection, records in (await committed_state(compactor)).items():
            assert all(shard.owns(collection, i) for i in records), (shard, collection)
            union.setdefault(collection, {}).update(records)
    return union


async def test_each_shard_folds_its_own_records_and_together_they_are_the_log(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    await sharded_log(backend, rng)
    async with sharded(backend, tmp_path) as c, backend.open_log() as log:
        assert [compactor.shard for compactor in c.compactors] == [
            Shard(1, i, SHARDS) for i in range(SHARDS)
        ]
        results = await c.run_once()
        head = await log.head()
        assert [(r.shard, r.generation, r.status, r.hwm_after) for r in results] == [
            (i, 1, "applied", head) for i in range(SHARDS)
        ]
        assert sum(r.vectors_upserted for r in results) == 28, "30 put, 2 deleted in the run"
        assert all(0 < r.vectors_upserted < 28 for r in results), "every shard has some"
        assert_states_equal(await union_of_shards(c), await reference(log))
        for compactor, result in zip(c.compactors, results, strict=True):
            state = await compactor.read_state()
            assert state.hwm == head and state.snapshot_key == result.snapshot_key
            assert result.snapshot_key is not None
            assert result.snapshot_key.startswith(compactor.keys.snapshots_prefix)
        assert (await log.table.read_state(log.keys.log_id)).hwm == 0, "the log's own is unused"
        assert len({compactor.cache.root for compactor in c.compactors}) == SHARDS


async def test_a_compactor_that_ignores_the_layout_is_refused(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """The log's own state item is retired when the log is created sharded."""
    await sharded_log(backend, rng, deltas=1)
    async with backend.compactor(cache_dir=tmp_path) as plain:
        with pytest.raises(Resharded, match="generation 1"):
            await plain.run_once()


async def test_a_shard_reads_after_its_own_hwm(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    await sharded_log(backend, rng, deltas=3)
    async with sharded(backend, tmp_path, shards=[1]) as one:
        (first,) = await one.run_once()
    assert (first.shard, first.hwm_before) == (1, 0)
    async with backend.open_log() as log:
        for i in range(3, 6):
            await log.append(delta(rng, f"r{i}", rows=5))
        head = await log.head()
    async with sharded(backend, tmp_path) as c, backend.open_log() as log:
        results = await c.run_once()
        assert [r.hwm_before for r in results] == [0, first.hwm_after, 0]
        assert {r.hwm_after for r in results} == {head}
        assert_states_equal(await union_of_shards(c), await reference(log))


async def test_shards_never_wait_on_each_other(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """A busy shard and a crashing shard: the third commits all the same."""
    await sharded_log(backend, rng)
    shard = Shard(1, 0, SHARDS)
    async with backend.compactor(shard=shard, cache_dir=tmp_path / "other") as other:
        await other._keeper().acquire()  # another holds shard 0's lease
    _, crashing = faulty_sinks(before=1)
    async with sharded(backend, tmp_path / "a", shards=[1], sink_factory=crashing) as one:
        (outcome,) = await one.run_each()
    assert isinstance(outcome.error, Crash)
    async with sharded(backend, tmp_path / "b") as c, backend.open_log() as log:
        outcomes = await c.run_each()
        assert [o.result.status if o.result else None for o in outcomes] == [
            "busy",
            "applied",
            "applied",
        ]
        assert all(o.error is None for o in outcomes)
        head = await log.head()
        assert [(await k.read_state()).hwm for k in c.compactors] == [0, head, head]


async def test_any_shard_seals_a_hole_and_the_others_pass_its_seal(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    await sharded_log(backend, rng, deltas=2)
    async with backend.open_log() as log:
        await log.table.reserve(log.keys.log_id)  # a hole
        await log.append(delta(rng, "after", rows=5))
        head = await log.head()
    async with sharded(backend, tmp_path, shards=[2], grace=0) as one:
        (sealer,) = await one.run_once()
    assert (sealer.seals_written, sealer.hwm_after) == (1, head)
    async with sharded(backend, tmp_path, grace=0) as c, backend.open_log() as log:
        results = await c.run_once()
        assert [r.seals_written for r in results] == [0, 0, 0]
        assert {r.hwm_after for r in results} == {head}
        assert_states_equal(await union_of_shards(c), await reference(log))


async def test_a_poison_entry_stops_every_shard_at_its_seq(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Whichever shards its records belong to, a corrupt entry is the log's: all stop."""
    await sharded_log(backend, rng, deltas=2)
    async with backend.open_log() as log:
        bad = await log.table.reserve(log.keys.log_id)
        await log.store.put_if_absent(log.keys.entry(bad), Frame(b"\x93garbage").at(bad))
        await log.append(delta(rng, "after", rows=5))
    async with sharded(backend, tmp_path) as c:
        outcomes = await c.run_each()
        assert all(isinstance(o.error, CorruptEntry) and o.error.seq == bad for o in outcomes)
        assert [(await k.read_state()).hwm for k in c.compactors] == [bad - 1] * SHARDS


async def test_rebuild_of_one_shard_equals_its_committed_state(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    await sharded_log(backend, rng)
    async with sharded(backend, tmp_path) as c:
        await c.run_once()
        for compactor in c.compactors:
            checked = await compactor.verify()
            assert checked.ok, checked.differences
            rebuilt = await compactor.rebuild()
            assert rebuilt.snapshot_key.startswith(compactor.keys.snapshots_prefix)


async def test_a_shard_compactor_alone_shares_nothing_with_the_log_index(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """``Compactor(config, shard=...)``: the Python API for one shard."""
    await sharded_log(backend, rng, deltas=2)
    shard = Shard(1, 2, SHARDS)
    async with Compactor(
        backend.config,
        shard=shard,
        store=backend.store,
        table=backend.table,
        cache_dir=tmp_path,
    ) as compactor:
        result = await compactor.run_once()
        assert (result.shard, result.name) == (2, f"{backend.config.log} shard 2")
        assert f"{backend.config.log} shard 2: applied" in result.summary()
    async with DeltaLog.open(backend.config, store=backend.store, table=backend.table) as log:
        assert (await log.table.read_state(log.keys.log_id)).hwm == 0


async def test_each_shards_retention_deletes_only_its_own_checkpoints(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Retention is scoped to the shard: a shard's superseded checkpoints go, and no
    shard's pass ever deletes another shard's (nor the log's own index's)."""
    own = backend.config.keys.snapshots_prefix  # the log's own index, before it had shards
    await backend.store.put_if_absent(f"{own}{1:020d}-{1:012d}-old.tar", b"own")
    await sharded_log(backend, rng, deltas=2)

    async def snapshots() -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        async for info in backend.store.list_after(own):
            found.setdefault(info.key[len(own) :].split("/")[0], []).append(info.key)
        return found

    options = {"retain": 1, "orphan_grace": 0.0}
    async with sharded(backend, tmp_path, **options) as c, backend.open_log() as log:
        for i in range(3):
            await log.append(delta(rng, f"more{i}", rows=6))
            await c.run_once(checkpoint=True)
        async with sharded(backend, tmp_path / "one", shards=[0], **options) as zero:
            for i in range(2):
                await log.append(delta(rng, f"zero{i}", rows=6))
                await zero.run_once(checkpoint=True)
        states = [await k.read_state() for k in c.compactors]
        found = await snapshots()
    assert found.pop(f"{1:020d}-{1:012d}-old.tar") == [f"{own}{1:020d}-{1:012d}-old.tar"]
    assert found == {
        k.shard.name: [state.snapshot_key]
        for k, state in zip(c.compactors, states, strict=True)
        if k.shard is not None
    }, "each shard keeps exactly its committed checkpoint (retain 1), all of them kept"
