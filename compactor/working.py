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

- The **warm sink** (``WarmSink``) is the live copy held open in memory
  between a compactor's runs: its directory, the seq it holds and its sink
  (Chroma's client with its index loaded), so a run neither reopens
  Chroma nor reloads the index. A run takes it (``take``) and gives it
  back (``keep``) only once its commit landed; a run that fails in any way
  (a lost lease, a refused commit, any exception) never gives it back, and
  its copy is closed and discarded (``drop``) as a working copy is.
  Publishing closes the sink (Chroma must be closed before its directory
  is archived) and the copy goes back to the cache as the live copy on
  disk (``park``); so does the held one when the compactor closes.

The fold of seqs ``1..n`` depends only on those entries, which never
change, so a live copy at any committed seq ``w <= hwm`` plus the replay of
``(w, hwm]`` equals the committed state of its lineage; one above hwm (a
commit that failed) is discarded. The same rule (``_fits``: the seq, the
lineage, the trust settings) decides for the live copy on disk and for the
warm sink.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
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

__all__ = [
    "OpenCopy",
    "WarmSink",
    "WarmStatistics",
    "WorkingCopy",
    "catch_up",
    "take",
    "trust_of",
]

_CLEANUP_SECONDS = 60.0

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
            if _fits(live.hwm, live.lineage, live.trust, state, trust):
                return WorkingCopy(live.path, live.hwm, "warm")
            await anyio.to_thread.run_sync(cache.discard, live.path)
    if state.snapshot_key is None or state.snapshot_sha256 is None:
        path = await anyio.to_thread.run_sync(cache.working_copy, None)
        return WorkingCopy(path, 0, "empty")
    path = await cache.copy_of(store, state.snapshot_key, state.snapshot_sha256, log=log)
    return WorkingCopy(path, state.checkpoint_hwm, "checkpoint")


def _fits(at: int, lineage: str | None, trust: str | None, state: LogState, ours: str) -> bool:
    """Whether a live copy holding the fold at ``at`` of ``lineage``, read under ``trust``,
    can be brought to ``state`` by replay, for a process whose trust settings are ``ours``."""
    same = (lineage, trust) == (state.lineage, ours)
    return same and state.checkpoint_hwm <= at <= state.hwm


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


@dataclass(frozen=True, slots=True)
class OpenCopy:
    """A working copy and the sink open on it, for one run."""

    copy: WorkingCopy
    sink: Sink
    warm: bool
    """Whether the sink was held open since an earlier run (the warm sink)."""

    @property
    def path(self) -> Path:
        return self.copy.path


SinkOpener = Callable[[Path], Awaitable[Sink]]


@dataclass(frozen=True, slots=True)
class WarmStatistics:
    """What a ``WarmSink`` holds now, and what it did so far."""

    path: Path | None
    """The held copy's directory, or None when none is held."""
    at: int | None
    """The seq the held copy holds."""
    reused: int
    """Runs that took the held copy."""
    opened: int
    """Runs that opened a copy from the cache (none was held, or it did not fit)."""
    dropped: int
    """Copies closed and discarded: a run failed, or a held copy did not fit."""


class WarmSink:
    """The live copy held open between runs; see the module docstring.

    One per compactor (one log, one cache). ``take`` and ``keep`` hand it
    from run to run; whatever a run did not ``keep`` or ``park`` it must
    ``drop``. ``aclose`` parks the held copy in the cache (``keep_live``),
    so a compactor that starts later on this host is still warm.
    """

    def __init__(self, cache: SnapshotCache, open_sink: SinkOpener, *, trust: str = "") -> None:
        self._cache = cache
        self._open_sink = open_sink
        self._trust = trust
        """The trust settings this compactor reads entries under (``trust_of``)."""
        self._held: tuple[OpenCopy, int, str] | None = None
        """The copy held open, the seq it holds and the lineage it descends from."""
        self._reused = self._opened = self._dropped = 0

    def statistics(self) -> WarmStatistics:
        held = self._held
        return WarmStatistics(
            held[0].path if held else None,
            held[1] if held else None,
            self._reused,
            self._opened,
            self._dropped,
        )

    async def take(self, store: ObjectStore, state: LogState, *, log: str) -> OpenCopy:
        """The held copy if it fits ``state``; else one from the cache (``take``), opened.

        A held copy that does not fit (its seq above hwm or below the
        checkpoint, or another lineage) is closed and discarded.
        """
        held, self._held = self._held, None
        if held is not None:
            opened, at, lineage = held
            if _fits(at, lineage, self._trust, state, self._trust):
                self._reused += 1
                return OpenCopy(WorkingCopy(opened.path, at, "warm"), opened.sink, warm=True)
            await self.drop(opened)
        copy = await take(self._cache, store, state, log=log, trust=self._trust)
        try:
            sink = await self._open_sink(copy.path)
        except BaseException:
            await _discard(self._cache, copy.path)
            raise
        self._opened += 1
        return OpenCopy(copy, sink, warm=False)

    def keep(self, opened: OpenCopy, at: int, state: LogState) -> None:
        """Hold ``opened`` open for the next run: its copy holds the fold at ``at``, committed
        on ``state`` (whose lineage it keeps)."""
        self._held = (opened, at, state.lineage)

    async def park(self, path: Path, at: int, state: LogState) -> None:
        """Make the closed copy at ``path`` the cache's live copy, at ``at``, committed on
        ``state``."""
        await self._park(path, at, state.lineage)

    async def _park(self, path: Path, at: int, lineage: str) -> None:
        keep = partial(self._cache.keep_live, path, at, lineage=lineage, trust=self._trust)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(keep)

    async def drop(self, opened: OpenCopy) -> None:
        """Close the sink and discard the copy (also when the caller was cancelled)."""
        self._dropped += 1
        try:
            await close_sink(opened.sink)
        finally:
            await _discard(self._cache, opened.path)

    async def aclose(self) -> None:
        """Close the held sink and park its copy in the cache; a failed close discards it."""
        held, self._held = self._held, None
        if held is None:
            return
        opened, at, lineage = held
        try:
            await close_sink(opened.sink)
        except BaseException:
            await _discard(self._cache, opened.path)
            raise
        await self._park(opened.path, at, lineage)


async def close_sink(sink: Sink) -> None:
    """Close a sink, also when the caller was cancelled: an open Chroma client leaks."""
    with anyio.move_on_after(_CLEANUP_SECONDS, shield=True):
        await sink.aclose()


async def _discard(cache: SnapshotCache, path: Path) -> None:
    with anyio.move_on_after(_CLEANUP_SECONDS, shield=True):
        await anyio.to_thread.run_sync(cache.discard, path)
