"""The committed state as a Chroma directory: what ``import --verify`` compares with.

``committed_copy`` gives a private working copy of the published snapshot
with the committed tail replayed into it: the entries after the seq the
snapshot holds (its sidecar's hwm) up to the committed hwm. With a snapshot
published at every commit the tail is empty.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread

from compactor.replay import Replayer
from deltalog.log import DeltaLog
from deltalog.snapshot.archive import read_sidecar
from deltalog.snapshot.cache import SnapshotCache
from deltalog.snapshot.sink import ChromaSink

__all__ = ["committed_copy", "snapshot_seq"]


async def snapshot_seq(log: DeltaLog, key: str, path: Path) -> int:
    """The seq a snapshot holds: its key says it (``{seq}-{token}-{nonce}``), else its sidecar.

    A cached copy adopted from a compaction run has no sidecar; the key is
    what the compactor named the archive after.
    """
    seq = log.keys.snapshot_hwm(key)
    if seq is not None:
        return seq
    return (await anyio.to_thread.run_sync(lambda: read_sidecar(path, key=key))).hwm


@asynccontextmanager
async def committed_copy(log: DeltaLog, cache_dir: Path) -> AsyncIterator[ChromaSink]:
    """A sink holding exactly the committed state (removed on exit)."""
    cache = SnapshotCache(cache_dir / log.keys.cache_name)
    state = await log.table.read_state(log.keys.log_id)
    base: Path | None = None
    holds = 0
    if state.snapshot_key is not None and state.snapshot_sha256 is not None:
        key = state.snapshot_key
        base = await cache.committed(log.store, key, state.snapshot_sha256, log=log.config.log)
        holds = await snapshot_seq(log, key, base)
    work = await anyio.to_thread.run_sync(cache.working_copy, base)
    try:
        sink = await ChromaSink.open(work, log=log.config.log)
        try:
            if holds < state.hwm:
                quarantined = await log.table.read_quarantined(log.keys.log_id)
                await Replayer(log).run(
                    sink, after=holds, to_seq=state.hwm, quarantined=quarantined
                )
            yield sink
        finally:
            with anyio.CancelScope(shield=True):
                await sink.aclose()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(cache.discard, work)
