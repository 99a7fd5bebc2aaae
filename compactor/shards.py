"""``ShardedCompactor``: compact a log whatever its layout, every shard at once or one.

- It reads the log's **layout** when entered (``refresh`` reads it again)
  and makes one ``Compactor`` per **shard** of the current generation, each
  with its own lease, state item, checkpoints, retention and live copy
  (DESIGN.md "Shards"). A log without a layout is one ``Compactor`` of the
  log's own index, exactly as before.
- ``run_once`` runs every shard's compactor concurrently (at most
  ``concurrency`` at a time) and waits for all of them: a shard that is
  behind, busy or failing delays no other and stops none. ``shards``
  restricts it to some shards (``compact --shard I``).
- While a **reshard** is in progress, the shards of the pending generation
  are compacted too (``generations="both"``, the default): that is how a
  reshard's new shards are built and kept up, by ``deltalog reshard`` or
  any compaction. ``"current"`` or ``"pending"`` picks one generation.
- A shard whose state a reshard retired answers ``retired`` (its run did
  nothing); ``run_once`` then reads the layout again and, if the reshard
  switched, runs the new generation's shards once.
- After the runs, **retired generations** whose grace is over lose their
  checkpoints (``retire``): every snapshot under their shards' prefixes
  (and, for generation 0, the log's own), then their entry in the layout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Literal, TypeVar, cast

import anyio

from compactor.publish import list_snapshots
from compactor.runner import DEFAULT_LEASE_WAIT, CompactionResult, Compactor, RebuildResult
from compactor.verify import DEFAULT_INDEX_QUERIES, DEFAULT_MIN_RECALL, VerifyResult
from deltalog.config import LogConfig
from deltalog.errors import DeltalogError, InvalidInput, Resharded
from deltalog.keys import Shard
from deltalog.log import DeltaLog
from deltalog.shards import current_shards, cut, pending_shards
from deltalog.storage.store import ObjectStore
from deltalog.storage.table import Layout, LogState, Retiring, Table

__all__ = ["DEFAULT_RETIRE_GRACE", "Generations", "ShardOutcome", "ShardedCompactor"]

Generations = Literal["both", "current", "pending"]
"""Which generation's shards to compact: the current one, a pending reshard's, or both."""

T = TypeVar("T")

log = logging.getLogger("compactor.shards")

DEFAULT_RETIRE_GRACE = 3600.0
"""How long a replaced generation's checkpoints stay after a reshard (readers that have
not refreshed since may still download them)."""


@dataclass(frozen=True, slots=True)
class ShardOutcome:
    """What one shard's run did: its result, or the error that stopped it."""

    shard: Shard | None
    result: CompactionResult | None = None
    error: Exception | None = None


