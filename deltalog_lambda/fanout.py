"""Sharded logs on Lambda: every shard compacts in an invocation of its own.

- **The plan** (``plan_shards``): a scheduled event (or an S3 notification)
  names a log; the compactor reads its layout and answers with the shards
  to compact: the current generation's, and a reshard's pending ones. On
  the way it keeps the layout in line with ``DELTALOG_SHARDS`` (the
  template's ``Shards``): a new, empty log gets that many shards
  (``init_layout``); a log with another count is resharded (``propose``),
  its new shards built by these invocations like any other shard, and
  switched to (``finish``) once every new shard is within
  ``DELTALOG_RESHARD_LAG`` seqs of the old shards' cut. So changing
  ``Shards`` in the stack reshards its logs with no command to run.
- **The fan-out** (``ShardQueue``): for a log of more than one shard (or a
  reshard in progress), the compactor sends one task per shard to the
  shard queue (``DELTALOG_SHARD_QUEUE_URL``) and compacts nothing itself.
  The queue's event source hands each task to an invocation of its own
  (batch size 1), with its own memory and ``/tmp``; a task whose generation
  is no longer current or pending is acknowledged and dropped. A task that
  fails is delivered again, then moved to the dead-letter queue. Tasks only
  wake compactors: each reads its shard's state, so a lost or repeated task
  loses nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec

from compactor.reshard import finish, progress_of, propose
from deltalog.config import LogConfig
from deltalog.errors import InvalidInput, Unavailable
from deltalog.keys import Shard
from deltalog.log import DeltaLog
from deltalog.shards import current_shards, init_layout, pending_shards
from deltalog.storage.aws import client
from deltalog.storage.table import LogState
from deltalog_lambda.events import ShardTask

__all__ = ["Plan", "ShardQueue", "open_shard_queue", "plan_shards", "shard_of_task"]

log = logging.getLogger("deltalog_lambda.compact")


@dataclass(frozen=True, slots=True)
class Plan:
    """What to compact of one log now."""

    shards: list[Shard | None]
    """``[None]``: the log's one index."""
    own: LogState | None = None
    """The log's own state, read to decide (its run needs it: no second read)."""


async def plan_shards(opened: DeltaLog, desired: int | None, lag: int) -> Plan:
    """The shards to compact now; see the module docstring.

    A log whose own state is not retired is one index (creating a sharded log, or
    the freeze of a reshard, retires it), so it costs no read of the layout unless
    ``desired`` asks for shards.
    """
    table, keys = opened.table, opened.keys
    own = await table.read_state(keys.log_id)
    if not own.retired_by and desired in (None, 1):
        return Plan([None], own)
    layout = await table.read_layout(keys.log_id)
    if desired is not None and not layout.pending_generation and layout.shards != desired:
        if not layout.stored and desired > 1:
            try:
                await init_layout(table, keys, desired, now=time.time())
            except InvalidInput:  # it holds entries already: a reshard builds the shards
                await propose(opened, desired)
        elif layout.sharded or desired > 1:
            log.info("%s: resharding to %d shards (DELTALOG_SHARDS)", opened.config.log, desired)
            await propose(opened, desired)
        layout = await table.read_layout(keys.log_id)
    if layout.pending_generation:
        caught = await progress_of(opened, layout)
        if min(caught.hwms) >= caught.cut - lag:
            layout = await finish(opened, layout)
            log.info("%s: switched to %d shards", opened.config.log, layout.shards)
    return Plan([*current_shards(layout), *pending_shards(layout)])


async def shard_of_task(opened: DeltaLog, task: ShardTask) -> Shard | None:
    """The shard a task names, or None when its generation is neither current nor pending."""
    layout = await opened.table.read_layout(opened.keys.log_id)
    counts = {layout.generation: layout.shards, layout.pending_generation: layout.pending_shards}
    count = counts.get(task.generation, 0) if task.generation else 0
    if not 0 <= task.shard < count:
        return None
    return Shard(task.generation, task.shard, count)


class ShardQueue:
    """Sends shard tasks to the shard queue through an SQS client."""

    def __init__(self, url: str, sqs: Any) -> None:
        self.url = url
        self.sqs = sqs

    async def send(self, log_name: str, shards: Sequence[Shard]) -> list[ShardTask]:
        """One task per shard (in batches of ten, SQS's most); the tasks sent."""
        tasks = [ShardTask(log_name, s.index, s.generation) for s in shards]
        for start in range(0, len(tasks), 10):
            batch = tasks[start : start + 10]
            answer = await self.sqs.send_message_batch(
                QueueUrl=self.url,
                Entries=[
                    {"Id": str(i), "MessageBody": msgspec.json.encode(t).decode()}
                    for i, t in enumerate(batch)
                ],
            )
            failed = answer.get("Failed") or []
            if failed:
                raise Unavailable(f"the shard queue refused {len(failed)} tasks: {failed[0]}")
        return tasks


@asynccontextmanager
async def open_shard_queue(url: str, config: LogConfig) -> AsyncIterator[ShardQueue]:
    """A ``ShardQueue`` with its own SQS client (region and endpoint from ``config``)."""
    async with AsyncExitStack() as stack:
        yield ShardQueue(url, await client(stack, config, "sqs"))
