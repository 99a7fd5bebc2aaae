"""Shards: one log folded into several indexes (DESIGN.md "Shards").

- The **layout** (``deltalog.storage.table.Layout``, the ``layout`` item)
  says how many indexes a log is split into, in which **generation**. A
  log without the item has one index in generation 0, under the log's own
  keys: today's log.
- A **shard** (``deltalog.keys.Shard``) is one index of a generation: its
  own state item, lease, checkpoints, retention and live copy. A record
  belongs to shard ``shard_of(collection, id, shards)``; the entries are the
  log's and every shard reads them all, folding only its own records.
- The **cut** of a read is one seq every shard is shown at: the greatest
  committed hwm among the shards (and at least the layout's ``floor``),
  each lagging shard folding its entries up to it (``cut``).

This floor holds what every part of deltalog needs to know about shards
(the layout, the cut, merging answers across shards); the compactor builds
shard compactors and resharding on it.
"""

from deltalog.shards.layout import (
    InitOutcome,
    check_shard_count,
    current_shards,
    cut,
    init_layout,
    parse_shard_count,
    pending_shards,
    read_states,
)
from deltalog.shards.merge import merge_nearest

__all__ = [
    "InitOutcome",
    "check_shard_count",
    "current_shards",
    "cut",
    "init_layout",
    "merge_nearest",
    "parse_shard_count",
    "pending_shards",
    "read_states",
]
