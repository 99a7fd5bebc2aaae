"""The compactor against moto's server and real ChromaDB, and under faults."""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import compactor.runner
from compactor import Compactor, Limits, RebuildResult
from compactor.checkpoint import publish_seconds
from deltalog import (
    Closed,
    ConfigurationError,
    CorruptEntry,
    DataError,
    Delta,
    DeltaLog,
    InvalidInput,
    LeaseBusy,
    LeaseLost,
    LogConfig,
    Unavailable,
    UpdateMetadata,
    Upsert,
)
from deltalog.codec import Frame, batch_body, encode_delta
from deltalog.entry import new_id
from deltalog.keys import STATE_SK
from deltalog.reader import Reader
from deltalog.snapshot.sink import ChromaSink, Sink
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import Commit, LogState, MemoryTable
from deltalog.storage.transfer import Transferred
from tests.builders import delete, delta, patch, upsert, vectors
from tests.compaction import (
    Crash,
    FaultyTable,
    StalledRenewTable,
    assert_states_equal,
    committed_state,
    faulty_sinks,
    reference,
    snapshot_state,
    until_not_busy,
    until_state,
)
from tests.compactor.conftest import MEMORY, Backend


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
    """With ``compression="none"`` the published archive is a plain tar of a Chroma directory."""
    import tarfile

    import chromadb

    await log.append(delta(rng, "a", rows=4))
    async with Compactor(config, cache_dir=tmp_path / "cache", compression="none") as compactor:
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
    backend: Backend,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    table = FaultyTable(backend.table)
    async with backend.open_log() as log:
        await _mixed_history(log, rng, 0, 4)
        async with backend.compactor(cache_dir=tmp_path) as ok:
            await ok.run_once()
        await _mixed_history(log, rng, 4, 4)
        _, factory = faulty_sinks(before=sink_faults.get("before"), after=sink_faults.get("after"))
        table.crash_on = table_fault
        crashing = backend.compactor(
            cache_dir=tmp_path, table=table, sink_factory=factory, lease_ttl=backend.lease_ttl
        )
        async with crashing:
            with pytest.raises(Crash):
                await crashing.run_once()
        async with backend.compactor(cache_dir=tmp_path) as again:
            await until_not_busy(again)  # a crash before release leaves the lease to expire
            assert (await log.table.read_state(log.keys.log_id)).hwm == await log.head(), where
            assert_states_equal(await committed_state(again), await reference(log))
            assert (await again.verify()).ok


