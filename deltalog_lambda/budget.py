"""``/tmp`` is one disk for every log an execution environment compacts: a budget shares it.

- A **unit** is one directory under ``DELTALOG_CACHE_DIR/cache``: one
  compactor's snapshot cache (a log's, or later a shard's), holding its
  extracted checkpoints, its live copy and its working copies. Lambda sends
  any log's event to any warm environment, so over time one ``/tmp`` holds
  a unit per log it has compacted.
- Before an invocation runs, ``CacheBudget.make_room`` estimates what each
  of its runs needs at its peak and, when the disk cannot hold that beside
  the units already there, **evicts** other units, least recently used
  first: their compactors are closed and their directories removed (their
  next run downloads its checkpoint again). A run's own unit is never
  evicted, so a log compacted again and again stays warm.
- **Capacity**: ``DELTALOG_CACHE_BYTES``, else the size of the disk holding
  the cache (the function's ephemeral storage), less what others use of it.

**Sizing arithmetic** (what ``need`` computes). A checkpoint of ``A``
archive bytes extracts to about ``E = A / 0.55`` bytes when it is zstd
(README "Performance": zstd-1 keeps 55 %), ``E = A`` when not. A cold run
holds, at its peak, the archive being downloaded and extracted (``A + E``),
then the extracted checkpoint (one slot, ``E``) and the working copy
(``E``, plus what the run applies: at most the tail's bytes times
``ENTRY_TO_CHECKPOINT``); a warm run holds its live copy and the slot. So
``need = A + 2E + 1.5 x tail + 64 MiB`` of headroom: about 4.6 A, or 2.6 E.
With 10,240 MB of ``/tmp`` that is a checkpoint archive of about 2.2 GB,
an extracted Chroma directory of about 4.0 GB, per log in one invocation.
Between runs a unit holds about 2E (the checkpoint and the live copy), so
several logs stay warm together only as far as their sum fits; the budget
then keeps the most recently used units and evicts the others.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from compactor.checkpoint import ENTRY_TO_CHECKPOINT
from deltalog.storage.table import LogState

__all__ = ["CacheBudget", "Unit", "need"]

log = logging.getLogger("deltalog_lambda.compact")

ZSTD_KEEPS = 0.55
"""The share of a Chroma directory's bytes a zstd checkpoint keeps (README "Performance")."""
HEADROOM = 64 * 1024 * 1024


def need(state: LogState) -> int:
    """The most bytes of disk a run from ``state`` holds at once (the module docstring)."""
    archive = state.snapshot_size
    plain = (state.snapshot_key or "").endswith(".tar")  # unknown: zstd, the default
    extracted = archive if plain else archive / ZSTD_KEEPS
    return int(archive + 2 * extracted + ENTRY_TO_CHECKPOINT * state.tail_bytes + HEADROOM)


@dataclass(frozen=True, slots=True)
class Unit:
    """One compactor's cache directory, and how to close what uses it."""

    path: Path
    close: Callable[[], None] | None = None


class CacheBudget:
    """Keeps the units under ``root`` within the disk; see the module docstring."""

    def __init__(self, root: Path, *, capacity: int | None = None) -> None:
        self.root = root
        self.capacity = capacity

    def make_room(
        self, runs: Sequence[tuple[Unit, int]], others: dict[Path, Unit] | None = None
    ) -> list[Path]:
        """Evict units not in ``runs`` (each a unit and its ``need``) until the runs fit.

        ``others`` names how to close the units in use elsewhere (open compactors);
        returns the units evicted. Blocks: call it in a worker thread.
        """
        mine = {unit.path for unit, _ in runs}
        for path in mine:
            path.mkdir(parents=True, exist_ok=True)
            os.utime(path)  # most recently used
        sizes = {path: _size(path) for path in self._units()}
        wanted = sum(max(0, n - sizes.get(unit.path, 0)) for unit, n in runs)
        evicted: list[Path] = []
        candidates = sorted((p for p in sizes if p not in mine), key=_last_used)
        while self._free(sizes) < wanted and candidates:
            victim = candidates.pop(0)
            unit = (others or {}).get(victim)
            if unit is not None and unit.close is not None:
                unit.close()
            shutil.rmtree(victim, ignore_errors=True)
            del sizes[victim]
            evicted.append(victim)
        if evicted:
            log.info("evicted the caches of %s to make room", ", ".join(p.name for p in evicted))
        if self._free(sizes) < wanted:
            log.warning(
                "the runs may need %d bytes of %s, %d are free after evicting every other "
                "cache: give the function more ephemeral storage",
                wanted,
                self.root,
                self._free(sizes),
            )
        return evicted

    def _units(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if p.is_dir()]

    def _free(self, sizes: dict[Path, int]) -> int:
        disk = shutil.disk_usage(self.root if self.root.exists() else self.root.parent)
        if self.capacity is None:
            return disk.free
        return min(disk.free, self.capacity - sum(sizes.values()))


def _size(path: Path) -> int:
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except FileNotFoundError:  # removed meanwhile (a run's scratch)
                continue
    return total


def _last_used(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
