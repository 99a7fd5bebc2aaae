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
from deltalog.storage.table import Table
from tests import procs
from tests.compaction import (
    Match,
    assert_states_equal,
    committed_state,
    entry_read,
    held_once,
    snapshot_listing,
    state_read,
    until_not_busy,
    until_reached,
    until_stopped,
)
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


async def until_stopped_holding_the_lease(
    table: Table, log_id: str, child: ChildProcess, rng: np.random.Generator
) -> None:
    """Stop ``child`` at a random moment of a run, while it holds the lease (seen stopped)."""
    with anyio.fail_after(60):
        while True:
            await until_it_holds_the_lease(table, log_id, child)
            await anyio.sleep(float(rng.uniform(0, 0.3)))  # somewhere in the run, perhaps
            child.pause()
            await until_stopped(child.pid)
            if await holds_lease(table, log_id, child):
                return
            child.resume()  # it released meanwhile: catch the next run


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
                    await until_stopped_holding_the_lease(log.table, log.keys.log_id, child, rng)
                    mid_run += 1
                else:
                    if when == "after a commit":
                        await until_it_commits(log.table, log.keys.log_id, child)
                    await anyio.sleep(float(rng.uniform(0, 1.0)))  # anywhere: nothing counts on it
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
        assert committed_under_kills > 0, "the killed compactors never committed"
        assert not ledger.failed


async def test_a_compactor_paused_past_its_lease_is_fenced(
    log: DeltaLog, config: LogConfig, children: ChildProcesses, tmp_path: Path
) -> None:
    """SIGSTOP mid-run (at its first entry read); another takes over; woken, it is fenced."""
    async with watching(log):
        for i in range(3):
            ids = [f"e{i}-{j}" for j in range(50)]
            vectors = np.ones((len(ids), 8), dtype=np.float32) * i
            await log.append(Delta(ops=[Upsert("words", ids, vectors)]))
        async with (
            held_once(config, entry_read) as (proxy_url, reached, go),
            Compactor(config, cache_dir=tmp_path / "b", lease_ttl=LEASE_TTL) as other,
        ):
            argv = compactor_argv(
                replace(config, endpoint_url=proxy_url),
                cache_dir=tmp_path / "a",
                lease_ttl=LEASE_TTL,
                grace=1.0,
                follow=False,
            )
            zombie = children.start("compactor", argv)
            await until_reached(reached, zombie)  # mid-run: holding the lease, uncommitted
            zombie.pause()
            await until_stopped(zombie.pid)
            go.set()  # the read is answered; the zombie sees it when it wakes
            paused = await log.table.read_state(log.keys.log_id)
            assert (paused.hwm, paused.token) == (0, 1)
            assert f":{zombie.pid}:" in (paused.owner or "")
            taken = await until_not_busy(other)  # once the paused zombie's lease expired
            assert (taken.status, taken.hwm_after, taken.token) == ("applied", 3, 2)
            zombie.resume()
            with anyio.fail_after(60):
                code = await zombie.exited()
            assert code == 1, zombie.stderr()
            assert "LeaseLost" in zombie.stderr()
            state = await log.table.read_state(log.keys.log_id)
            assert (state.hwm, state.snapshot_key, state.token) == (3, taken.snapshot_key, 2)
            snapshots = [i.key async for i in log.store.list_after(log.keys.snapshots_prefix)]
            assert snapshots == [taken.snapshot_key], "the zombie's upload is never kept"
            assert (await other.verify()).ok


@pytest.mark.parametrize("held", [state_read, snapshot_listing], ids=lambda m: m.__name__)
async def test_a_compactor_paused_after_its_commit_deletes_no_newer_snapshot(
    held: Match,
    log: DeltaLog,
    config: LogConfig,
    children: ChildProcesses,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    """Retention runs after the commit and the release, perhaps long after.

    A compactor (retain 1, orphan grace 0: it deletes all it may) is stopped
    with SIGSTOP in its retention, before it reads the committed state or
    after; meanwhile another commits, and an upload appears above the
    committed hwm (a newer owner's, about to be committed). Woken up, it
    deletes neither: the state is read after the listing, and an upload at or
    above the state's token may still be committed.
    """
    keys = log.keys
    # Every run publishes (checkpoint ratio 0): retention has snapshots to choose from.
    async with Compactor(
        config, cache_dir=tmp_path / "b", retain=3, checkpoint_ratio=0
    ) as other:  # deletes none
        await log.append(random_delta(rng))
        s0 = (await other.run_once()).snapshot_key
        await log.append(random_delta(rng))
        async with held_once(config, held) as (proxy_url, reached, go):
            argv = compactor_argv(
                replace(config, endpoint_url=proxy_url),
                cache_dir=tmp_path / "z",
                lease_ttl=30,
                grace=60,
                follow=False,
                extra=("--retain", "1", "--orphan-grace", "0", "--checkpoint-ratio", "0"),
            )
            zombie = children.start("compactor", argv)
            await until_reached(reached, zombie)
            zombie.pause()
            await until_stopped(zombie.pid)
            s1 = (await log.table.read_state(keys.log_id)).snapshot_key  # committed, released
            await log.append(random_delta(rng))
            taken = await other.run_once()
            s2 = taken.snapshot_key
            assert (taken.status, taken.hwm_after) == ("applied", 3)
            orphan = keys.snapshot(4, 99, "orphan")  # a newer owner's upload, about to commit
            assert await log.store.put_if_absent(orphan, b"not committed yet")
            go.set()
            zombie.resume()
            with anyio.fail_after(60):
                assert await zombie.exited() == 0, zombie.stderr()
    left = {i.key async for i in log.store.list_after(keys.snapshots_prefix)}
    assert s0 not in left, "the compactor's retention ran"
    # It reads the state after listing, so held at either it follows the other's
    # commit: its own s1 is superseded, s2 committed, the upload's token above.
    assert s1 not in left, "its own snapshot is superseded"
    assert left == {s2, orphan}


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