async def test_zombie_commit_is_fenced(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """A stalls (heartbeat too) past its lease; B takes over and commits; A's commit fails."""
    async with backend.open_log() as log:
        await _mixed_history(log, rng, 0, 3)
        gate, entered = anyio.Event(), anyio.Event()
        _, factory = faulty_sinks(gate=gate, entered=entered)
        zombie = backend.compactor(
            cache_dir=tmp_path / "a",
            table=StalledRenewTable(backend.table, stalled=entered),  # paused in apply
            sink_factory=factory,
            lease_ttl=backend.lease_ttl,
        )
        errors: list[BaseException] = []

        async def run_zombie() -> None:
            try:
                await zombie.run_once()
            except LeaseLost as exc:
                errors.append(exc)

        async with zombie, anyio.create_task_group() as tg:
            tg.start_soon(run_zombie)
            with anyio.fail_after(60):
                await entered.wait()
            async with backend.compactor(cache_dir=tmp_path / "b") as b:
                taken = await until_not_busy(b)  # once the stalled zombie's lease expired
            assert taken.status == "applied", taken
            gate.set()
        assert len(errors) == 1, "the zombie must stop with LeaseLost at its commit"
        state = await log.table.read_state(log.keys.log_id)
        assert state.hwm == taken.hwm_after and state.snapshot_key == taken.snapshot_key
        keys = [info.key async for info in log.store.list_after(log.keys.snapshots_prefix)]
        assert keys == [taken.snapshot_key], "the zombie's snapshot is never referenced nor kept"


async def test_lost_heartbeat_cancels_the_run(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    async with backend.open_log() as log:
        await log.append(delta(rng, "a"))
        entered = anyio.Event()
        _, factory = faulty_sinks(gate=anyio.Event(), entered=entered)
        a = backend.compactor(cache_dir=tmp_path, sink_factory=factory, lease_ttl=backend.lease_ttl)
        async with a, anyio.create_task_group() as tg:

            async def steal() -> None:
                await entered.wait()  # A stalls in apply; its heartbeat still runs
                await log.table.acquire(log.keys.log_id, "intruder", ttl=30, now=time.time() + 60)

            tg.start_soon(steal)
            with pytest.raises(LeaseLost):
                await a.run_once()
        state = await log.table.read_state(log.keys.log_id)
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


async def _replace_entry(log: DeltaLog, seq: int, data: bytes) -> None:
    """Stored bytes gone bad (on S3 too: entries are never overwritten by deltalog)."""
    await log.store.delete(log.keys.entry(seq))
    assert await log.store.put_if_absent(log.keys.entry(seq), data)


async def test_poison_entry_stops_compaction_until_quarantined(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    async with backend.open_log() as log:
        for name in ("a", "b", "c"):
            await log.append(delta(rng, name))
        await _replace_entry(log, 2, b"DLOG garbage")
        async with backend.compactor(cache_dir=tmp_path) as compactor:
            with pytest.raises(CorruptEntry) as raised:
                await compactor.run_once()
            assert raised.value.seq == 2 and raised.value.log == log.config.log
            assert (await log.table.read_state(log.keys.log_id)).hwm == 1
            await log.table.quarantine(log.keys.log_id, 2, "garbage bytes", now=time.time())
            result = await compactor.run_once()
            assert result.hwm_after == 3
            state = await committed_state(compactor)
            assert set(state["words"]) == {"a#0", "a#1", "c#0", "c#1"}
            assert (await compactor.verify()).ok
        assert (await log.status()).quarantined == {2: "garbage bytes"}


class SkewedTime:
    """The ``time`` module as seen by a machine whose clock is ``skew`` seconds off."""

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def time(self) -> float:
        return time.time() + self.skew

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.mark.parametrize("skew", [3600.0, -3600.0])
async def test_a_compactor_clock_off_by_an_hour_seals_no_young_hole(
    skew: float,
    backend: Backend,
    rng: np.random.Generator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hole ages are measured on the store's clock: a fast or slow compactor changes nothing."""
    clock = SkewedTime(skew)
    monkeypatch.setattr(compactor.runner, "time", clock)
    inner, trailing = backend.config, replace(backend.config, log=f"{backend.config.log}-2")
    async with backend.open_log(inner) as log, backend.open_log(trailing) as log2:
        for name in ("a", "hole", "b"):  # a hole with an entry written after it
            await (
                log.table.reserve(log.keys.log_id)
                if name == "hole"
                else log.append(delta(rng, name))
            )
        await log2.append(delta(rng, "a"))
        await log2.table.reserve(log2.keys.log_id)  # a hole with nothing after it
        for config in (inner, trailing):
            async with backend.compactor(config, cache_dir=tmp_path / config.log) as skewed:
                result = await skewed.run_once()
            assert (result.hwm_after, result.stopped, result.seals_written) == (1, "hole", 0)
        clock.skew = 0.0  # a compactor with the right time, after the skewed one noted the hole
        async with backend.compactor(trailing, cache_dir=tmp_path / "right") as right:
            result = await right.run_once()
        assert (result.hwm_after, result.stopped, result.seals_written) == (1, "hole", 0)


def _malformed(rng: np.random.Generator, kind: str) -> Delta:
    """A delta append would refuse: it decodes, and only its rules make it bad."""
    good = upsert(rng, ["half#0", "half#1"])  # folded alone, it would show half the entry
    if kind == "lengths":
        return Delta(ops=[good, Upsert("words", ["x", "y"], vectors(rng, 1))])
    return Delta(ops=[upsert(rng, ["half#0", "half#1"], dim=4)])  # words holds 8-dim vectors


async def _append_unchecked(log: DeltaLog, bad: Delta) -> int:
    """Write ``bad`` at the next seq as a producer would, without its checks."""
    seq = await log.table.reserve(log.keys.log_id)
    body = batch_body(new_id(), [encode_delta(bad)], created_at=time.time())
    assert await log.store.put_if_absent(log.keys.entry(seq), Frame(body).at(seq))
    return seq


@pytest.mark.parametrize("kind", ["lengths", "dimension"])
async def test_a_malformed_entry_is_poison_whole_until_quarantined(
    kind: str, backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """It decodes, so only validation can refuse it: before any of it is folded."""
    async with backend.open_log() as log:
        for name in ("a", "b"):
            await log.append(delta(rng, name))
        bad = await _append_unchecked(log, _malformed(rng, kind))
        await log.append(delta(rng, "c"))
        async with backend.compactor(cache_dir=tmp_path) as compactor:
            for _ in range(2):  # stuck at it, every run, with what came before committed
                with pytest.raises(CorruptEntry, match="malformed entry") as raised:
                    await compactor.run_once()
                assert (raised.value.seq, raised.value.log) == (bad, log.config.log)
                assert (await log.table.read_state(log.keys.log_id)).hwm == bad - 1
                assert set((await committed_state(compactor))["words"]) == {
                    "a#0",
                    "a#1",
                    "b#0",
                    "b#1",
                }
            with pytest.raises(CorruptEntry, match="malformed entry"):
                await compactor.rebuild()
            assert (await compactor.verify()).ok  # to the committed hwm, before it
            await log.table.quarantine(log.keys.log_id, bad, f"{kind} mismatch", now=time.time())
            result = await compactor.run_once()
            assert (result.status, result.hwm_after) == ("applied", bad + 1)
            want = {"a#0", "a#1", "b#0", "b#1", "c#0", "c#1"}
            assert set((await committed_state(compactor))["words"]) == want
            rebuilt = await compactor.rebuild()
            assert rebuilt.hwm == bad + 1 and rebuilt.counts == {"words": 6}
            assert (await compactor.verify()).ok


@pytest.mark.parametrize("kind", ["lengths", "dimension"])
async def test_a_fresh_read_never_shows_part_of_a_malformed_entry(
    kind: str, backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Nor an entry whose vectors disagree with the log's schema (checked as the compactor does)."""
    async with backend.open_log() as log:
        await log.append(delta(rng, "a"))
        async with backend.compactor(cache_dir=tmp_path / "c") as compactor:
            await compactor.run_once()
        bad = await _append_unchecked(log, _malformed(rng, kind))
        await log.append(delta(rng, "c"))

        def fresh() -> AbstractAsyncContextManager[Reader]:
            return Reader.open(
                log.config,
                consistency="fresh",
                cache_dir=tmp_path,
                store=backend.store,
                table=backend.table,
            )

        with pytest.raises(CorruptEntry, match="malformed entry"):
            async with fresh():
                pass
        await log.table.quarantine(log.keys.log_id, bad, kind, now=time.time())
        async with fresh() as reader:
            got = await reader.get(collection="words")
        assert sorted(got["ids"]) == ["a#0", "a#1", "c#0", "c#1"]


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
            with pytest.raises(InvalidInput, match="below the committed hwm"):
                await c.rebuild(to_seq=2, publish=True)
            assert (await table.read_state(log.keys.log_id)).hwm == 4
            rolled = await c.rebuild(to_seq=2, publish=True, force=True)
            state = await table.read_state(log.keys.log_id)
            assert (state.hwm, state.snapshot_key) == (2, rolled.snapshot_key)
            again = await c.run_once()
            assert again.hwm_after == 4
            assert_states_equal(await committed_state(c), await reference(log))


async def test_a_publishing_rebuild_renews_its_lease_however_long_it_takes(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    async with backend.open_log() as log:
        for name in ("a", "b", "c"):
            await log.append(delta(rng, name))
        gate, entered = anyio.Event(), anyio.Event()
        _, factory = faulty_sinks(gate=gate, entered=entered)
        ttl = backend.lease_ttl
        rebuilder = backend.compactor(cache_dir=tmp_path / "r", sink_factory=factory, lease_ttl=ttl)
        other = backend.compactor(cache_dir=tmp_path / "o", lease_ttl=ttl)
        rebuilt: list[RebuildResult] = []

        async def rebuild() -> None:
            rebuilt.append(await rebuilder.rebuild(publish=True))

        async with rebuilder, other, anyio.create_task_group() as tg:
            tg.start_soon(rebuild)
            await entered.wait()  # the replay stalls in its first apply, lease held
            first = await log.table.read_state(log.keys.log_id)
            # A renewal made after the lease's first expiry: the rebuild outlived its ttl.
            await until_state(log, lambda s: s.expires_at >= first.expires_at + ttl)
            assert (await other.run_once()).status == "busy"
            gate.set()
        (result,) = rebuilt
        state = await log.table.read_state(log.keys.log_id)
        assert result.published and (state.hwm, state.snapshot_key) == (3, result.snapshot_key)
        assert state.owner is None and state.token == first.token


async def test_a_publishing_rebuild_waits_for_a_busy_lease(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    async with backend.open_log() as log:
        for name in ("a", "b"):
            await log.append(delta(rng, name))
        gate, entered = anyio.Event(), anyio.Event()
        _, factory = faulty_sinks(gate=gate, entered=entered)
        holder = backend.compactor(cache_dir=tmp_path / "h", sink_factory=factory)
        table = FaultyTable(backend.table)
        rebuilder = backend.compactor(cache_dir=tmp_path / "r", table=table)
        rebuilt: list[RebuildResult] = []

        async def rebuild() -> None:
            rebuilt.append(await rebuilder.rebuild(publish=True, wait=60))

        async with holder, rebuilder, anyio.create_task_group() as tg:
            tg.start_soon(holder.run_once)
            await entered.wait()  # a run holds the lease
            with pytest.raises(LeaseBusy, match="held by"):
                await rebuilder.rebuild(publish=True, wait=0)
            table.refused = anyio.Event()
            tg.start_soon(rebuild)
            await table.refused.wait()  # the rebuild found the lease busy and waits
            gate.set()  # the run commits and releases
        (result,) = rebuilt
        state = await log.table.read_state(log.keys.log_id)
        assert result.published and (state.hwm, state.snapshot_key) == (2, result.snapshot_key)
        assert state.token == 2, "the run's lease, then the rebuild's"


async def test_a_lost_commit_answer_after_a_takeover_counts_as_committed(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Our commit lands, its answer is lost; a successor takes over and commits after us."""
    table = FaultyTable(backend.table)
    async with backend.open_log() as log:
        await log.append(delta(rng, "a"))
        log_id = log.keys.log_id
        successor = log.keys.snapshot(1, 99, "successor")

        async def successor_commits() -> None:
            later = time.time() + 3600  # our lease has expired by then
            state = await backend.table.acquire(log_id, "successor", ttl=30, now=later)
            recent = (successor, *state.recent_snapshots)
            commit = Commit(1, successor, "0" * 64, 1, recent_snapshots=recent)
            await backend.table.commit(
                log_id, "successor", state.token, prev_hwm=1, commit=commit, now=later
            )

        table.lost_commit_answers, table.after_commit = 1, successor_commits
        table.lose_checkpoint_answers_only = True  # hwm is committed alone before the upload
        async with backend.compactor(cache_dir=tmp_path, table=table, retain=2) as c:
            result = await c.run_once()
        assert result.status == "applied" and result.snapshot_key is not None
        state = await log.table.read_state(log_id)
        assert state.recent_snapshots == (successor, result.snapshot_key)
        ours = [i.key async for i in log.store.list_after(log.keys.snapshots_prefix)]
        assert ours == [result.snapshot_key], "a snapshot in recent_snapshots is never deleted"


async def test_a_lost_commit_answer_of_a_publishing_rebuild_counts_as_published(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    table = FaultyTable(backend.table)
    async with backend.open_log() as log:
        await log.append(delta(rng, "a"))
        table.lost_commit_answers = 1  # botocore's retry meets the hwm the first attempt set
        async with backend.compactor(cache_dir=tmp_path, table=table) as c:
            result = await c.rebuild(publish=True)
            assert result.published
            state = await log.table.read_state(log.keys.log_id)
            assert (state.hwm, state.snapshot_key, state.owner) == (1, result.snapshot_key, None)
            assert (await c.verify()).ok


async def test_verify_closes_the_first_sink_when_the_second_fails_to_open(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = MemoryStore(), MemoryTable()
    opened: list[Sink] = []

    async def factory(path: Path) -> Sink:
        if opened:
            raise Unavailable("injected: the second sink cannot open")
        opened.append(await ChromaSink.open(path))
        return opened[0]

    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        await log.append(delta(rng, "a"))
        async with Compactor(MEMORY, cache_dir=tmp_path, store=store, table=table) as c:
            await c.run_once()
        c = Compactor(MEMORY, cache_dir=tmp_path, store=store, table=table, sink_factory=factory)
        async with c:
            with pytest.raises(Unavailable, match="second sink"):
                await c.verify()
        with pytest.raises(Closed):
            await opened[0].counts()
        assert _working_copies(c) == []


class CountingStore(MemoryStore):
    """Records which snapshots were downloaded."""

    def __init__(self) -> None:
        super().__init__()
        self.downloads: list[str] = []

    async def download_file(self, key: str, path: Path) -> Transferred | None:
        self.downloads.append(key)
        return await super().download_file(key, path)


def _working_copies(compactor: Compactor) -> list[Path]:
    return list((compactor.cache.root / "work").iterdir())


async def test_a_warm_compactor_downloads_nothing_and_a_cold_one_replays_the_tail(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = CountingStore(), MemoryTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        await log.append(delta(rng, "a"))
        tails: dict[str, Any] = {"store": store, "table": table, "checkpoint_ratio": 1e6}
        async with Compactor(MEMORY, cache_dir=tmp_path / "a", **tails) as a:
            first = await a.run_once()
            assert (first.checkpoint, first.working_copy) == ("first", "empty")
            for name in ("b", "c"):
                await log.append(delta(rng, name))
                warm = await a.run_once()
                assert (warm.checkpoint, warm.working_copy, warm.replayed_tail) == ("", "warm", 0)
            assert (warm.snapshot_key, warm.snapshot_hwm, warm.tail_entries) == (
                first.snapshot_key,
                1,
                2,
            )
            assert store.downloads == [], "a warm run downloads nothing"
            await log.append(delta(rng, "d"))
            async with Compactor(MEMORY, cache_dir=tmp_path / "b", **tails) as b:
                cold = await b.run_once()
            assert (cold.working_copy, cold.replayed_tail, cold.hwm_after) == ("checkpoint", 2, 4)
            assert store.downloads == [first.snapshot_key]  # the checkpoint, once
            await log.append(delta(rng, "e"))
            behind = await a.run_once()  # a's live copy is at 3, b committed 4: replay 4 only
            assert (behind.working_copy, behind.replayed_tail, behind.hwm_after) == ("warm", 1, 5)
            assert store.downloads == [first.snapshot_key]
            assert (await a.run_once()).status == "nothing"
            held = a.warm_sink.statistics()
            assert _working_copies(a) == [held.path] and held.at == 5, "held open: the warm sink"
            assert_states_equal(await committed_state(a), await reference(log))
        assert _working_copies(a) == [] and (a.cache.root / "live").exists(), "parked on close"


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
            assert _working_copies(c) == [] and not (c.cache.root / "live").exists()
            assert (await table.read_state(log.keys.log_id)).hwm == committed.hwm_after
            again = await c.run_once()
            assert again.hwm_before == committed.hwm_after == again.hwm_after - 1
            assert again.working_copy == "checkpoint", "the applied but uncommitted copy is gone"
            assert store.downloads == [committed.snapshot_key]
            assert_states_equal(await committed_state(c), await reference(log))


async def test_a_live_copy_ahead_of_the_committed_hwm_is_discarded(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    """A rollback (``rebuild --publish --force``) leaves the live copy above hwm."""
    store, table = CountingStore(), MemoryTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        for name in ("a", "b", "c"):
            await log.append(delta(rng, name))
        async with Compactor(MEMORY, cache_dir=tmp_path, store=store, table=table) as c:
            assert (await c.run_once()).hwm_after == 3
            rolled = await c.rebuild(to_seq=1, publish=True, force=True)
            again = await c.run_once()
            assert (again.hwm_before, again.hwm_after, again.working_copy) == (1, 3, "checkpoint")
            assert store.downloads == [rolled.snapshot_key]
            assert_states_equal(await committed_state(c), await reference(log))


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


async def test_a_deadline_keeps_the_time_a_checkpoint_of_its_size_needs_to_publish(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    """With 30 s to a deadline, a small checkpoint leaves time for everything; one whose
    publish would take longer (a state that says the checkpoint is 1 GB: ~55 s at the
    assumed rate) stops the replay at once and defers the publish: hwm is committed alone."""
    assert publish_seconds(10**9) > 30 > publish_seconds(10**4)
    store, table = MemoryStore(), MemoryTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        for i in range(3):
            await log.append(delta(rng, f"r{i}"))
        async with Compactor(
            MEMORY, cache_dir=tmp_path, store=store, table=table, checkpoint_ratio=0
        ) as c:
            c.limits = Limits(deadline=time.monotonic() + 30)
            small = await c.run_once()
            for i in range(3, 6):
                await log.append(delta(rng, f"r{i}"))
            log_id = log.keys.log_id
            table._states[log_id] = replace(table._states[log_id], snapshot_size=10**9)
            c.limits = Limits(deadline=time.monotonic() + 30)
            large = await c.run_once()
        state = await table.read_state(log_id)
    assert (small.hwm_after, small.stopped, small.checkpoint) == (3, "end", "first")
    assert (large.hwm_after, large.stopped, large.checkpoint) == (4, "limit", "")
    assert (state.hwm, state.checkpoint_hwm) == (4, 3), "hwm committed, the publish deferred"


async def test_a_deadline_that_passes_while_the_copy_is_made_is_unavailable_and_commits_nothing(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = MemoryStore(), MemoryTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        await log.append(delta(rng, "r0"))
        async with Compactor(MEMORY, cache_dir=tmp_path, store=store, table=table) as c:
            c.limits = Limits(deadline=time.monotonic() - 1)
            with pytest.raises(Unavailable, match="deadline passed while getting the working"):
                await c.run_once()
            state = await table.read_state(log.keys.log_id)
            assert (state.hwm, state.owner) == (0, None), "nothing committed, the lease released"
            c.limits = Limits()
            assert (await c.run_once()).hwm_after == 1


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

    async def acquire(
        self, log_id: str, owner: str, *, ttl: float, now: float, sk: str = STATE_SK
    ) -> LogState:
        state = await super().acquire(log_id, owner, ttl=ttl, now=now, sk=sk)
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


# -- the warm sink ----------------------------------------------------------------------


class TrapSinks:
    """A sink factory of real Chroma sinks that run ``trap`` (once set) at their next apply."""

    def __init__(self) -> None:
        self.made: list[ChromaSink] = []
        self.trap: Any = None

    async def __call__(self, path: Path) -> Sink:
        inner = await ChromaSink.open(path)
        self.made.append(inner)
        factory = self

        class Trapped:
            async def apply(self, plan: Any) -> Any:
                trap, factory.trap = factory.trap, None
                if trap is not None:
                    await trap()
                return await inner.apply(plan)

            def __getattr__(self, name: str) -> Any:
                return getattr(inner, name)

        return Trapped()


@pytest.mark.parametrize("failure", ["lease lost", "commit failed", "apply failed"])
async def test_a_run_that_fails_on_the_warm_sink_closes_it_and_the_next_run_starts_cold(
    failure: str, backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """The index held open since the last run applies entries it never commits: the lease
    is lost mid-apply (an intruder takes it), the commit fails, or the apply fails.
    That index is closed and its copy removed, and the next run does not reuse it: it
    takes the checkpoint and replays the committed tail."""
    sinks, table = TrapSinks(), FaultyTable(backend.table)
    options: dict[str, Any] = {"table": table, "sink_factory": sinks, "checkpoint_ratio": 1e6}
    async with (
        backend.open_log() as log,
        backend.compactor(cache_dir=tmp_path, lease_ttl=backend.lease_ttl, **options) as c,
    ):
        await log.append(delta(rng, "a"))
        assert (await c.run_once()).checkpoint == "first"  # closed to publish: parked
        for name in ("b", "c"):
            await log.append(delta(rng, name))
            kept = await c.run_once()
        assert (kept.warm_sink, kept.hwm_after, len(sinks.made)) == (True, 3, 2)
        held = c.warm_sink.statistics()
        assert held.at == 3 and _working_copies(c) == [held.path]
        await log.append(delta(rng, "d"))
        intruder: list[LogState] = []

        async def steal() -> None:  # the heartbeat's next renewal fails; the run is cancelled
            now = time.time() + 60
            intruder.append(await log.table.acquire(log.keys.log_id, "intruder", ttl=30, now=now))
            await anyio.sleep_forever()

        async def fail() -> None:
            raise Crash("the sink failed mid-apply")

        if failure == "lease lost":
            sinks.trap = steal
        elif failure == "apply failed":
            sinks.trap = fail
        else:
            table.crash_on = "before-commit"
        with pytest.raises(LeaseLost if failure == "lease lost" else Crash):
            await c.run_once()
        with pytest.raises(Closed):
            await sinks.made[1].counts()  # the index held open, then written past hwm: closed
        assert c.warm_sink.statistics().path is None and _working_copies(c) == []
        assert not (c.cache.root / "live").exists()
        if intruder:
            await log.table.release(log.keys.log_id, "intruder", intruder[0].token)
        state = await until_state(log, lambda s: s.lease_free(time.time()))
        assert state.hwm == 3
        again = await c.run_once()
        assert (again.warm_sink, again.working_copy, again.replayed_tail) == (
            False,
            "checkpoint",
            2,
        ), "the next run starts from the checkpoint and the committed tail"
        assert (again.hwm_before, again.hwm_after, len(sinks.made)) == (3, 4, 3)
        assert_states_equal(await committed_state(c), await reference(log))


async def test_a_published_rebuild_retires_the_warm_sink_of_the_old_lineage(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    """The held index is at the committed hwm, but a published rebuild started a new
    lineage: the next run closes it and starts from the rebuild's checkpoint."""
    store, table = MemoryStore(), MemoryTable()
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        for name in ("a", "b"):
            await log.append(delta(rng, name))
        options: dict[str, Any] = {"store": store, "table": table, "checkpoint_ratio": 1e6}
        async with Compactor(MEMORY, cache_dir=tmp_path, **options) as c:
            await c.run_once()  # publishes the first checkpoint: parked
            await log.append(delta(rng, "c"))
            await c.run_once()
            await log.append(delta(rng, "d"))
            held = await c.run_once()
            assert held.warm_sink and c.warm_sink.statistics().at == 4
            rebuilt = await c.rebuild(publish=True)
            assert rebuilt.hwm == 4
            await log.append(delta(rng, "e"))
            again = await c.run_once()
            assert (again.warm_sink, again.working_copy, again.replayed_tail) == (
                False,
                "checkpoint",
                0,
            ), "the rebuild's checkpoint, not the index of the old lineage"
            assert c.warm_sink.statistics().dropped == 1
            assert_states_equal(await committed_state(c), await reference(log))
