"""Working copies of the committed state: warm (the live copy) or cold (a checkpoint + its tail).

- A **working copy** is a private Chroma directory for one run and the seq
  whose fold it holds (``at``).
- ``take`` gives a run its copy: the cache's **live copy** when it holds a
  seq in ``[checkpoint_hwm, hwm]``, descends from the state's lineage and
  was folded under this process's trust settings (**warm**: nothing is
  downloaded or copied); otherwise the **checkpoint**, downloaded and
  verified (once per host) and copied (**cold**); with no checkpoint yet,
  an empty directory at seq 0.
- The **lineage** (``LogState.lineage``) names the rebuild the committed
  state descends from; a published rebuild (a repair, or a rollback) starts
  a new one, so a live copy of the old lineage is discarded even at a seq
  the new state holds. The **trust** settings (``trust_of``: which
  signatures the process requires) decide which entries are folded at all,
  so a live copy folded under other settings is discarded too.
- ``catch_up`` replays ``(at, hwm]`` into the copy, so it holds exactly the
  committed state: the checkpoint plus the committed tail. Every seq in it
  is an entry or a seal (everything <= hwm was applied or sealed), so the
  replay must reach hwm; anything else is a ``DataError``.

The fold of seqs ``1..n`` depends only on those entries, which never
change, so a live copy at any committed seq ``w <= hwm`` plus the replay of
``(w, hwm]`` equals the committed state of its lineage; one above hwm (a
commit that failed) is discarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio

from compactor.replay import Replayer
from deltalog.config import LogConfig
from deltalog.errors import DataError
from deltalog.snapshot.cache import SnapshotCache
from deltalog.snapshot.sink import Sink
from deltalog.storage.store import ObjectStore
from deltalog.storage.table import LogState

__all__ = ["WorkingCopy", "catch_up", "take", "trust_of"]

How = Literal["warm", "checkpoint", "empty"]


@dataclass(frozen=True, slots=True)
class WorkingCopy:
    path: Path
    at: int
    """The seq whose fold the copy holds."""
    how: How


def trust_of(config: LogConfig) -> str:
    """The trust settings entries are read under: "" (any entry) or the trusted keys' ids."""
    verifier = config.verifier
    return "" if verifier is None else ",".join(verifier.key_ids)


async def take(
    cache: SnapshotCache,
    store: ObjectStore,
    state: LogState,
    *,
    log: str,
    warm: bool = True,
    trust: str = "",
) -> WorkingCopy:
    """A working copy of the committed state; see the module docstring.

    ``warm=False`` never uses the live copy (what a cold reader sees is
    what ``verify`` and ``export`` build); ``trust`` is ``trust_of`` the
    caller's config.
    """
    if warm:
        live = await anyio.to_thread.run_sync(cache.take_live)
        if live is not None:
            ours = (live.lineage, live.trust) == (state.lineage, trust)
            if ours and state.checkpoint_hwm <= live.hwm <= state.hwm:
                return WorkingCopy(live.path, live.hwm, "warm")
            await anyio.to_thread.run_sync(cache.discard, live.path)
    if state.snapshot_key is None or state.snapshot_sha256 is None:
        path = await anyio.to_thread.run_sync(cache.working_copy, None)
        return WorkingCopy(path, 0, "empty")
    path = await cache.copy_of(store, state.snapshot_key, state.snapshot_sha256, log=log)
    return WorkingCopy(path, state.checkpoint_hwm, "checkpoint")


async def catch_up(
    replayer: Replayer,
    sink: Sink,
    copy: WorkingCopy,
    state: LogState,
    quarantined: dict[int, str],
) -> int:
    """Replay ``(copy.at, state.hwm]`` into ``sink`` (open on the copy); return the seqs."""
    if copy.at >= state.hwm:
        return 0
    replay = await replayer.run(sink, after=copy.at, to_seq=state.hwm, quarantined=quarantined)
    if replay.error is not None:
        raise replay.error
    if replay.last_seq != state.hwm:
        raise DataError(
            f"the committed tail ({copy.at}, {state.hwm}] stops at seq {replay.stop_seq} "
            f"({replay.stopped}): every seq at or below the hwm must be an entry or a seal",
            log=replayer.log.config.log,
            seq=replay.stop_seq,
        )
    return state.hwm - copy.at
