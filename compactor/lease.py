"""The compaction lease: who may compact a log, and since which fencing token.

- **lease**: the right to compact one log, held for ``ttl`` seconds and
  renewed by a heartbeat every ``ttl / 3``.
- **token**: a number that grows by one on every acquire. Every write the
  holder makes to the state item is conditioned on (owner, token), so a
  compactor that paused past its lease is fenced off when it wakes: its
  renewals and its commit fail, whatever the clocks say.

A failed renewal cancels the run that holds the lease: ``LeaseKeeper``
cancels the run's cancel scope and records ``LeaseLost``, which the run
raises once its task group has unwound. Nothing is committed after it.

- **named lease**: the same protocol on an item of its own
  (``LeaseKeeper(..., name=...)``): a reader that owns a target outside the
  log, such as ``deltalog mirror``'s Chroma server, holds one per target.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from deltalog.errors import LeaseBusy, LeaseLost, Unavailable
from deltalog.keys import STATE_SK
from deltalog.storage.table import LeaseState, LogState, Table

__all__ = ["Lease", "LeaseKeeper", "new_owner"]

log = logging.getLogger("compactor.lease")


def new_owner() -> str:
    """A unique owner id that also tells an operator where the holder runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(slots=True)
class Lease:
    """A lease we hold: the state read when it was acquired.

    For a named lease only ``owner``, ``token`` and ``expires_at`` of
    ``state`` are filled.
    """

    log_id: str
    owner: str
    state: LogState
    lost: LeaseLost | None = None
    renewals: int = 0
    expires_at: float = field(default=0.0)
    valid_until: float = 0.0
    """On this process's monotonic clock: the acquire or the last renewal that
    succeeded was *sent* at ``valid_until - ttl``, so the table cannot have
    let anyone else take the lease before ``valid_until`` (whatever the wall
    clocks say, up to the rate at which the two machines' clocks drift)."""
    committed: int | None = None
    """The hwm this holder committed under the lease, once it did."""

    @property
    def token(self) -> int:
        return self.state.token

    def check(self) -> None:
        """Raise ``LeaseLost`` if the heartbeat found the lease gone."""
        if self.lost is not None:
            raise self.lost


