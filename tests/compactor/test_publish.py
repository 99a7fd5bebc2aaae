"""Publishing and retention, on the memory adapters and on moto's server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from compactor import RebuildResult
from deltalog import DeltaLog, Reader
from deltalog.keys import STATE_SK
from deltalog.storage.store import ObjectInfo, ObjectStore
from deltalog.storage.table import Commit, LogState, Table
from tests.builders import delta
from tests.compaction import Crash, FaultyTable
from tests.compactor.conftest import Backend
from tests.faulty import FaultyStore

EVERY_RUN: dict[str, Any] = {"checkpoint_ratio": 0}
"""Compactor options: every run that applies anything publishes a checkpoint."""


async def snapshot_keys(log: DeltaLog) -> list[str]:
    """The snapshots (retention's ``seen`` markers left out)."""
    listed = log.store.list_after(log.keys.snapshots_prefix)
    return [info.key async for info in listed if log.keys.snapshot_hwm(info.key) is not None]


async def all_keys(log: DeltaLog) -> list[str]:
    """Every key under the snapshots prefix, markers included."""
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
        backend.compactor(cache_dir=tmp_path, table=table, retain=2, **EVERY_RUN) as c,
    ):
        committed: list[str] = []
        for name in ("a", "b", "c", "d"):
            await log.append(delta(rng, name))
            result = await c.run_once()
            assert result.snapshot_key is not None
            committed.append(result.snapshot_key)
            assert await snapshot_keys(log) == sorted(committed[-2:])
        await log.append(delta(rng, "e"))
        table.crash_on = "before-checkpoint-commit"  # after the upload
        with pytest.raises(Crash):
            await c.run_once()
        kept = await snapshot_keys(log)
        assert set(committed[-2:]) < set(kept) and len(kept) == 3, "nothing deleted uncommitted"
        (orphan,) = set(kept) - set(committed)
        await log.append(delta(rng, "f"))  # "e" was committed before the upload
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
        backend.compactor(cache_dir=tmp_path, retain=2, **EVERY_RUN) as keeper,
        backend.compactor(cache_dir=tmp_path, retain=2, orphan_grace=0, **EVERY_RUN) as sweeper,
    ):
        committed: list[str] = []
        orphans: list[str] = []
        for i, compactor in enumerate((keeper, keeper, keeper, sweeper)):
            await log.append(delta(rng, f"d{i}"))
            # A run killed between its upload and its commit, at the hwm to come,
            # under the token it held (the next run's acquire goes past it):
            token = (await log.table.read_state(log.keys.log_id)).token
            orphan = log.keys.snapshot(await log.head(), token, f"orphan{i}")
            assert await log.store.put_if_absent(orphan, b"never committed")
            orphans.append(orphan)
            result = await compactor.run_once()
            assert result.snapshot_key is not None
            committed.append(result.snapshot_key)
            if compactor is keeper:  # orphans younger than the grace stay, uncounted, seen
                seen = [log.keys.seen(o) for o in orphans]
                assert set(await all_keys(log)) == {*committed[-2:], *orphans, *seen}
        # The sweeper (grace 0) deleted every orphan, and the markers with them:
        # each one's token is below the state's, so no commit can ever name it.
        assert set(await all_keys(log)) == {*committed[-2:]}
        state = await log.table.read_state(log.keys.log_id)
        assert state.recent_snapshots == tuple(reversed(committed))


class Gate:
    """Once armed, the next call that reaches it waits for ``go`` (``paused`` says it did)."""

    def __init__(self) -> None:
        self.armed = False
        self.paused = anyio.Event()
        self.go = anyio.Event()

    async def __call__(self) -> None:
        if self.armed:
            self.armed = False
            self.paused.set()
            with anyio.fail_after(60):
                await self.go.wait()


