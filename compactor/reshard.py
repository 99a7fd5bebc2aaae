"""``deltalog reshard --shards M``: a new layout generation, rebuilt from the log.

The log is the source of truth and indexes are derived, so changing a log's
shard count is a rebuild (DESIGN.md "Shards"). From generation ``g`` with
``N`` shards to ``g + 1`` with ``M``:

1. **propose**: one compare-and-set of the layout item records the pending
   generation (``pending_generation = g + 1``, ``pending_shards = M``).
   Readers ignore it; from now on every compaction of the log
   (``ShardedCompactor``) also compacts the pending shards.
2. **build**: the pending shards are compacted from seq 1, all in parallel,
   each under its own lease, committing every ``build_seconds`` (a killed
   build keeps what it committed), until every pending shard is within
   ``lag`` entries of the current generation's cut. Meanwhile the current
   shards keep serving and compacting.
3. **freeze**: every current shard's state item is retired by generation
   ``g + 1``: from then on no compactor of the old generation acquires,
   renews or commits there (the fence; ``Resharded``). Readers go on
   reading the frozen shards.
4. **switch**: the old shards' final cut becomes the new layout's
   ``floor`` (readers never show less), and one compare-and-set of the
   layout item makes ``g + 1`` current and lists ``g`` as retiring.
5. **retire**: compaction runs delete the old generation's checkpoints
   once ``retire_grace`` has passed since the switch.

Every step can be repeated, so a reshard killed at any point is finished by
running the same command again (a reshard to another count is refused until
then). Nothing of the log is ever rewritten.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio

from compactor.replay import Limits
from compactor.shards import ShardedCompactor
from deltalog.config import LogConfig
from deltalog.errors import Conflict, InvalidInput, LeaseLost, Unavailable
from deltalog.log import DeltaLog
from deltalog.shards import (
    check_shard_count,
    current_shards,
    cut,
    pending_shards,
    read_states,
)
from deltalog.storage.store import ObjectStore
from deltalog.storage.table import Layout, Retiring, Table

__all__ = ["BuildRound", "ReshardResult", "finish", "progress_of", "propose", "reshard"]

log = logging.getLogger("compactor.reshard")

DEFAULT_BUILD_SECONDS = 300.0
"""How long a build round replays before it commits (what a killed reshard keeps)."""
DEFAULT_LAG = 100
"""How close (in seqs) the new shards get to the old cut before the switch."""
_TRANSIENT = (LeaseLost, Unavailable, Conflict)
"""Build runs that failed with these committed nothing; the next round runs them again."""


@dataclass(frozen=True, slots=True)
class BuildRound:
    """Where a build stands after one round: the new shards' hwms and the old cut."""

    hwms: list[int]
    cut: int
    """The current generation's cut, which the new shards chase."""


@dataclass(frozen=True, slots=True)
class ReshardResult:
    """What ``reshard`` did."""

    log: str
    shards_before: int
    shards_after: int
    generation_before: int
    generation_after: int
    floor: int
    """The old generation's cut at the switch: readers of the new one never show less."""
    rounds: int
    """Build rounds this run did (0 when the reshard was already done)."""
    seconds: float
    switched: bool
    """False when the layout already had the shards asked for (nothing to do)."""


async def reshard(
    config: LogConfig,
    shards: int,
    *,
    store: ObjectStore | None = None,
    table: Table | None = None,
    lag: int = DEFAULT_LAG,
    build_seconds: float = DEFAULT_BUILD_SECONDS,
    poll: float = 1.0,
    on_round: Callable[[BuildRound], None] | None = None,
    **options: Any,
) -> ReshardResult:
    """Reshard the log into ``shards`` shards; see the module docstring.

    ``options`` are ``Compactor``'s (cache directory, lease, concurrency,
    policy); the build's ``limits`` are ``build_seconds``.
    """
    check_shard_count(shards)
    if lag < 0 or build_seconds <= 0:
        raise InvalidInput("lag must be at least 0 and build_seconds positive")
    started = time.monotonic()
    async with DeltaLog.open(config, store=store, table=table) as opened:
        layout = await propose(opened, shards)
        if not layout.pending_generation:  # already resharded to this count
            return ReshardResult(
                config.log,
                layout.shards,
                layout.shards,
                layout.generation,
                layout.generation,
                layout.floor,
                0,
                time.monotonic() - started,
                False,
            )
        options = {**options, "limits": Limits(max_seconds=build_seconds)}
        rounds = await _build(opened, layout, lag, poll, on_round, options)
        switched = await finish(opened, layout)
        log.info(
            "%s: resharded from %d to %d shards (generation %d), floor %d",
            config.log,
            layout.shards,
            shards,
            switched.generation,
            switched.floor,
        )
    return ReshardResult(
        config.log,
        layout.shards,
        shards,
        layout.generation,
        switched.generation,
        switched.floor,
        rounds,
        time.monotonic() - started,
        True,
    )