class LeaseKeeper:
    """Acquires, renews and releases the lease of one log (or a named lease of it)."""

    def __init__(
        self,
        table: Table,
        log_id: str,
        *,
        ttl: float = 30.0,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        poll: float = 0.1,
        name: str | None = None,
        sk: str = STATE_SK,
    ) -> None:
        if ttl <= 0:
            raise ValueError("the lease ttl must be positive")
        self.poll = poll
        """How often a waiting ``acquire`` reads the state (a holder's gap between runs
        can be short: a follower under load releases and takes it again at once)."""
        self.table = table
        self.log_id = log_id
        self.ttl = ttl
        self.owner = owner or new_owner()
        self.clock = clock
        self.name = name
        """None: the compaction lease in the state item; else a named lease."""
        self.sk = sk
        """The state item holding the compaction lease: the log's, or a shard's."""

    async def _take(self, now: float) -> LogState:
        if self.name is None:
            return await self.table.acquire(
                self.log_id, self.owner, ttl=self.ttl, now=now, sk=self.sk
            )
        named = await self.table.acquire_lease(
            self.log_id, self.name, self.owner, ttl=self.ttl, now=now
        )
        return _as_state(named)

    async def _extend(self, token: int, now: float) -> None:
        if self.name is None:
            await self.table.renew(
                self.log_id, self.owner, token, ttl=self.ttl, now=now, sk=self.sk
            )
        else:
            await self.table.renew_lease(
                self.log_id, self.name, self.owner, token, ttl=self.ttl, now=now
            )

    async def _give_up(self, token: int, last_run: str) -> bool:
        if self.name is None:
            return await self.table.release(
                self.log_id, self.owner, token, last_run=last_run, sk=self.sk
            )
        return await self.table.release_lease(self.log_id, self.name, self.owner, token)

    async def acquire(self, *, wait: float = 0.0) -> Lease:
        """Take the lease; ``LeaseBusy`` if another compactor holds it for ``wait`` seconds more.

        While it waits it reads the state every ``poll`` seconds and tries
        again as soon as the lease is free or expired (a holder that died
        lets it go after its ttl).
        """
        deadline = anyio.current_time() + wait
        while True:
            try:
                return await self._acquire_once()
            except LeaseBusy as exc:
                if anyio.current_time() >= deadline:
                    if wait > 0:
                        raise LeaseBusy(
                            f"{exc.message}; waited {wait:g}s for it", log=self.log_id
                        ) from exc
                    raise
                await self._until_free(deadline)

    async def _until_free(self, deadline: float) -> None:
        """Return once the state says the lease is free or expired, or at ``deadline``."""
        while anyio.current_time() < deadline:
            await anyio.sleep(min(self.poll, max(0.0, deadline - anyio.current_time())))
            if (await self._reread()).lease_free(self.clock()):
                return

    async def _acquire_once(self) -> Lease:
        """Take the lease (``LeaseBusy`` if another compactor holds it).

        Shielded from cancellation: a cancel arriving while the request is in
        flight would leave the lease taken without the caller knowing that it
        holds it, so nobody would release it before it expires.
        """
        now, sent = self.clock(), time.monotonic()
        with anyio.CancelScope(shield=True):
            try:
                state = await self._take(now)
            except (LeaseBusy, Unavailable):
                # Our request may have landed with its answer lost, and botocore's
                # retry of it found the lease busy: held by us. Owners are unique.
                state = await self._reread()
                if state.owner != self.owner:
                    raise
        return Lease(
            self.log_id, self.owner, state, expires_at=now + self.ttl, valid_until=sent + self.ttl
        )

    async def _reread(self) -> LogState:
        if self.name is None:
            return await self.table.read_state(self.log_id, sk=self.sk)
        return _as_state(await self.table.read_lease(self.log_id, self.name))

    async def renew(self, lease: Lease) -> None:
        """Renew now (``LeaseLost`` if it is gone): a check that the lease is still ours."""
        lease.check()
        now, sent = self.clock(), time.monotonic()
        await self._extend(lease.token, now)
        self._renewed(lease, now, sent)

    def _renewed(self, lease: Lease, now: float, sent: float) -> None:
        lease.expires_at = now + self.ttl
        lease.valid_until = sent + self.ttl
        lease.renewals += 1

    async def heartbeat(self, lease: Lease, run: anyio.CancelScope) -> None:
        """Renew every ttl/3 until cancelled; on loss, record it and cancel ``run``."""
        while True:
            await anyio.sleep(self.ttl / 3)
            try:
                await self._renew(lease)
            except LeaseLost as exc:
                lease.lost = exc
                run.cancel()
                return

    async def _renew(self, lease: Lease) -> None:
        """Renew, retrying transient failures until the lease would have expired.

        A late heartbeat (the process or its event loop stalled past the
        expiry) still tries: the renewal is conditioned on owner and token,
        so it succeeds only if nobody took the lease meanwhile, which is safe.
        """
        while True:
            now, sent = self.clock(), time.monotonic()
            try:
                # botocore backs off for seconds between its own retries: bound
                # each attempt to a third of the lease and then try afresh.
                with anyio.fail_after(self.ttl / 3):
                    await self._extend(lease.token, now)
            except (Unavailable, TimeoutError) as exc:
                if self.clock() >= lease.expires_at:
                    why = str(exc) or (
                        f"each renewal took longer than {self.ttl / 3:g} s"
                        if isinstance(exc, TimeoutError)
                        else type(exc).__name__
                    )
                    raise LeaseLost(
                        f"lease expired: could not renew it in time ({why}); the table did not "
                        "answer in time (an overloaded machine or endpoint): give the lease a "
                        "longer ttl or run fewer compactors at once",
                        log=self.log_id,
                    ) from exc
                await anyio.sleep(min(1.0, self.ttl / 10))
                continue
            self._renewed(lease, now, sent)
            return

    async def release(self, lease: Lease, *, last_run: str = "") -> bool:
        """Give the lease up, shielded from cancellation; False if it was gone."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            try:
                return await self._give_up(lease.token, last_run)
            except Unavailable as exc:
                log.warning(
                    "could not release the lease of %s (%s): it expires by itself", self.log_id, exc
                )
                return False
        log.warning("releasing the lease of %s timed out: it expires by itself", self.log_id)
        return False


def _as_state(lease: LeaseState) -> LogState:
    return LogState(
        owner=lease.owner,
        token=lease.token,
        expires_at=lease.expires_at,
        updated_at=lease.updated_at,
    )
