"""Resharding (DESIGN.md "Shards"): a new generation rebuilt from the log while the old
one serves and compacts; the switch; the fence of the old generation; retirement.

On the memory adapters and on moto's server, with real Chroma: a reshard under
concurrent appends and compactions equals the reference fold; a compactor of
the old generation caught mid-run by the switch commits nothing; a reader
opened before the reshard goes on to the new shards; an unsharded log is
sharded the same way; the old checkpoints are deleted once the grace is over.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from compactor import Compactor
from compactor.publish import list_snapshots
from compactor.reshard import reshard
from compactor.shards import ShardedCompactor
from deltalog import Reader
from deltalog.errors import LeaseLost
from deltalog.keys import Shard
from deltalog.shards import init_layout
from tests.compaction import (
    State,
    assert_states_equal,
    committed_state,
    faulty_sinks,
    log_entries,
    reference,
)
from tests.compactor.conftest import Backend
from tests.oracle import oracle_state
from tests.reading import assert_get_matches, random_word_deltas

LEASE_TTL = 10.0
"""No lease expires in these tests: long enough for moto's one server, which every task
shares here, to answer a renewal on a loaded machine."""


def _sharded(backend: Backend, tmp_path: Path, **options: Any) -> ShardedCompactor:
    return ShardedCompactor(
        backend.config,
        store=backend.store,
        table=backend.table,
        cache_dir=tmp_path / "cache",
        lease_ttl=LEASE_TTL,
        **options,
    )


async def _union(sharded: ShardedCompactor) -> State:
    union: State = {}
    for compactor in sharded.current:
        for name, records in (await committed_state(compactor)).items():
            union.setdefault(name, {}).update(records)
    return union


async def _reshard(backend: Backend, tmp_path: Path, shards: int, **kw: Any) -> Any:
    return await reshard(
        backend.config,
        shards,
        store=backend.store,
        table=backend.table,
        cache_dir=tmp_path / "cache",
        lease_ttl=LEASE_TTL,
        poll=0.05,
        **kw,
    )


async def test_a_reshard_under_concurrent_appends_equals_the_reference_fold(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    await init_layout(backend.table, backend.config.keys, 2, now=time.time())
    async with backend.open_log() as log:
        for delta in random_word_deltas(rng, 12):
            await log.append(delta)
        done = anyio.Event()

        async def append() -> None:
            for delta in random_word_deltas(rng, 30):
                await log.append(delta)
                await anyio.sleep(0.01)
            done.set()

        async def compact_the_old_generation() -> None:
            async with _sharded(backend, tmp_path, generations="current") as old:
                while not done.is_set():
                    await old.run_each()  # the old shards serve and compact meanwhile
                    await anyio.sleep(0.01)

        async with _reader_of(backend, tmp_path) as reader, anyio.create_task_group() as tg:
            tg.start_soon(append)
            tg.start_soon(compact_the_old_generation)
            result = await _reshard(backend, tmp_path, 3, lag=0)
            assert (result.shards_before, result.shards_after, result.switched) == (2, 3, True)
            assert (result.generation_before, result.generation_after) == (1, 2)
            await reader.refresh()  # a reader from before the switch moves on to the new shards
            assert reader.statistics().shards == 3
            assert reader.statistics().hwm >= result.floor
        layout = await log.table.read_layout(log.keys.log_id)
        assert (layout.shards, layout.generation, layout.pending_generation) == (3, 2, 0)
        assert [r.generation for r in layout.retiring] == [1]
        async with _sharded(backend, tmp_path) as new:
            assert [c.shard for c in new.compactors] == [Shard(2, i, 3) for i in range(3)]
            await new.run_once()
            assert_states_equal(await _union(new), await reference(log))
        async with _reader_of(backend, tmp_path / "late") as late:
            want = oracle_state(await log_entries(log)).get("words", {})
            assert_get_matches(await late.get(collection="words"), want, "after the reshard")
        again = await _reshard(backend, tmp_path, 3)
        assert not again.switched, "already 3 shards: nothing to do"


def _reader_of(backend: Backend, tmp_path: Path) -> Any:
    return Reader.open(
        backend.config,
        cache_dir=tmp_path / "reader",
        store=backend.store,
        table=backend.table,
    )


async def test_an_old_compactor_caught_mid_run_by_the_switch_commits_nothing(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    await init_layout(backend.table, backend.config.keys, 2, now=time.time())
    async with backend.open_log() as log:
        for delta in random_word_deltas(rng, 10):
            await log.append(delta)
        gate, entered = anyio.Event(), anyio.Event()
        _, held = faulty_sinks(gate=gate, entered=entered)
        old = Compactor(
            backend.config,
            shard=Shard(1, 0, 2),
            store=backend.store,
            table=backend.table,
            cache_dir=tmp_path / "old",
            lease_ttl=LEASE_TTL,
            sink_factory=held,
        )
        failure: list[BaseException] = []

        async def run_old() -> None:
            try:
                await old.run_once()
            except LeaseLost as exc:
                failure.append(exc)

        async with old, anyio.create_task_group() as tg:
            tg.start_soon(run_old)
            with anyio.fail_after(30):
                await entered.wait()
            await _reshard(backend, tmp_path, 3, lag=0)  # builds, freezes, switches
            gate.set()  # the old run goes on: its renewal or its commit is refused
        assert failure, "the old generation's run was fenced"
        assert (await old.read_state()).hwm == 0, "nothing committed to the retired state"


async def test_an_unsharded_log_is_resharded_and_its_own_index_retires(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    async with backend.open_log() as log:
        for delta in random_word_deltas(rng, 10):
            await log.append(delta)
        async with backend.compactor(cache_dir=tmp_path / "one") as one:
            await one.run_once(checkpoint=True)
        own = [i.key async for i in list_snapshots(log.store, log.keys)]
        assert own
        async with _reader_of(backend, tmp_path) as reader:
            result = await _reshard(backend, tmp_path, 2, lag=0)
            assert (result.generation_before, result.generation_after) == (0, 1)
            await reader.refresh()
            assert reader.statistics().shards == 2
        async with _sharded(backend, tmp_path, retire_grace=0) as new:
            await new.run_once()  # and retires generation 0, its grace being 0
            assert_states_equal(await _union(new), await reference(log))
            assert not new.layout.retiring
        assert [i.key async for i in list_snapshots(log.store, log.keys)] == []
        assert (await log.table.read_state(log.keys.log_id)).retired_by == 1


async def test_reads_never_go_back_at_the_switch(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """The new shards may lag the old cut at the switch (``lag``): readers fold them up to
    the layout's floor, the old cut, and never show less than before the switch."""
    await init_layout(backend.table, backend.config.keys, 2, now=time.time())
    async with backend.open_log() as log:
        for delta in random_word_deltas(rng, 30):
            await log.append(delta)
        head = await log.head()
        async with _sharded(backend, tmp_path) as old:
            await old.run_once()
        result = await _reshard(backend, tmp_path, 3, lag=10**6, build_seconds=0.001)
        assert result.floor == head
        async with _sharded(backend, tmp_path, generations="current") as new:
            hwms = [s.hwm for s in await new.states()]
            assert min(hwms) < head, f"the build stopped early: {hwms}"
        async with _reader_of(backend, tmp_path) as reader:
            assert reader.statistics().hwm == head
            want = oracle_state(await log_entries(log)).get("words", {})
            assert_get_matches(await reader.get(collection="words"), want, "at the floor")
