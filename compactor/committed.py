"""The committed state as a Chroma directory: what ``import --verify`` compares with.

``committed_copy`` gives a private working copy of the checkpoint (the
published snapshot) with the committed tail replayed into it: the entries
after the seq the checkpoint holds up to the committed hwm. Of a sharded
log: every shard at the cut, merged into one directory (``compactor.cut``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread

from compactor.cut import export_cut
from compactor.replay import Replayer
from compactor.shards import ShardedCompactor
from compactor.working import catch_up, take
from deltalog.log import DeltaLog
from deltalog.snapshot.cache import SnapshotCache, load_committed
from deltalog.snapshot.sink import ChromaSink

__all__ = ["committed_copy"]


@asynccontextmanager
async def committed_copy(log: DeltaLog, cache_dir: Path) -> AsyncIterator[ChromaSink]:
    """A sink holding exactly the committed state (removed on exit).

    The checkpoint (downloaded and verified unless cached) with the committed
    tail replayed into it (``compactor.working``): what ``export`` writes and
    a snapshot reader answers from. A tail that cannot be replayed to hwm
    raises (``DataError``, ``CorruptEntry``).
    """
    if (await log.table.read_layout(log.keys.log_id)).sharded:
        async with _merged_shards(log, cache_dir) as merged:
            yield merged
        return
    cache = SnapshotCache.for_log(cache_dir, log.keys)
    state, copy = await load_committed(  # no lease: retention may delete what it downloads
        lambda: log.table.read_state(log.keys.log_id),
        lambda state: take(cache, log.store, state, log=log.config.log, warm=False),
    )
    try:
        sink = await ChromaSink.open(copy.path, log=log.config.log, distinct="off")
        try:
            quarantined = await log.table.read_quarantined(log.keys.log_id)
            await catch_up(Replayer(log), sink, copy, state, quarantined)
            yield sink
        finally:
            with anyio.CancelScope(shield=True):
                await sink.aclose()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(cache.discard, copy.path)


@asynccontextmanager
async def _merged_shards(log: DeltaLog, cache_dir: Path) -> AsyncIterator[ChromaSink]:
    """Every shard of ``log`` at the cut, as one Chroma directory (removed on exit)."""
    async with ShardedCompactor(
        log.config, store=log.store, table=log.table, cache_dir=cache_dir, generations="current"
    ) as sharded:
        scratch = sharded.current[0].cache.scratch
        staged = Path(await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(dir=scratch)))
        try:
            await export_cut(sharded, staged / "chroma")
            sink = await ChromaSink.open(staged / "chroma", log=log.config.log)
            try:
                yield sink
            finally:
                with anyio.CancelScope(shield=True):
                    await sink.aclose()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, staged, True)
