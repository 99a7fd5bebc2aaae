"""Publishing and retention, on the memory adapters and on moto's server."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from deltalog import DeltaLog
from tests.builders import delta
from tests.compaction import Crash, FaultyTable
from tests.compactor.conftest import Backend
from tests.faulty import FaultyStore


async def snapshot_keys(log: DeltaLog) -> list[str]:
    return [info.key async for info in log.store.list_after(log.keys.snapshots_prefix)]


async def _keys(backend: Backend, *prefixes: str) -> list[str]:
    return [info.key for prefix in prefixes async for info in backend.store.list_after(prefix)]


async def test_retention_never_deletes_another_logs_keys_under_its_prefix(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Root "" + log x and root x + log snapshots: the first's snapshots prefix holds the second."""
    x = backend.config.log
    outer = replace(backend.config, root="", log=x)
    inner = replace(backend.config, root=x, log="snapshots")
    assert inner.keys.prefix.startswith(outer.keys.snapshots_prefix)
    async with backend.open_log(inner) as log:
        await log.append(delta(rng, "inner"))
        async with backend.compactor(inner, cache_dir=tmp_path / "inner") as c:
            kept = await c.run_once()
    inner_prefixes = (inner.keys.entries_prefix, inner.keys.snapshots_prefix)
    inner_keys = await _keys(backend, *inner_prefixes)
    assert kept.snapshot_key in inner_keys and len(inner_keys) == 2  # an entry, a snapshot

    async with (
        backend.open_log(outer) as log,
        backend.compactor(outer, cache_dir=tmp_path / "outer", retain=1, orphan_grace=0) as c,
    ):
        for i in range(3):
            await log.append(delta(rng, f"outer{i}"))
            assert (await c.run_once()).status == "applied"
        outer_snapshots = [
            k for k in await _keys(backend, outer.keys.snapshots_prefix) if k not in inner_keys
        ]
        assert len(outer_snapshots) == 1, "retention still works for the outer log"
    assert await _keys(backend, *inner_prefixes) == inner_keys, "the inner log lost keys"
    async with backend.compactor(inner, cache_dir=tmp_path / "fresh") as c:
        assert (await c.verify()).ok


async def test_retention_deletes_old_snapshots_only_after_a_commit(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    table = FaultyTable(backend.table)
    async with (
        backend.open_log() as log,
        backend.compactor(cache_dir=tmp_path, table=table, retain=2) as c,
    ):
        committed: list[str] = []
        for name in ("a", "b", "c", "d"):
            await log.append(delta(rng, name))
            result = await c.run_once()
            assert result.snapshot_key is not None
            committed.append(result.snapshot_key)
            assert await snapshot_keys(log) == sorted(committed[-2:])
        await log.append(delta(rng, "e"))
        table.crash_on = "before-commit"
        with pytest.raises(Crash):
            await c.run_once()
        kept = await snapshot_keys(log)
        assert set(committed[-2:]) < set(kept) and len(kept) == 3, "nothing deleted uncommitted"
        (orphan,) = set(kept) - set(committed)
        result = await c.run_once()
        assert result.snapshot_key is not None
        # The crashed run's upload is an orphan: it never counts toward retain,
        # and it is young (the grace is an hour), so it stays for now.
        assert await snapshot_keys(log) == sorted([committed[-1], orphan, result.snapshot_key])
        state = await log.table.read_state(log.keys.log_id)
        assert state.snapshot_key == result.snapshot_key
        assert state.recent_snapshots[:2] == (result.snapshot_key, committed[-1])


async def test_retention_keeps_committed_snapshots_and_deletes_orphans_after_a_grace(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    async with (
        backend.open_log() as log,
        backend.compactor(cache_dir=tmp_path, retain=2) as keeper,
        backend.compactor(cache_dir=tmp_path, retain=2, orphan_grace=0) as sweeper,
    ):
        committed: list[str] = []
        orphans: list[str] = []
        for i, compactor in enumerate((keeper, keeper, keeper, sweeper)):
            await log.append(delta(rng, f"d{i}"))
            # A run killed between its upload and its commit, at the hwm to come:
            orphan = log.keys.snapshot(await log.head(), 90 + i, f"orphan{i}")
            assert await log.store.put_if_absent(orphan, b"never committed")
            orphans.append(orphan)
            result = await compactor.run_once()
            assert result.snapshot_key is not None
            committed.append(result.snapshot_key)
            if compactor is keeper:  # orphans younger than the grace stay, uncounted
                assert set(await snapshot_keys(log)) == {*committed[-2:], *orphans}
        # The sweeper (grace 0) deleted every orphan below the committed hwm; the
        # one at the committed hwm may be a newer owner's upload about to commit.
        assert set(await snapshot_keys(log)) == {*committed[-2:], orphans[-1]}
        state = await log.table.read_state(log.keys.log_id)
        assert state.recent_snapshots == tuple(reversed(committed))


async def test_a_failed_cleanup_does_not_fail_a_committed_run(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    store = FaultyStore(backend.store)
    async with (
        backend.open_log() as log,
        backend.compactor(cache_dir=tmp_path, store=store, retain=1) as c,
    ):
        await log.append(delta(rng, "a"))
        first = await c.run_once()
        await log.append(delta(rng, "b"))
        store.refuse_deletes = True
        second = await c.run_once()
        assert second.status == "applied"
        assert (await log.table.read_state(log.keys.log_id)).snapshot_key == second.snapshot_key
        assert await snapshot_keys(log) == sorted(
            filter(None, [first.snapshot_key, second.snapshot_key])
        ), "the old snapshot stays until a later run deletes it"
        store.refuse_deletes = False
        await log.append(delta(rng, "c"))
        third = await c.run_once()
        assert await snapshot_keys(log) == [third.snapshot_key]