class GatedTable:
    """``inner``, with a gate after ``read_state`` (which returns the state it read
    before the pause, stale by then) and one before ``commit``."""

    def __init__(self, inner: Table) -> None:
        self.inner = inner
        self.read_gate, self.commit_gate = Gate(), Gate()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read_state(self, log_id: str, *, sk: str = STATE_SK) -> LogState:
        state = await self.inner.read_state(log_id, sk=sk)
        await self.read_gate()
        return state

    async def commit(
        self,
        log_id: str,
        owner: str,
        token: int,
        *,
        prev_hwm: int,
        commit: Commit,
        now: float,
        sk: str = STATE_SK,
    ) -> LogState:
        await self.commit_gate()
        return await self.inner.commit(
            log_id, owner, token, prev_hwm=prev_hwm, commit=commit, now=now, sk=sk
        )


class GatedStore:
    """``inner``, with a gate before each listing of the snapshots."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.list_gate = Gate()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def list_after(
        self, prefix: str, start_after: str = "", *, page_size: int = 1000
    ) -> AsyncIterator[ObjectInfo]:
        if prefix.endswith("/snapshots/"):
            await self.list_gate()
        async for info in self.inner.list_after(prefix, start_after, page_size=page_size):
            yield info


@pytest.mark.parametrize("where", ["state-read", "listing", "rebuild-upload"])
async def test_retention_paused_across_a_forced_rebuild_keeps_the_rollback(
    backend: Backend, rng: np.random.Generator, tmp_path: Path, where: str
) -> None:
    """Retention must never delete a key the state could point to after its read.

    Compactor P (retain 1, orphan grace 0: it deletes all it may) commits hwm
    7, releases the lease and is paused in its retention: at its state read
    (the stale state returned after the pause) or before its listing. A
    ``rebuild(to_seq=3, publish=True, force=True)`` commits checkpoint K at 3,
    below the hwm P read. P resumes: K must stay, and the log must stay
    readable and compactable. In ``rebuild-upload`` P, paused before its
    listing, resumes once K is uploaded and the rebuild is held before its
    commit; P's retention ends, then the rebuild commits.
    """
    p_table, p_store = GatedTable(backend.table), GatedStore(backend.store)
    q_table = GatedTable(backend.table)
    p = backend.compactor(
        cache_dir=tmp_path / "p",
        table=p_table,
        store=p_store,
        retain=1,
        orphan_grace=0,
        **EVERY_RUN,
    )
    q = backend.compactor(cache_dir=tmp_path / "q", table=q_table, retain=1, orphan_grace=0)
    async with backend.open_log() as log, p, q:
        for i in range(6):
            await log.append(delta(rng, f"d{i}"))
        assert (await p.run_once()).hwm_after == 6
        await log.append(delta(rng, "d6"))
        paused = p_table.read_gate if where == "state-read" else p_store.list_gate
        paused.armed = True
        rolled_back: list[RebuildResult] = []
        p_done = anyio.Event()

        async def rebuild() -> None:
            rolled_back.append(await q.rebuild(to_seq=3, publish=True, force=True))

        async def run_p() -> None:
            await p.run_once()
            p_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_p)
            with anyio.fail_after(60):
                await paused.paused.wait()
            if where == "rebuild-upload":
                q_table.commit_gate.armed = True
                tg.start_soon(rebuild)
                with anyio.fail_after(60):
                    await q_table.commit_gate.paused.wait()
                paused.go.set()
                with anyio.fail_after(60):
                    await p_done.wait()  # its retention listed K, uncommitted yet
                q_table.commit_gate.go.set()
            else:
                await rebuild()
                paused.go.set()
        (k,) = rolled_back
        state = await log.table.read_state(log.keys.log_id)
        assert (state.hwm, state.snapshot_key) == (3, k.snapshot_key)
        assert k.snapshot_key in await snapshot_keys(log), "retention deleted it"
        async with Reader.open(
            backend.config, cache_dir=tmp_path / "r", store=backend.store, table=backend.table
        ) as reader:
            assert reader.statistics().hwm == 3
        after = await q.run_once()
        assert (after.status, after.hwm_after) == ("applied", 7)


async def test_a_failed_cleanup_does_not_fail_a_committed_run(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    store = FaultyStore(backend.store)
    async with (
        backend.open_log() as log,
        backend.compactor(cache_dir=tmp_path, store=store, retain=1, **EVERY_RUN) as c,
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
