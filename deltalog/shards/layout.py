"""A log's layout: which shards hold it, creating one, and the cut reads are shown at.

Generation 0 (no ``layout`` item) is one index under the log's own keys:
``current_shards`` gives ``[None]`` for it, so callers treat "no shards" as
one shard without a name. ``init_layout`` records a new log's shard count
(``deltalog init --shards N``); changing it later is a reshard.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from deltalog.errors import InvalidInput
from deltalog.keys import MAX_SHARDS, LogKeys, Shard, shard_states_prefix
from deltalog.storage.table import Layout, LogState, Table

__all__ = [
    "InitOutcome",
    "check_shard_count",
    "current_shards",
    "cut",
    "init_layout",
    "parse_shard_count",
    "pending_shards",
    "read_states",
]

InitOutcome = Literal["one index", "created", "exists"]


def current_shards(layout: Layout) -> list[Shard | None]:
    """The shards readers and compactors use now; ``[None]``: the log's one index."""
    if not layout.sharded:
        return [None]
    return [Shard(layout.generation, i, layout.shards) for i in range(layout.shards)]


def pending_shards(layout: Layout) -> list[Shard]:
    """The shards a reshard in progress builds (none when there is no reshard)."""
    if not layout.pending_generation:
        return []
    generation, count = layout.pending_generation, layout.pending_shards
    return [Shard(generation, i, count) for i in range(count)]


def cut(layout: Layout, states: Sequence[LogState]) -> int:
    """The seq a consistent read shows every shard at: the greatest committed hwm.

    Every seq at or below a committed hwm is an entry or a seal, so each
    lagging shard can fold its entries up to it; a shard cannot un-apply, so
    the smallest hwm would not do. Never below the layout's ``floor`` (the
    previous generation's last hwm), so a reshard never moves reads back.
    """
    return max([layout.floor, *(state.hwm for state in states)])


async def read_states(
    table: Table, keys: LogKeys, shards: Sequence[Shard | None]
) -> list[LogState]:
    """The committed state of each of ``shards`` (None: the log's own), in order: one
    query per generation (a state never written reads as the empty ``LogState()``)."""
    found: dict[str, LogState] = {}
    for generation in sorted({shard.generation for shard in shards if shard is not None}):
        found |= await table.read_states(keys.log_id, shard_states_prefix(generation))
    states = []
    for shard in shards:
        own = keys.for_shard(shard)
        if shard is None:
            states.append(await table.read_state(own.log_id, sk=own.state_sk))
        else:
            states.append(found.get(own.state_sk, LogState()))
    return states


def check_shard_count(shards: int) -> None:
    if not 1 <= shards <= MAX_SHARDS:
        raise InvalidInput(f"a log has 1 to {MAX_SHARDS} shards, not {shards}")


def parse_shard_count(text: str) -> int:
    """A shard count from the command line (``--shards N``)."""
    try:
        shards = int(text)
    except ValueError:
        raise InvalidInput(f"{text!r} is not a shard count: give 1 to {MAX_SHARDS}") from None
    check_shard_count(shards)
    return shards


async def init_layout(table: Table, keys: LogKeys, shards: int, *, now: float) -> InitOutcome:
    """Record the shard count of a new log (``deltalog init --shards N``).

    One shard is today's log: nothing is written. More record the layout
    (generation 1) and retire the log's own state item, so a compactor that
    ignores the layout cannot fold the log into a second, unread index. A
    log that already holds entries, or another layout, is resharded instead
    (``deltalog reshard``): ``InvalidInput``. Running it again is harmless.
    """
    check_shard_count(shards)
    log_id = keys.log_id
    layout = await table.read_layout(log_id)
    if layout.stored:
        if layout.shards != shards or layout.pending_generation:
            raise InvalidInput(
                f"log {keys.log!r} has {layout.shards} shards (generation {layout.generation}"
                f"{', a reshard in progress' if layout.pending_generation else ''}): change "
                f"the count with `deltalog reshard --shards {shards}`",
                log=keys.log,
            )
        await _retire_own_state(table, keys, layout.generation, now=now)
        return "exists"
    if shards == 1:
        return "one index"
    head = await table.read_head(log_id)
    state = await table.read_state(log_id)
    if head or state.hwm or state.snapshot_key:
        raise InvalidInput(
            f"log {keys.log!r} already holds {head} seqs in one index: split it with "
            f"`deltalog reshard --shards {shards}` (a rebuild from the log)",
            log=keys.log,
        )
    created = Layout(shards=shards, generation=1)
    await table.write_layout(log_id, created, expected=layout, now=now)
    await _retire_own_state(table, keys, created.generation, now=now)
    return "created"


async def _retire_own_state(table: Table, keys: LogKeys, generation: int, *, now: float) -> None:
    """Retire the log's own (generation 0) state item, if nothing else retired it."""
    own = keys.for_shard(None)
    state = await table.read_state(own.log_id)
    if not state.retired_by:
        await table.retire_state(own.log_id, sk=own.state_sk, generation=generation, now=now)
