"""The compactor against moto's server and real ChromaDB, and under faults."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from compactor import Compactor, Limits
from deltalog import (
    Closed,
    ConfigurationError,
    CorruptEntry,
    DataError,
    Delta,
    DeltaLog,
    InvalidInput,
    LeaseLost,
    LogConfig,
    Unavailable,
    UpdateMetadata,
)
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import LogState, MemoryTable
from deltalog.storage.transfer import Transferred
from tests.builders import delete, delta, patch
from tests.compaction import (
    Crash,
    FaultyTable,
    StalledRenewTable,
    assert_states_equal,
    committed_state,
    faulty_sinks,
    reference,
    snapshot_state,
)

MEMORY = LogConfig(bucket="memory", table="memory", log="mem")


async def _mixed_history(log: DeltaLog, rng: np.random.Generator, start: int, n: int) -> None:
    """Upserts, re-upserts, deletes and metadata patches over a small id space."""
    for i in range(start, start + n):
        await log.append(delta(rng, f"r{i % 5}", rows=3))
        if i % 3 == 1:
            await log.append(delete(f"r{(i + 2) % 5}#1"))
        if i % 4 == 2:
            await log.append(
                patch([f"r{i % 5}#0", f"r{i % 5}#2"], [{"label": "TOTAL", "ok": None}, {"n": 99}])
            )


async def test_incremental_equals_rebuild_and_reference(
    log: DeltaLog, config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    await _mixed_history(log, rng, 0, 6)
    async with Compactor(config, cache_dir=tmp_path) as compactor:
        first = await compactor.run_once()
        assert first.status == "applied"
        assert (first.hwm_before, first.hwm_after) == (0, await log.head())
        await _mixed_history(log, rng, 6, 6)
        second = await compactor.run_once()
        assert second.status == "applied"
        assert second.hwm_before == first.hwm_after
        assert second.hwm_after == await log.head()
        assert (await compactor.run_once()).status == "nothing"

        incremental = await committed_state(compactor)
        assert_states_equal(incremental, await reference(log))
        rebuilt = await compactor.rebuild()
        assert rebuilt.hwm == second.hwm_after and not rebuilt.published
        assert_states_equal(
            await snapshot_state(compactor, rebuilt.snapshot_key, rebuilt.snapshot_sha256),
            incremental,
        )
        verified = await compactor.verify()
        assert verified.ok, verified.differences
        state = await log.table.read_state(log.keys.log_id)
        assert state.snapshot_key == second.snapshot_key and state.owner is None


async def test_snapshot_opens_with_plain_chromadb(
    log: DeltaLog, config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    """The published archive is a plain tar of a Chroma directory."""
    import tarfile

    import chromadb

    await log.append(delta(rng, "a", rows=4))
    async with Compactor(config, cache_dir=tmp_path / "cache") as compactor:
        result = await compactor.run_once()
    assert result.snapshot_key is not None and result.snapshot_key.endswith(".tar")
    archive = tmp_path / "snap.tar"
    assert await log.store.download_file(result.snapshot_key, archive)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "plain", filter="data")
    client = chromadb.PersistentClient(path=str(tmp_path / "plain"))
    try:
        got = client.get_collection("words", embedding_function=None).get()
        assert sorted(got["ids"]) == [f"a#{i}" for i in range(4)]
    finally:
        client.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("where", "sink_faults", "table_fault"),
    [
        ("before apply", {"before": 1}, None),
        ("after apply", {"after": 1}, None),
        ("before commit", {}, "before-commit"),
        ("after commit", {}, "after-commit"),
        ("before release", {}, "release"),
    ],
)
async def test_a_crash_at_any_step_converges(
    where: str,
    sink_faults: dict[str, int],
    table_fault: str | None,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    store, table = MemoryStore(), FaultyTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        await _mixed_history(log, rng, 0, 4)
        async with Compactor(MEMORY, cache_dir=tmp_path, store=store, table=table) as ok:
            await ok.run_once()
        await _mixed_history(log, rng, 4, 4)
        _, factory = faulty_sinks(before=sink_faults.get("before"), after=sink_faults.get("after"))
        table.crash_on = table_fault
        crashing = Compactor(
            MEMORY,
            cache_dir=tmp_path,
            store=store,
            table=table,
            sink_factory=factory,
            lease_ttl=0.3,
        )
        async with crashing:
            with pytest.raises(Crash):
                await crashing.run_once()
        await anyio.sleep(0.35)  # a crash before release leaves the lease to expire
        async with Compactor(MEMORY, cache_dir=tmp_path, store=store, table=table) as again:
            await again.run_once()
            assert (await table.read_state(log.keys.log_id)).hwm == await log.head(), where
            assert_states_equal(await committed_state(again), await reference(log))
            assert (await again.verify()).ok


async def test_zombie_commit_is_fenced(rng: np.random.Generator, tmp_path: Path) -> None:
    """A stalls (heartbeat too) past its lease; B takes over and commits; A's commit fails."""
    store, table = MemoryStore(), MemoryTable()
    stalled = StalledRenewTable(table)
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        await _mixed_history(log, rng, 0, 3)
        gate, entered = anyio.Event(), anyio.Event()
        _, factory = faulty_sinks(gate=gate, entered=entered)
        zombie = Compactor(
            MEMORY,
            cache_dir=tmp_path / "a",
            store=store,
            table=stalled,
            sink_factory=factory,
            lease_ttl=0.3,
        )
        errors: list[BaseException] = []

        async def run_zombie() -> None:
            try:
                await zombie.run_once()
            except LeaseLost as exc:
                errors.append(exc)

        async with zombie, anyio.create_task_group() as tg:
            tg.start_soon(run_zombie)
            await entered.wait()
            await anyio.sleep(0.4)  # the zombie's lease expires while it stalls
            async with Compactor(MEMORY, cache_dir=tmp_path / "b", store=store, table=table) as b:
                taken = await b.run_once()
            assert taken.status == "applied", taken
            gate.set()
        assert len(errors) == 1, "the zombie must stop with LeaseLost at its commit"
        state = await table.read_state(log.keys.log_id)
        assert state.hwm == taken.hwm_after and state.snapshot_key == taken.snapshot_key
        keys = [info.key async for info in store.list_after(log.keys.snapshots_prefix)]
        assert keys == [taken.snapshot_key], "the zombie's snapshot is never referenced nor kept"


