"""``compact --follow``: a daemon that compacts logs as entries arrive.

Each log gets its own task and its own lease; they compact in parallel. A
task watches the head counter (one consistent read per poll) and runs a
compaction as soon as the head is past the hwm it last knew, backing off
exponentially (``poll_min`` doubling to ``poll_max``) while nothing
arrives, and polling again at once after a run that applied something.
The state item is read only when the head moved past that hwm (another
compactor may have committed meanwhile), so an idle follower costs one
read per poll. Notifications are not needed: every run reads from hwm, so
a missed wake-up delays work but loses nothing.

The compactor keeps its live copy open between runs (its warm sink,
``compactor.working``), so a run that follows another pays neither
Chroma's open nor its index's load.

``on_lag(compactor, head, hwm)`` hears each log's (or shard's) counter and
committed hwm at every poll and after every run (``compact --follow
--metrics-port`` serves it); ``on_error(compactor, exc)`` each failed run.

Stopping (SIGINT or SIGTERM in the CLI) cancels the runs in progress;
their leases are released on the way out and nothing half-done is
committed.

A sharded log (``follow_log``) gets one follower per shard, each with its
own lease, so shards never wait on each other. The layout is read again
every ``poll_max`` seconds and whenever a shard answers ``Resharded``: when
it changed (a reshard was proposed, or switched), the followers restart
with the new shards.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

import anyio

from compactor.runner import CompactionResult, Compactor
from compactor.shards import ShardedCompactor
from deltalog.errors import Conflict, DataError, Fenced, Resharded, Unavailable

__all__ = ["follow", "follow_log", "follow_one"]

log = logging.getLogger("compactor.follow")


async def follow_one(
    compactor: Compactor,
    *,
    poll_min: float = 0.5,
    poll_max: float = 10.0,
    on_result: Callable[[CompactionResult], None] | None = None,
    on_error: Callable[[Compactor, Exception], None] | None = None,
    on_lag: Callable[[Compactor, int, int], None] | None = None,
) -> None:
    """Compact one log (or one shard) until cancelled, or until it is resharded.

    ``Resharded`` (a reshard retired its state) is raised: the caller reads
    the layout again (``follow_log`` does).
    """
    delay = poll_min
    name = _name(compactor)
    watch = _Watch(compactor, on_lag)
    while True:
        try:
            result = await watch.step()
        except Resharded:
            raise
        except (Unavailable, Conflict, Fenced, DataError) as exc:
            # Retryable (every run re-reads the state) or an operator's matter
            # (a poison entry waits for a quarantine): report it and keep
            # following at the slowest pace.
            if on_error is not None:
                on_error(compactor, exc)
            log.error("%s: %s", name, exc)
            watch.forget()
            result, delay = None, poll_max
        if result is not None and on_result is not None and result.status != "nothing":
            on_result(result)
        if result is not None and result.status == "applied":
            delay = poll_min
            continue
        await anyio.sleep(delay)
        delay = min(poll_max, delay * 2)


class _Watch:
    """The head counter and the hwm a follower last knew of one log (or one shard)."""

    def __init__(
        self, compactor: Compactor, on_lag: Callable[[Compactor, int, int], None] | None
    ) -> None:
        self.compactor = compactor
        self.on_lag = on_lag
        self.hwm: int | None = None
        """The committed hwm last read or committed; None: read the state at the next poll."""

    def forget(self) -> None:
        self.hwm = None

    async def step(self) -> CompactionResult | None:
        """Run once if the head is past the committed hwm; None when idle.

        The head is read at every poll; the state (the shard's, for a shard)
        only when the head is past the hwm known (no commit can move hwm past
        the head, so an idle log costs one read).
        """
        compactor = self.compactor
        head = await compactor.log.head()
        if self.hwm is None or head > self.hwm:
            self.hwm = (await compactor.read_state()).hwm
        self._lag(head, self.hwm)
        if head <= self.hwm:
            return None
        result = await compactor.run_once()
        self.hwm = result.hwm_after
        self._lag(await compactor.log.head(), result.hwm_after)
        return result

    def _lag(self, head: int, hwm: int) -> None:
        if self.on_lag is not None:
            self.on_lag(self.compactor, head, hwm)


async def follow(
    compactors: list[Compactor],
    *,
    poll_min: float = 0.5,
    poll_max: float = 10.0,
    on_result: Callable[[CompactionResult], None] | None = None,
    on_error: Callable[[Compactor, Exception], None] | None = None,
    on_lag: Callable[[Compactor, int, int], None] | None = None,
) -> None:
    """Follow several logs in parallel, each under its own lease, until cancelled."""
    async with anyio.create_task_group() as tg:
        for compactor in compactors:
            run = functools.partial(
                follow_one,
                compactor,
                poll_min=poll_min,
                poll_max=poll_max,
                on_result=on_result,
                on_error=on_error,
                on_lag=on_lag,
            )
            tg.start_soon(run)


def _name(compactor: Compactor) -> str:
    """How the callbacks name a follower: the log, and its shard if it has one."""
    shard = compactor.shard
    return compactor.config.log if shard is None else f"{compactor.config.log} shard {shard.index}"


async def follow_log(
    sharded: ShardedCompactor,
    *,
    poll_min: float = 0.5,
    poll_max: float = 10.0,
    on_result: Callable[[CompactionResult], None] | None = None,
    on_error: Callable[[Compactor, Exception], None] | None = None,
    on_lag: Callable[[Compactor, int, int], None] | None = None,
) -> None:
    """Follow every shard of a log (entered ``ShardedCompactor``) until cancelled.

    One follower per shard, restarted with the new shards whenever the
    layout changes.
    """
    while True:
        async with anyio.create_task_group() as tg:
            run = functools.partial(
                follow,
                sharded.compactors,
                poll_min=poll_min,
                poll_max=poll_max,
                on_result=on_result,
                on_error=on_error,
                on_lag=on_lag,
            )
            tg.start_soon(_until_resharded, run, tg.cancel_scope)
            tg.start_soon(_watch_layout, sharded, poll_max, tg.cancel_scope)
        if not await sharded.refresh():
            await anyio.sleep(poll_max)  # retired, but the switch is not visible yet


async def _until_resharded(run: Callable[[], Awaitable[None]], scope: anyio.CancelScope) -> None:
    try:
        await run()
    except* Resharded as group:
        log.info("resharded: %s", group.exceptions[0])
    scope.cancel()


async def _watch_layout(
    sharded: ShardedCompactor, interval: float, scope: anyio.CancelScope
) -> None:
    """Cancel ``scope`` once the layout's generation or pending generation changed."""
    table, log_id = sharded.log.table, sharded.log.keys.log_id
    seen = (sharded.layout.generation, sharded.layout.pending_generation)
    while True:
        await anyio.sleep(interval)
        try:
            layout = await table.read_layout(log_id)
        except Unavailable as exc:
            log.warning("%s: could not read the layout: %s", log_id, exc)
            continue
        if (layout.generation, layout.pending_generation) != seen:
            scope.cancel()
            return
