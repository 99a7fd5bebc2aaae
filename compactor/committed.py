"""The committed state as a Chroma directory: what ``import --verify`` compares with.

``committed_copy`` gives a private working copy of the checkpoint (the
published snapshot) with the committed tail replayed into it: the entries
after the seq the checkpoint holds up to the committed hwm.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread

from compactor.replay import Replayer
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
