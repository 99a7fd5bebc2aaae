"""Processes that die or stall: ``kill -9`` and ``SIGSTOP`` on real child processes.

- a compactor killed at random moments, again and again, while producers
  append: every restart converges, and the end state equals a rebuild and
  a plain-Python reference fold;
- a compactor paused past its lease: another takes over and commits; woken
  up, the first never commits and exits with ``LeaseLost``;
- producers killed between reserving a seq and writing it: the holes are
  sealed once older than the grace period, nothing acknowledged is lost.

The compactors are ``python -m deltalog compact`` and the producers
``python -m tests.procs`` against moto's server; ``ChildProcesses`` kills any
child still running when a test ends, failed or not.
"""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import anyio
import numpy as np
import pytest

from compactor import Compactor
from deltalog import Delta, DeltaLog, LogConfig, Upsert
from deltalog.cli.soak import (
    ChildProcess,
    ChildProcesses,
    Ledger,
    compactor_argv,
    produce,
    random_delta,
)
from deltalog.entry import Seal
from deltalog.storage.endpoint import FAKE_CREDENTIALS
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import Commit, LogState, MemoryTable, Table
from tests import procs
from tests.compaction import assert_states_equal, committed_state
from tests.oracle import oracle_state

LEASE_TTL = 1.0
WHEN = ["any time"] * 2 + ["holding the lease"] * 4 + ["after a commit"] * 2
"""When the kills land (then 0-1 s later): any time (starting, idle), while it holds the
lease (reading, applying, publishing, committing), after it committed (the next run)."""
KILLS = len(WHEN)


@pytest.fixture
def children(tmp_path: Path) -> Iterator[ChildProcesses]:
    with ChildProcesses(tmp_path / "children", env=FAKE_CREDENTIALS) as started:
        yield started


class HwmWatch:
    """Samples the committed hwm every 50 ms while a test runs; it must never go back."""

    def __init__(self) -> None:
        self.samples: list[int] = []

    async def run(self, table: Table, log_id: str) -> None:
        while True:
            self.samples.append((await table.read_state(log_id)).hwm)
            await anyio.sleep(0.05)


@asynccontextmanager
async def watching(log: DeltaLog) -> AsyncIterator[HwmWatch]:
    watch = HwmWatch()
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.run, log.table, log.keys.log_id)
        yield watch
        tg.cancel_scope.cancel()
    assert watch.samples, "no hwm sampled"
    assert watch.samples == sorted(watch.samples), f"hwm went back: {watch.samples}"


async def holds_lease(table: Table, log_id: str, child: ChildProcess) -> bool:
    """Whether ``child`` holds the lease now (owner ids are ``host:pid:nonce``)."""
    owner = (await table.read_state(log_id)).owner or ""
    return f":{child.pid}:" in owner


async def until_it_holds_the_lease(table: Table, log_id: str, child: ChildProcess) -> None:
    with anyio.fail_after(30):
        while not await holds_lease(table, log_id, child):
            assert child.returncode is None, f"the compactor died: {child.stderr()}"
            await anyio.sleep(0.02)


async def until_it_commits(table: Table, log_id: str, child: ChildProcess) -> None:
    """Until the hwm moves past where it was, under ``child``'s lease."""
    start = (await table.read_state(log_id)).hwm
    with anyio.fail_after(60):
        while (await table.read_state(log_id)).hwm <= start:
            assert child.returncode is None, f"the compactor died: {child.stderr()}"
            await anyio.sleep(0.02)


async def compact_to_head(compactor: Compactor, log: DeltaLog) -> None:
    """Run until hwm is the head (a killed compactor's lease expires by itself)."""
    with anyio.fail_after(60):
        while True:
            result = await compactor.run_once()
            if result.status != "busy" and result.hwm_after == await log.head():
                return
            await anyio.sleep(0.2)