class ShardedCompactor:
    """Compacts a log's shards; use as ``async with ShardedCompactor(config) as c``.

    ``options`` are ``Compactor``'s (cache directory, lease, limits, policy,
    ...); ``store`` and ``table`` are shared by every shard.
    """

    def __init__(
        self,
        config: LogConfig,
        *,
        shards: Sequence[int] | None = None,
        generations: Generations = "both",
        concurrency: int | None = None,
        retire_grace: float = DEFAULT_RETIRE_GRACE,
        store: ObjectStore | None = None,
        table: Table | None = None,
        **options: Any,
    ) -> None:
        if concurrency is not None and concurrency < 1:
            raise InvalidInput("concurrency must be at least 1")
        if retire_grace < 0:
            raise InvalidInput("retire_grace (--retire-grace) must be at least 0 seconds")
        self.config = config
        self.only = None if shards is None else sorted(set(shards))
        self.generations: Generations = generations
        self.concurrency = concurrency
        self.retire_grace = retire_grace
        self.options = options
        self._store, self._table = store, table
        self._log: DeltaLog | None = None
        self._stack = AsyncExitStack()
        """The log's connection, and inside it ``_shard_stack``: the shards' compactors."""
        self._shard_stack = AsyncExitStack()
        self.layout = Layout()
        self.compactors: list[Compactor] = []
        """One per shard compacted: the current generation's, then the pending one's."""

    async def __aenter__(self) -> ShardedCompactor:
        self._log = await DeltaLog.connect(self.config, store=self._store, table=self._table)
        self._stack.push_async_callback(self._log.aclose)
        self._stack.push_async_callback(lambda: self._shard_stack.aclose())
        try:
            await self.refresh()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    @property
    def log(self) -> DeltaLog:
        if self._log is None:
            raise InvalidInput("use it as `async with ShardedCompactor(config) as c`")
        return self._log

    @property
    def current(self) -> list[Compactor]:
        """The compactors of the current generation's shards (not a pending reshard's)."""
        generation = self.layout.generation
        return [
            c
            for c in self.compactors
            if (c.shard.generation if c.shard is not None else 0) == generation
        ]

    async def states(self) -> list[LogState]:
        """The committed state of each current shard, in shard order."""
        return [await compactor.read_state() for compactor in self.current]

    async def cut(self) -> int:
        """The seq a consistent read shows every shard at (``deltalog.shards.cut``)."""
        return cut(self.layout, await self.states())

    async def refresh(self) -> bool:
        """Read the layout again; True when it changed (the compactors were remade)."""
        layout = await self.log.table.read_layout(self.log.keys.log_id)
        same = (layout.generation, layout.pending_generation) == (
            self.layout.generation,
            self.layout.pending_generation,
        )
        if same and self.compactors:
            self.layout = layout
            return False
        self.layout = layout
        await self._shard_stack.aclose()
        self._shard_stack = AsyncExitStack()
        self.compactors = [
            await self._shard_stack.enter_async_context(self._compactor(shard))
            for shard in self._shards(layout)
        ]
        return True

    def _shards(self, layout: Layout) -> list[Shard | None]:
        shards = current_shards(layout)
        if self.only is not None:
            unknown = [i for i in self.only if i >= len(shards)]
            if unknown:
                raise InvalidInput(
                    f"log {self.config.log!r} has {len(shards)} shards (0-{len(shards) - 1}), "
                    f"no shard {unknown[0]}",
                    log=self.config.log,
                )
            return [shards[i] for i in self.only]
        pending: list[Shard | None] = list(pending_shards(layout))
        if self.generations == "pending":
            return pending
        return shards + pending if self.generations == "both" else shards

    def _compactor(self, shard: Shard | None) -> Compactor:
        log_ = self.log
        return Compactor(
            self.config, store=log_.store, table=log_.table, shard=shard, **self.options
        )

    # -- compaction ---------------------------------------------------------------

    async def run_each(self, *, checkpoint: bool = False) -> list[ShardOutcome]:
        """One run of every shard, concurrently; each shard's result or error.

        A shard retired by a reshard (``Resharded``) makes it read the layout
        again and run the new generation's shards, once.
        """
        outcomes = await self._run_all(checkpoint)
        retired = any(o.result is not None and o.result.status == "retired" for o in outcomes)
        if retired and await self.refresh():
            outcomes = await self._run_all(checkpoint)
        await self.retire()
        return outcomes

    async def rebuild(
        self,
        to_seq: int | None = None,
        *,
        publish: bool = False,
        force: bool = False,
        wait: float = DEFAULT_LEASE_WAIT,
    ) -> list[RebuildResult]:
        """``Compactor.rebuild`` of every current shard (or those asked for), concurrently."""
        return await self._each(
            lambda c: c.rebuild(to_seq, publish=publish, force=force, wait=wait)
        )

    async def verify(
        self,
        *,
        index_queries: int = DEFAULT_INDEX_QUERIES,
        min_recall: float = DEFAULT_MIN_RECALL,
    ) -> list[VerifyResult]:
        """``Compactor.verify`` of every current shard (or those asked for): each shard's
        rebuild to its committed hwm compared with its committed state, and its index's
        recall checked (``index_queries`` per collection of each shard)."""
        return await self._each(
            lambda c: c.verify(index_queries=index_queries, min_recall=min_recall)
        )

    async def _each(self, work: Callable[[Compactor], Awaitable[T]]) -> list[T]:
        """``work`` on every current shard's compactor, ``concurrency`` at once; in order."""
        compactors = self.current
        limiter = anyio.CapacityLimiter(self.concurrency or max(1, len(compactors)))
        results: list[T | None] = [None] * len(compactors)

        async def one(i: int) -> None:
            async with limiter:
                results[i] = await work(compactors[i])

        try:
            async with anyio.create_task_group() as tg:
                for i in range(len(compactors)):
                    tg.start_soon(one, i)
        except BaseExceptionGroup as group:  # one shard's error, as itself
            raise group.exceptions[0] from None
        return cast("list[T]", results)

    async def run_once(self, *, checkpoint: bool = False) -> list[CompactionResult]:
        """``run_each``, raising the first shard's error once every shard has finished."""
        outcomes = await self.run_each(checkpoint=checkpoint)
        for outcome in outcomes:
            if outcome.error is not None:
                raise outcome.error
        return [o.result for o in outcomes if o.result is not None]

    async def _run_all(self, checkpoint: bool) -> list[ShardOutcome]:
        limiter = anyio.CapacityLimiter(self.concurrency or max(1, len(self.compactors)))
        outcomes: list[ShardOutcome] = [ShardOutcome(c.shard) for c in self.compactors]

        async def one(i: int, compactor: Compactor) -> None:
            async with limiter:
                try:
                    result = await compactor.run_once(checkpoint=checkpoint)
                except Resharded as exc:  # a reshard froze it: no error, nothing to do
                    result = await _retired(compactor, exc)
                except Exception as exc:  # reported with the others once all finished
                    outcomes[i] = replace(outcomes[i], error=exc)
                else:
                    outcomes[i] = replace(outcomes[i], result=result)

        async with anyio.create_task_group() as tg:
            for i, compactor in enumerate(self.compactors):
                tg.start_soon(one, i, compactor)
        return outcomes

    # -- retiring replaced generations ----------------------------------------------

    async def retire(self, *, now: float | None = None) -> list[Retiring]:
        """Delete the checkpoints of generations replaced more than ``retire_grace`` ago.

        Housekeeping, like retention: a failure is logged, and the next run
        tries again. Returns the generations retired.
        """
        now = time.time() if now is None else now
        layout = self.layout
        due = [r for r in layout.retiring if r.since + self.retire_grace <= now]
        if not due:
            return []
        table, log_id = self.log.table, self.log.keys.log_id
        try:
            for retiring in due:
                await self._delete_generation(retiring)
            kept = tuple(r for r in layout.retiring if r not in due)
            self.layout = await table.write_layout(
                log_id, replace(layout, retiring=kept), expected=layout, now=now
            )
        except DeltalogError as exc:
            log.warning("%s: could not retire old generations (next run retries): %s", log_id, exc)
            return []
        return due

    async def _delete_generation(self, retiring: Retiring) -> None:
        keys = self.log.keys
        generation = retiring.generation
        shards: list[Shard | None] = (
            [None]
            if generation == 0
            else [Shard(generation, i, retiring.shards) for i in range(retiring.shards)]
        )
        deleted = 0
        for shard in shards:
            shard_keys = keys.for_shard(shard)
            for info in [i async for i in list_snapshots(self.log.store, shard_keys)]:
                await self.log.store.delete(info.key)
                deleted += 1
        log.info("%s: generation %d retired (%d snapshots deleted)", keys.log, generation, deleted)


async def _retired(compactor: Compactor, exc: Resharded) -> CompactionResult:
    """The result of a run a reshard's retirement of the shard's state refused."""
    state = await compactor.read_state()
    shard = compactor.shard
    return CompactionResult(
        "retired",
        compactor.config.log,
        state.hwm,
        state.hwm,
        stopped=exc.message,
        shard=None if shard is None else shard.index,
        generation=0 if shard is None else shard.generation,
    )
