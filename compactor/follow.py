"""``compact --follow``: a daemon that compacts logs as entries arrive.

Each log gets its own task and its own lease; they compact in parallel. A
task polls the counter (one consistent read) and runs a compaction only
when the head is past the committed hwm, backing off while nothing
arrives. Notifications are not needed: every run reads from hwm, so a
missed wake-up delays work but loses nothing.

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
    while True:
        try:
            result = await _step(compactor, on_lag)
        except (Unavailable, Conflict, Fenced, DataError) as exc:
            # Retryable (every run re-reads the state) or an operator's matter
            # (a poison entry waits for a quarantine): report it and keep
            # following at the slowest pace.
            if on_error is not None:
                on_error(name, exc)
            log.error("%s: %s", name, exc)
            result, delay = None, poll_max
        if result is not None and on_result is not None and result.status != "nothing":
            on_result(result)
        if result is not None and result.status == "applied":
            delay = poll_min
            continue
        await anyio.sleep(delay)
        delay = min(poll_max, delay * 2)


async def _step(
    compactor: Compactor, on_lag: Callable[[str, int, int], None] | None
) -> CompactionResult | None:
    """Run once if the head is past the committed hwm; None when idle."""
    name = compactor.config.log
    state = await compactor.table.read_state(compactor.keys.log_id)
    head = await compactor.log.head()
    if on_lag is not None:
        on_lag(name, head, state.hwm)
    if head <= state.hwm:
        return None
    result = await compactor.run_once()
    if on_lag is not None:
        on_lag(name, await compactor.log.head(), result.hwm_after)
    return result


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