async def test_a_compactor_killed_at_random_moments_converges(
    log: DeltaLog,
    config: LogConfig,
    children: ChildProcesses,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    """kill -9 mid-run (read, apply, publish, commit, release) or idle, restart, again."""
    async with watching(log) as watch:
        argv = compactor_argv(config, cache_dir=tmp_path / "cache", lease_ttl=LEASE_TTL, grace=1.0)
        ledger, stop = Ledger(), anyio.Event()
        mid_run = 0
        async with (
            log.producer(linger_ms=5, max_deltas=32) as producer,
            anyio.create_task_group() as tg,
        ):
            for _ in range(4):
                tg.start_soon(functools.partial(produce, pause=0.02), producer, ledger, rng, stop)
            for when in rng.permutation(WHEN):
                child = children.start("compactor", argv)
                if when == "holding the lease":
                    await until_it_holds_the_lease(log.table, log.keys.log_id, child)
                elif when == "after a commit":
                    await until_it_commits(log.table, log.keys.log_id, child)
                await anyio.sleep(float(rng.uniform(0, 1.0)))
                mid_run += await holds_lease(log.table, log.keys.log_id, child)
                child.kill()
                with anyio.fail_after(10):
                    assert await child.exited() == -9
            stop.set()
        committed_under_kills = watch.samples[-1]
        async with Compactor(config, cache_dir=tmp_path / "cache", lease_ttl=LEASE_TTL) as last:
            await compact_to_head(last, log)
            entries = [item async for item in log.read()]
            assert ledger.audit(entries) == ([], []), "lost or duplicated deltas"
            want = {c: dict(r) for c, r in oracle_state(entries).items() if r}
            assert_states_equal(await committed_state(last), want)
            verified = await last.verify()
            assert verified.ok, verified.differences
        print(
            f"{KILLS} kills ({mid_run} while holding the lease); {len(ledger.acked)} deltas; "
            f"hwm {committed_under_kills} committed under kills, head {await log.head()}"
        )
        assert mid_run >= 2, "kills must land mid-run"
        assert committed_under_kills > 0, "the killed compactors never committed"
        assert not ledger.failed


async def test_a_compactor_paused_past_its_lease_is_fenced(
    log: DeltaLog,
    config: LogConfig,
    children: ChildProcesses,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    async with watching(log):
        for i in range(20):  # a run of seconds: the pause lands mid-run
            ids = [f"e{i}-{j}" for j in range(300)]
            vectors = rng.standard_normal((len(ids), 8), dtype=np.float32)
            await log.append(Delta(ops=[Upsert("words", ids, vectors)]))
        argv = compactor_argv(
            config, cache_dir=tmp_path / "a", lease_ttl=LEASE_TTL, grace=1.0, follow=False
        )
        zombie = children.start("compactor", argv)
        await until_it_holds_the_lease(log.table, log.keys.log_id, zombie)
        zombie.pause()
        paused = await log.table.read_state(log.keys.log_id)
        assert (paused.hwm, paused.token) == (0, 1), (
            "paused after it committed: make the run longer"
        )
        await anyio.sleep(LEASE_TTL * 2)
        async with Compactor(config, cache_dir=tmp_path / "b", lease_ttl=LEASE_TTL) as other:
            taken = await other.run_once()
            assert (taken.status, taken.hwm_after, taken.token) == ("applied", 20, 2)
            zombie.resume()
            with anyio.fail_after(60):
                code = await zombie.exited()
            assert code == 1, zombie.stderr()
            assert "LeaseLost" in zombie.stderr()
            state = await log.table.read_state(log.keys.log_id)
            assert (state.hwm, state.snapshot_key, state.token) == (20, taken.snapshot_key, 2)
            snapshots = [i.key async for i in log.store.list_after(log.keys.snapshots_prefix)]
            assert snapshots == [taken.snapshot_key], "the zombie's upload is never kept"
            assert (await other.verify()).ok


GRACE = 3.0


async def until_printed(child: ChildProcess, lines: int) -> list[str]:
    """The first ``lines`` lines ``child`` printed, once it has."""
    with anyio.fail_after(30):
        while (printed := child.stdout().count("\n")) < lines:
            assert child.returncode is None, child.stderr()
            await anyio.sleep(0.02)
    return child.stdout().split("\n")[:printed]


async def kill(child: ChildProcess) -> None:
    child.kill()
    with anyio.fail_after(10):
        await child.exited()


async def test_producers_killed_between_reserve_and_write_leave_holes_that_are_sealed(
    log: DeltaLog,
    config: LogConfig,
    children: ChildProcesses,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    async with watching(log):
        compactor = Compactor(config, cache_dir=tmp_path / "cache", grace=GRACE, lease_ttl=5)
        async with compactor:
            produce, reserve = procs.argv("produce", config), procs.argv("reserve", config)
            first = children.start("producer", [*produce, "--seed", "1"])
            second = children.start("producer", [*produce, "--seed", "2"])
            middle = children.start("reserver", [*reserve, "--count", "2"])
            tail = children.start("reserver", [*reserve, "--count", "1"])
            await until_printed(first, 20)
            await until_printed(middle, 1)
            middle.signal(signal.SIGUSR1)
            holes = [int(seq) for seq in (await until_printed(middle, 3))[1:]]
            await kill(middle)
            await until_printed(first, len(first.stdout().split("\n")) + 20)  # entries after them
            async with Compactor(config, cache_dir=tmp_path / "patient", grace=60) as patient:
                young = await patient.run_once()  # the holes are seconds old
            assert (young.stopped, young.hwm_after) == ("hole", holes[0] - 1), young

            for child in (first, second):  # at random moments: perhaps mid-append
                await anyio.sleep(float(rng.uniform(0, 0.3)))
                await kill(child)
            await until_printed(tail, 1)
            tail.signal(signal.SIGUSR1)
            holes += [int(seq) for seq in (await until_printed(tail, 2))[1:]]  # nothing after it
            await kill(tail)

            started = time.monotonic()
            await compact_to_head(compactor, log)
            # The last hole has no entry after it: its age counts from when a
            # compactor first saw it (recorded in the state item).
            assert time.monotonic() - started >= GRACE, "sealed before the grace period"
            entries = [item async for item in log.read()]
            seals = [seq for seq, entry in entries if isinstance(entry, Seal)]
            assert set(holes) <= set(seals), (holes, seals)
            acked = procs.acknowledged(first.stdout()) | procs.acknowledged(second.stdout())
            ledger = Ledger(acked=acked)
            assert ledger.audit(entries) == ([], [])
            want = {c: dict(r) for c, r in oracle_state(entries).items() if r}
            assert_states_equal(await committed_state(compactor), want)

            async with log.producer() as producer:  # compaction goes on
                for _ in range(5):
                    await producer.submit(
                        Delta(ops=[Upsert("words", ["after"], np.ones((1, 8), np.float32))])
                    )
            assert (await compactor.run_once()).hwm_after == await log.head()
            assert (await compactor.verify()).ok
        print(f"holes {holes} sealed; seals at {seals}; {len(ledger.acked)} acknowledged deltas")


class PausedAfterCommitTable(MemoryTable):
    """The items of ``shared``; the first commit lands, then its caller stops until ``gate``."""

    def __init__(self, shared: MemoryTable, gate: anyio.Event, committed: anyio.Event) -> None:
        super().__init__()
        self._heads = shared._heads
        self._dims = shared._dims
        self._claims = shared._claims
        self._states = shared._states
        self._quarantined = shared._quarantined
        self.gate = gate
        self.committed = committed

    async def commit(
        self, log_id: str, owner: str, token: int, *, prev_hwm: int, commit: Commit, now: float
    ) -> LogState:
        state = await super().commit(
            log_id, owner, token, prev_hwm=prev_hwm, commit=commit, now=now
        )
        self.committed.set()
        await self.gate.wait()
        return state


async def test_a_compactor_paused_after_its_commit_deletes_no_newer_snapshot(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    """Retention runs after the commit, perhaps long after: the lease may be gone by then."""
    config = LogConfig(bucket="memory", table="memory", log="mem")
    store, table = MemoryStore(), MemoryTable()
    gate, committed = anyio.Event(), anyio.Event()
    paused = PausedAfterCommitTable(table, gate, committed)
    async with DeltaLog.open(config, store=store, table=table) as log:
        for _ in range(3):
            await log.append(random_delta(rng))
        # A long lease: its heartbeat stays asleep, as in a stopped process.
        zombie = Compactor(
            config, cache_dir=tmp_path / "a", store=store, table=paused, lease_ttl=60, retain=1
        )
        async with zombie, anyio.create_task_group() as tg:
            tg.start_soon(zombie.run_once)
            await committed.wait()
            state = await table.read_state(log.keys.log_id)
            table._states[log.keys.log_id] = replace(state, expires_at=0.0)  # time passes
            await log.append(random_delta(rng))
            async with Compactor(
                config, cache_dir=tmp_path / "b", store=store, table=table, retain=1
            ) as other:
                taken = await other.run_once()
                assert taken.status == "applied"
                committed_key = taken.snapshot_key or ""
                # A compactor killed after its upload, before its commit, left this:
                orphan = log.keys.snapshot(taken.hwm_after + 1, 9, "orphan")
                await store.put_if_absent(orphan, b"never committed")
                gate.set()  # the zombie wakes up and applies the retention
        assert await store.get(committed_key) is not None, "the committed snapshot is gone"
        async with Compactor(config, cache_dir=tmp_path / "c", store=store, table=table) as c:
            await log.append(random_delta(rng))
            assert (await c.run_once()).status == "applied"
