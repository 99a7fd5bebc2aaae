"""The lease keeper: heartbeat every ttl/3 on (owner, token), loss cancels the run."""

from __future__ import annotations

import statistics
import time

import anyio
import pytest

from compactor.lease import Lease, LeaseKeeper
from deltalog.errors import LeaseLost
from deltalog.keys import STATE_SK
from deltalog.storage.table import MemoryTable

LOG = "lease-log"


class RecordingTable(MemoryTable):
    """Records every renewal: when, by whom, with which token."""

    def __init__(self) -> None:
        super().__init__()
        self.renewals: list[tuple[float, str, int]] = []
        self.renewed = anyio.Event()
        """Set at the next renewal (then replaced)."""

    async def renew(
        self, log_id: str, owner: str, token: int, *, ttl: float, now: float, sk: str = STATE_SK
    ) -> None:
        self.renewals.append((time.monotonic(), owner, token))
        await super().renew(log_id, owner, token, ttl=ttl, now=now, sk=sk)
        self.renewed.set()
        self.renewed = anyio.Event()


async def heartbeat_until(keeper: LeaseKeeper, lease: Lease, renewals: int) -> None:
    """Run the heartbeat until it has renewed ``renewals`` times (bounded), then stop it."""
    table = keeper.table
    assert isinstance(table, RecordingTable)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(keeper.heartbeat, lease, tg.cancel_scope)
            while len(table.renewals) < renewals:
                await table.renewed.wait()
            tg.cancel_scope.cancel()


async def test_heartbeat_renews_every_third_of_the_ttl_with_owner_and_token() -> None:
    """Renewals come a third of the ttl apart: never sooner (a lower bound, which load
    cannot break), and well before the ttl (the median gap, at a ttl long enough that a
    loaded machine's scheduling delays do not reach it)."""
    ttl = 1.2
    table = RecordingTable()
    await table.acquire(LOG, "before", ttl=0.01, now=time.time() - 1)  # an expired holder
    keeper = LeaseKeeper(table, LOG, ttl=ttl, owner="me")
    lease = await keeper.acquire()
    assert lease.token == 2
    started = time.monotonic()
    await heartbeat_until(keeper, lease, 3)
    assert lease.lost is None
    times = [t - started for t, _, _ in table.renewals]
    assert len(times) >= 3, times  # at about 0.4, 0.8, 1.2 s
    assert {(owner, token) for _, owner, token in table.renewals} == {("me", 2)}
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert all(gap >= 0.95 * ttl / 3 for gap in gaps), gaps  # not faster than ttl/3
    assert statistics.median(gaps) < ttl, gaps  # about ttl/3, before the lease expires
    state = await table.read_state(LOG)
    assert state.owner == "me" and state.expires_at > time.time()
    assert lease.renewals == len(times)


async def test_a_late_heartbeat_renews_if_nobody_took_the_lease() -> None:
    """The event loop stalled past the expiry: fencing, not the local clock, decides."""
    table = RecordingTable()
    clock = [1000.0]
    keeper = LeaseKeeper(table, LOG, ttl=0.3, owner="me", clock=lambda: clock[0])
    lease = await keeper.acquire()
    clock[0] += 5.0  # far past expires_at = 1000.3
    await heartbeat_until(keeper, lease, 1)
    assert lease.lost is None and lease.renewals >= 1
    assert (await table.read_state(LOG)).expires_at == pytest.approx(1005.3)


async def test_a_taken_lease_fails_the_renewal_and_cancels_the_run() -> None:
    table = MemoryTable()
    keeper = LeaseKeeper(table, LOG, ttl=0.3, owner="me")
    lease = await keeper.acquire()
    await table.acquire(LOG, "intruder", ttl=30, now=time.time() + 60)
    cancelled = True
    with anyio.fail_after(60):  # a bound, not a timing: the heartbeat comes in ttl/3
        async with anyio.create_task_group() as tg:
            tg.start_soon(keeper.heartbeat, lease, tg.cancel_scope)
            await anyio.sleep_forever()
            cancelled = False
    assert cancelled, "the heartbeat must cancel the run's scope"
    assert isinstance(lease.lost, LeaseLost)
    with pytest.raises(LeaseLost):
        lease.check()
    assert await keeper.release(lease) is False
    state = await table.read_state(LOG)
    assert (state.owner, state.token) == ("intruder", 2)


class StalledTable(MemoryTable):
    """A table whose renewals never answer (an endpoint stalled behind a loaded machine)."""

    async def renew(
        self, log_id: str, owner: str, token: int, *, ttl: float, now: float, sk: str = STATE_SK
    ) -> None:
        await anyio.sleep_forever()


async def test_a_renewal_that_never_answers_loses_the_lease_and_says_why() -> None:
    """Each attempt times out (a TimeoutError says nothing itself): the loss names the
    bound each attempt had and what to do, rather than an empty reason."""
    clock = [1000.0]
    keeper = LeaseKeeper(StalledTable(), LOG, ttl=0.3, owner="me", clock=lambda: clock[0])
    lease = await keeper.acquire()
    clock[0] += 5.0  # past the expiry: the first failed attempt is the last
    with anyio.fail_after(60), pytest.raises(LeaseLost) as lost:
        await keeper._renew(lease)
    assert "(each renewal took longer than 0.1 s)" in str(lost.value), str(lost.value)
    assert "longer ttl or run fewer compactors" in str(lost.value)