async def propose(opened: DeltaLog, shards: int) -> Layout:
    """Step 1: the layout with the pending generation recorded (as it was when the log
    already has ``shards`` shards, or a reshard to them is pending)."""
    table, log_id = opened.table, opened.keys.log_id
    while True:
        layout = await table.read_layout(log_id)
        if layout.pending_generation:
            if layout.pending_shards != shards:
                raise InvalidInput(
                    f"a reshard of {opened.config.log!r} to {layout.pending_shards} shards is "
                    f"in progress: finish it with `deltalog reshard --shards "
                    f"{layout.pending_shards}` (then reshard again)",
                    log=opened.config.log,
                )
            return layout
        if layout.shards == shards and (layout.sharded or shards == 1):
            return layout
        proposed = replace(layout, pending_generation=layout.generation + 1, pending_shards=shards)
        try:
            return await table.write_layout(log_id, proposed, expected=layout, now=time.time())
        except Conflict:
            continue  # another reshard proposed (or switched) meanwhile: read it again


async def _build(
    opened: DeltaLog,
    layout: Layout,
    lag: int,
    poll: float,
    on_round: Callable[[BuildRound], None] | None,
    options: dict[str, Any],
) -> int:
    """Compact the pending shards until each is within ``lag`` of the current cut."""
    rounds = 0
    async with ShardedCompactor(
        opened.config,
        store=opened.store,
        table=opened.table,
        generations="pending",
        **options,
    ) as builder:
        while True:
            outcomes = await builder.run_each()
            rounds += 1
            for outcome in outcomes:
                if isinstance(outcome.error, _TRANSIENT):  # nothing committed: the next round
                    log.warning("%s: a build run failed: %s", opened.config.log, outcome.error)
                elif outcome.error is not None:
                    raise outcome.error
            caught = await progress_of(opened, layout)
            if on_round is not None:
                on_round(caught)
            if min(caught.hwms) >= caught.cut - lag:
                return rounds
            if not any(o.result is not None and o.result.status == "applied" for o in outcomes):
                await anyio.sleep(poll)  # busy (another process builds them) or failed


async def progress_of(opened: DeltaLog, layout: Layout) -> BuildRound:
    """Where the pending shards stand against the current generation's cut."""
    current = await read_states(opened.table, opened.keys, current_shards(layout))
    pending = await read_states(opened.table, opened.keys, pending_shards(layout))
    return BuildRound([state.hwm for state in pending], cut(layout, current))


async def finish(opened: DeltaLog, layout: Layout) -> Layout:
    """Steps 3 and 4: freeze the current generation, then switch to the pending one
    (``layout`` as read, a reshard pending). Repeating it after a crash is harmless."""
    frozen = await _freeze(opened, layout)
    return await _switch(opened, layout, frozen)


async def _freeze(opened: DeltaLog, layout: Layout) -> int:
    """Retire every current shard's state; return their cut, final from then on."""
    table, keys = opened.table, opened.keys
    shards = current_shards(layout)
    for shard in shards:
        own = keys.for_shard(shard)
        await table.retire_state(
            own.log_id, sk=own.state_sk, generation=layout.pending_generation, now=time.time()
        )
    return cut(layout, await read_states(table, keys, shards))


async def _switch(opened: DeltaLog, layout: Layout, frozen: int) -> Layout:
    """Make the pending generation current: one compare-and-set of the layout item."""
    now = time.time()
    switched = Layout(
        shards=layout.pending_shards,
        generation=layout.pending_generation,
        floor=max(layout.floor, frozen),
        retiring=(*layout.retiring, Retiring(layout.generation, layout.shards, now)),
    )
    try:
        return await opened.table.write_layout(
            opened.keys.log_id, switched, expected=layout, now=now
        )
    except Conflict:
        stored = await opened.table.read_layout(opened.keys.log_id)
        if stored.generation == layout.pending_generation:  # another run switched it
            return stored
        raise
