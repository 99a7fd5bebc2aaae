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

``on_lag(log, head, hwm)`` hears each log's counter and committed hwm at every
poll and after every run (``compact --follow --metrics-port`` serves it).

Stopping (SIGINT or SIGTERM in the CLI) cancels the runs in progress;
their leases are released on the way out and nothing half-done is
committed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import anyio

from compactor.runner import CompactionResult, Compactor
from deltalog.errors import Conflict, DataError, Fenced, Unavailable

__all__ = ["follow", "follow_one"]

log = logging.getLogger("compactor.follow")


async def follow_one(
    compactor: Compactor,
    *,
    poll_min: float = 0.5,
    poll_max: float = 10.0,
    on_result: Callable[[CompactionResult], None] | None = None,
    on_error: Callable[[str, Exception], None] | None = None,
    on_lag: Callable[[str, int, int], None] | None = None,
) -> None:
    """Compact one log until cancelled."""
    delay = poll_min
    name = compactor.config.log
    watch = _Watch(compactor, on_lag)
    while True:
        try:
            result = await watch.step()
        except (Unavailable, Conflict, Fenced, DataError) as exc:
            # Retryable (every run re-reads the state) or an operator's matter
            # (a poison entry waits for a quarantine): report it and keep
            # following at the slowest pace.
            if on_error is not None:
                on_error(name, exc)
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
    """The head counter and the hwm a follower last knew of one log."""

    def __init__(
        self, compactor: Compactor, on_lag: Callable[[str, int, int], None] | None
    ) -> None:
        self.compactor = compactor
        self.on_lag = on_lag
        self.hwm: int | None = None
        """The committed hwm last read or committed; None: read the state at the next poll."""

    def forget(self) -> None:
        self.hwm = None

    async def step(self) -> CompactionResult | None:
        """Run once if the head is past the committed hwm; None when idle.

        The head is read at every poll; the state only when the head is past
        the hwm known (no commit can move hwm past the head, so an idle log
        costs one read).
        """
        compactor, name = self.compactor, self.compactor.config.log
        head = await compactor.log.head()
        if self.hwm is None or head > self.hwm:
            self.hwm = (await compactor.table.read_state(compactor.keys.log_id)).hwm
        self._lag(name, head, self.hwm)
        if head <= self.hwm:
            return None
        result = await compactor.run_once()
        self.hwm = result.hwm_after
        self._lag(name, await compactor.log.head(), result.hwm_after)
        return result

    def _lag(self, name: str, head: int, hwm: int) -> None:
        if self.on_lag is not None:
            self.on_lag(name, head, hwm)


async def follow(
    compactors: list[Compactor],
    *,
    poll_min: float = 0.5,
    poll_max: float = 10.0,
    on_result: Callable[[CompactionResult], None] | None = None,
    on_error: Callable[[str, Exception], None] | None = None,
    on_lag: Callable[[str, int, int], None] | None = None,
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