async def test_lost_heartbeat_cancels_the_run(rng: np.random.Generator, tmp_path: Path) -> None:
    store, table = MemoryStore(), MemoryTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        await log.append(delta(rng, "a"))
        entered = anyio.Event()
        _, factory = faulty_sinks(gate=anyio.Event(), entered=entered)
        a = Compactor(
            MEMORY,
            cache_dir=tmp_path,
            store=store,
            table=table,
            sink_factory=factory,
            lease_ttl=0.3,
        )
        async with a, anyio.create_task_group() as tg:

            async def steal() -> None:
                await entered.wait()  # A stalls in apply; its heartbeat still runs
                await table.acquire(log.keys.log_id, "intruder", ttl=30, now=time.time() + 60)

            tg.start_soon(steal)
            with pytest.raises(LeaseLost):
                await a.run_once()
        state = await table.read_state(log.keys.log_id)
        assert (state.hwm, state.owner, state.snapshot_key) == (0, "intruder", None)


async def test_young_hole_stops_old_hole_is_sealed_late_producer_reserves_again(
    log: DeltaLog, config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    await log.append(delta(rng, "a"))
    hole = await log.table.reserve(log.keys.log_id)
    await log.append(delta(rng, "b"))
    async with Compactor(config, cache_dir=tmp_path, grace=3600) as patient:
        stopped = await patient.run_once()
    assert (stopped.status, stopped.hwm_after, stopped.stopped) == ("applied", hole - 1, "hole")
    async with Compactor(config, cache_dir=tmp_path, grace=0) as eager:
        sealed = await eager.run_once()
        assert sealed.seals_written == 1 and sealed.hwm_after == hole + 1

        # A late producer: its seq is sealed before it writes; it must re-reserve.
        late = delta(rng, "late")
        encoded = await log.prepare(late)
        seq = await log.table.reserve(log.keys.log_id)
        assert (await eager.run_once()).hwm_after == seq  # sealed at once: grace 0
        landed = (await log.appender.write([encoded]))[late.delta_id]
        assert isinstance(landed, int) and landed > seq
        await eager.run_once()
        state = await committed_state(eager)
        assert {"late#0", "late#1"} <= set(state["words"])
        assert_states_equal(state, await reference(log))


async def test_poison_entry_stops_compaction_until_quarantined(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = MemoryStore(), MemoryTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        for name in ("a", "b", "c"):
            await log.append(delta(rng, name))
        store.overwrite(log.keys.entry(2), b"DLOG garbage")
        async with Compactor(MEMORY, cache_dir=tmp_path, store=store, table=table) as compactor:
            with pytest.raises(CorruptEntry) as raised:
                await compactor.run_once()
            assert raised.value.seq == 2 and raised.value.log == "mem"
            assert (await table.read_state(log.keys.log_id)).hwm == 1
            await table.quarantine(log.keys.log_id, 2, "garbage bytes", now=time.time())
            result = await compactor.run_once()
            assert result.hwm_after == 3
            state = await committed_state(compactor)
            assert set(state["words"]) == {"a#0", "a#1", "c#0", "c#1"}
            assert (await compactor.verify()).ok
        assert (await log.status()).quarantined == {2: "garbage bytes"}


async def test_corrupt_or_missing_snapshot_is_refused_and_nothing_committed(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = MemoryStore(), MemoryTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        await log.append(delta(rng, "a"))
        async with Compactor(MEMORY, cache_dir=tmp_path / "one", store=store, table=table) as c:
            first = await c.run_once()
        assert first.snapshot_key is not None
        before = await table.read_state(log.keys.log_id)
        await log.append(delta(rng, "b"))
        store.overwrite(first.snapshot_key, b"not a tar archive")
        async with Compactor(MEMORY, cache_dir=tmp_path / "two", store=store, table=table) as c:
            with pytest.raises(DataError) as raised:
                await c.run_once()
            assert first.snapshot_key in str(raised.value)
        await store.delete(first.snapshot_key)
        async with Compactor(MEMORY, cache_dir=tmp_path / "three", store=store, table=table) as c:
            with pytest.raises(DataError) as missing:
                await c.run_once()
            assert first.snapshot_key in str(missing.value)
        after = await table.read_state(log.keys.log_id)
        assert (after.hwm, after.snapshot_key, after.owner) == (
            before.hwm,
            before.snapshot_key,
            None,
        )


async def test_unwritable_cache_dir_is_a_configuration_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigurationError):
        async with Compactor(
            MEMORY, cache_dir=blocker / "cache", store=MemoryStore(), table=MemoryTable()
        ):
            pass


async def test_publish_rebuild_never_lowers_hwm_without_force(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = MemoryStore(), MemoryTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        for name in ("a", "b", "c"):
            await log.append(delta(rng, name))
        await log.append(
            Delta(ops=[UpdateMetadata(collection="words", ids=["a#0"], metadatas=[{"n": 7}])])
        )
        async with Compactor(MEMORY, cache_dir=tmp_path, store=store, table=table) as c:
            await c.run_once()
            with pytest.raises(Exception, match="below the committed hwm"):
                await c.rebuild(to_seq=2, publish=True)
            assert (await table.read_state(log.keys.log_id)).hwm == 4
            rolled = await c.rebuild(to_seq=2, publish=True, force=True)
            state = await table.read_state(log.keys.log_id)
            assert (state.hwm, state.snapshot_key) == (2, rolled.snapshot_key)
            again = await c.run_once()
            assert again.hwm_after == 4
            assert_states_equal(await committed_state(c), await reference(log))


class CountingStore(MemoryStore):
    """Records which snapshots were downloaded."""

    def __init__(self) -> None:
        super().__init__()
        self.downloads: list[str] = []

    async def download_file(self, key: str, path: Path) -> Transferred | None:
        self.downloads.append(key)
        return await super().download_file(key, path)


def _cached_keys(compactor: Compactor) -> set[str]:
    """The snapshot keys the cache holds slots for (``committed/*/source.json``)."""
    import json

    slots = (compactor.cache.root / "committed").glob("*/source.json")
    return {json.loads(source.read_text())["key"] for source in slots}


def _working_copies(compactor: Compactor) -> list[Path]:
    return list((compactor.cache.root / "work").iterdir())


async def test_the_cache_reuses_exactly_the_committed_snapshot(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = CountingStore(), MemoryTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        await log.append(delta(rng, "a"))
        async with Compactor(MEMORY, cache_dir=tmp_path / "a", store=store, table=table) as a:
            first = await a.run_once()
            await log.append(delta(rng, "b"))
            second = await a.run_once()
            assert store.downloads == [], "a second run reuses the snapshot it committed"
            assert _cached_keys(a) == {first.snapshot_key, second.snapshot_key}
            await log.append(delta(rng, "c"))
            async with Compactor(MEMORY, cache_dir=tmp_path / "b", store=store, table=table) as b:
                third = await b.run_once()
            assert store.downloads == [second.snapshot_key]  # b's cache was cold
            await log.append(delta(rng, "d"))
            fourth = await a.run_once()  # a holds second; third is committed: download it
            assert store.downloads == [second.snapshot_key, third.snapshot_key]
            assert (await a.run_once()).status == "nothing"
            await log.append(delta(rng, "e"))
            await a.run_once()
            assert store.downloads == [second.snapshot_key, third.snapshot_key]
            assert fourth.snapshot_key in _cached_keys(a) and _working_copies(a) == []
            assert_states_equal(await committed_state(a), await reference(log))


async def test_an_uncommitted_working_copy_is_never_reused(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = CountingStore(), FaultyTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        await log.append(delta(rng, "a"))
        async with Compactor(MEMORY, cache_dir=tmp_path, store=store, table=table) as c:
            committed = await c.run_once()
            await log.append(delta(rng, "b"))
            table.crash_on = "before-commit"
            with pytest.raises(Crash):
                await c.run_once()
            assert _cached_keys(c) == {committed.snapshot_key} and _working_copies(c) == []
            assert (await table.read_state(log.keys.log_id)).hwm == committed.hwm_after
            again = await c.run_once()
            assert again.hwm_before == committed.hwm_after == again.hwm_after - 1
            assert store.downloads == []
            assert_states_equal(await committed_state(c), await reference(log))


async def snapshot_keys(store: MemoryStore) -> list[str]:
    return [info.key async for info in store.list_after(MEMORY.keys.snapshots_prefix)]


async def test_retention_deletes_old_snapshots_only_after_a_commit(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = MemoryStore(), FaultyTable()

    async with (
        DeltaLog.open(MEMORY, store=store, table=table) as log,
        Compactor(MEMORY, cache_dir=tmp_path, store=store, table=table, retain=2) as c,
    ):
        committed: list[str] = []
        for name in ("a", "b", "c", "d"):
            await log.append(delta(rng, name))
            result = await c.run_once()
            assert result.snapshot_key is not None
            committed.append(result.snapshot_key)
            assert await snapshot_keys(store) == sorted(committed[-2:])
        await log.append(delta(rng, "e"))
        table.crash_on = "before-commit"
        with pytest.raises(Crash):
            await c.run_once()
        kept = await snapshot_keys(store)
        assert set(committed[-2:]) < set(kept) and len(kept) == 3, "nothing deleted uncommitted"
        (orphan,) = set(kept) - set(committed)
        result = await c.run_once()
        assert result.snapshot_key is not None
        # The crashed run's upload is an orphan: it never counts toward retain,
        # and it is young (the grace is an hour), so it stays for now.
        assert await snapshot_keys(store) == sorted([committed[-1], orphan, result.snapshot_key])
        state = await table.read_state(log.keys.log_id)
        assert state.snapshot_key == result.snapshot_key
        assert state.recent_snapshots[:2] == (result.snapshot_key, committed[-1])


async def test_retention_keeps_committed_snapshots_and_deletes_orphans_after_a_grace(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = MemoryStore(), MemoryTable()

    async with (
        DeltaLog.open(MEMORY, store=store, table=table) as log,
        Compactor(MEMORY, cache_dir=tmp_path, store=store, table=table, retain=2) as keeper,
        Compactor(
            MEMORY, cache_dir=tmp_path, store=store, table=table, retain=2, orphan_grace=0
        ) as sweeper,
    ):
        committed: list[str] = []
        orphans: list[str] = []
        for i, compactor in enumerate((keeper, keeper, keeper, sweeper)):
            await log.append(delta(rng, f"d{i}"))
            # A run killed between its upload and its commit, at the hwm to come:
            orphan = log.keys.snapshot(await log.head(), 90 + i, f"orphan{i}")
            assert await store.put_if_absent(orphan, b"never committed")
            orphans.append(orphan)
            result = await compactor.run_once()
            assert result.snapshot_key is not None
            committed.append(result.snapshot_key)
            if compactor is keeper:  # orphans younger than the grace stay, uncounted
                assert set(await snapshot_keys(store)) == {*committed[-2:], *orphans}
        # The sweeper (grace 0) deleted every orphan below the committed hwm; the
        # one at the committed hwm may be a newer owner's upload about to commit.
        assert set(await snapshot_keys(store)) == {*committed[-2:], orphans[-1]}
        state = await table.read_state(log.keys.log_id)
        assert state.recent_snapshots == tuple(reversed(committed))


async def test_a_byte_limit_commits_the_entries_that_fit_then_continues(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = MemoryStore(), MemoryTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        for i in range(6):
            await log.append(delta(rng, f"r{i}"))
        sizes = [info.size async for info in store.list_after(log.keys.entries_prefix)]
        limits = Limits(max_bytes=sizes[0] + sizes[1] + 1)  # reached by the third entry
        async with Compactor(
            MEMORY, cache_dir=tmp_path, store=store, table=table, limits=limits
        ) as c:
            first = await c.run_once()
            assert (first.hwm_after, first.stopped) == (3, "limit")
            assert_states_equal(await committed_state(c), await reference(log, to_seq=3))
            second = await c.run_once()
            assert (second.hwm_before, second.hwm_after) == (3, 6)
            assert_states_equal(await committed_state(c), await reference(log))


async def test_a_time_limit_stops_a_run_after_what_it_read(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = MemoryStore(), MemoryTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        for i in range(3):
            await log.append(delta(rng, f"r{i}"))
        limits = Limits(max_seconds=0.0)  # at least one entry per run, then stop
        async with Compactor(
            MEMORY, cache_dir=tmp_path, store=store, table=table, limits=limits
        ) as c:
            results = [await c.run_once() for _ in range(4)]
        assert [(r.hwm_after, r.stopped) for r in results] == [
            (1, "limit"),
            (2, "limit"),
            (3, "limit"),
            (3, "end"),
        ]


async def test_a_cancelled_run_closes_its_sink_removes_its_copy_and_releases(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    """What a stop signal does to a run in progress in ``compact --follow``."""
    store, table = MemoryStore(), MemoryTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        await log.append(delta(rng, "a"))
        entered = anyio.Event()
        made, factory = faulty_sinks(gate=anyio.Event(), entered=entered)
        c = Compactor(MEMORY, cache_dir=tmp_path, store=store, table=table, sink_factory=factory)
        async with c, anyio.create_task_group() as tg:
            tg.start_soon(c.run_once)
            await entered.wait()
            tg.cancel_scope.cancel()
        state = await table.read_state(log.keys.log_id)
        assert (state.owner, state.hwm, state.token) == (None, 0, 1)
        assert _working_copies(c) == []
        with pytest.raises(Closed):
            await made[0].inner.counts()


class SlowAcquireTable(MemoryTable):
    """The acquire lands at once; its answer arrives when ``answer`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.landed = anyio.Event()
        self.answer = anyio.Event()

    async def acquire(self, log_id: str, owner: str, *, ttl: float, now: float) -> LogState:
        state = await super().acquire(log_id, owner, ttl=ttl, now=now)
        self.landed.set()
        await self.answer.wait()
        return state


async def test_a_run_cancelled_while_acquiring_still_releases_the_lease(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = MemoryStore(), SlowAcquireTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        await log.append(delta(rng, "a"))
        c = Compactor(MEMORY, cache_dir=tmp_path, store=store, table=table)
        async with c, anyio.create_task_group() as tg:
            tg.start_soon(c.run_once)
            await table.landed.wait()
            tg.cancel_scope.cancel()  # a stop signal while the answer is in flight
            table.answer.set()
        state = await table.read_state(log.keys.log_id)
        assert (state.owner, state.token, state.hwm) == (None, 1, 0)


class FailingDeleteStore(MemoryStore):
    """Deletes fail while ``failing`` is set: S3 unavailable for a moment."""

    failing = False

    async def delete(self, key: str) -> None:
        if self.failing:
            raise Unavailable("delete: service unavailable", key=key)
        await super().delete(key)


async def test_a_failed_cleanup_does_not_fail_a_committed_run(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = FailingDeleteStore(), MemoryTable()

    async with (
        DeltaLog.open(MEMORY, store=store, table=table) as log,
        Compactor(MEMORY, cache_dir=tmp_path, store=store, table=table, retain=1) as c,
    ):
        await log.append(delta(rng, "a"))
        first = await c.run_once()
        await log.append(delta(rng, "b"))
        store.failing = True
        second = await c.run_once()
        assert second.status == "applied"
        assert (await table.read_state(log.keys.log_id)).snapshot_key == second.snapshot_key
        assert await snapshot_keys(store) == sorted(
            filter(None, [first.snapshot_key, second.snapshot_key])
        )
        assert len(await snapshot_keys(store)) == 2, (
            "the old snapshot stays until a later run deletes it"
        )
        store.failing = False
        await log.append(delta(rng, "c"))
        third = await c.run_once()
        assert await snapshot_keys(store) == [third.snapshot_key]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"retain": 0}, r"retain \(--retain\) must keep at least one snapshot"),
        ({"orphan_grace": -1.0}, r"orphan_grace \(--orphan-grace\) must be at least 0"),
    ],
)
def test_bad_retention_settings_are_refused(
    settings: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match=message):
        Compactor(MEMORY, cache_dir=tmp_path, **settings)
