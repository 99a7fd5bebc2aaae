"""A sharded log at one cut, as Chroma directories: ``deltalog export`` of every shard.

The **cut** is the seq a consistent read shows every shard at: the greatest
committed shard hwm (``deltalog.shards.cut``). Each shard's committed copy
(its checkpoint and committed tail) is replayed up to the cut with its own
records, then:

- **merged** (the default): every shard's records are added to one new
  Chroma directory, a page at a time (this re-inserts every vector, which
  is Chroma's own speed): what one index holding the log at the cut holds;
- **per shard**: each shard's copy is a directory of its own, ``shard-{i}``,
  moved into place as it is (nothing re-inserted).

Either way the target appears only when whole: it is built in the cache
and moved (``compactor.runner.move_into``). A log without shards is
exported as ``Compactor.export`` does.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from compactor.runner import CommittedCopy, move_into, occupied
from compactor.shards import ShardedCompactor
from deltalog.errors import InvalidInput
from deltalog.fold import CollectionPlan, FoldPlan
from deltalog.shards import cut
from deltalog.snapshot.sink import ChromaSink

__all__ = ["CutExport", "export_cut"]

ExportProgress = Callable[[int, int], None]
"""Told (records written so far, records in all) as an export goes."""


@dataclass(frozen=True, slots=True)
class CutExport:
    """What ``export_cut`` wrote."""

    log: str
    path: Path
    hwm: int
    """The cut every shard was exported at (the committed hwm without shards)."""
    shards: int
    counts: dict[str, int]
    """Records per collection, all shards together."""
    per_shard: bool = False
    directories: list[Path] = field(default_factory=list)
    """With ``per_shard``: each shard's directory, in shard order."""


async def export_cut(
    sharded: ShardedCompactor,
    out: Path | str,
    *,
    per_shard: bool = False,
    progress: ExportProgress | None = None,
) -> CutExport:
    """Write the log at its cut into ``out`` (new or empty); see the module docstring."""
    target = Path(out)
    if taken := await anyio.to_thread.run_sync(occupied, target):
        raise InvalidInput(f"{target} {taken}: export into a new (or empty) directory")
    compactors = sharded.current
    if not sharded.layout.sharded and not per_shard:
        single = await compactors[0].export(target)
        return CutExport(single.log, target, single.hwm, 1, single.counts)
    copies: list[CommittedCopy] = []
    try:
        for compactor in compactors:
            copies.append(await compactor.committed_copy())
        # the cut of the states the copies hold (a state read again when retention pruned
        # its checkpoint may be newer than one read before)
        upto = cut(sharded.layout, [copy.state for copy in copies])
        for i, compactor in enumerate(compactors):
            copies[i] = await compactor.advance_copy(copies[i], upto)
        counts: dict[str, int] = {}
        for copy in copies:
            for name, n in copy.counts.items():
                counts[name] = counts.get(name, 0) + n
        staged = Path(tempfile.mkdtemp(prefix="export-", dir=compactors[0].cache.scratch))
        try:
            if per_shard:
                directories = await _place_each(copies, staged, progress)
            else:
                directories = []
                await _merge_into(staged, copies, sum(counts.values()), progress)
            await anyio.to_thread.run_sync(move_into, staged, target)
        finally:
            await anyio.to_thread.run_sync(shutil.rmtree, staged, True)
    finally:
        for compactor, copy in zip(compactors, copies, strict=False):
            await compactor.discard(copy.path)
    return CutExport(
        sharded.config.log,
        target,
        upto,
        len(compactors),
        counts,
        per_shard,
        [target / d.name for d in directories],
    )


async def _place_each(
    copies: list[CommittedCopy], staged: Path, progress: ExportProgress | None
) -> list[Path]:
    """Each shard's copy as ``staged/shard-{i}``, as it is."""
    total = sum(sum(copy.counts.values()) for copy in copies)
    done = 0
    placed = []
    for i, copy in enumerate(copies):
        directory = staged / f"shard-{i}"
        await anyio.to_thread.run_sync(copy.path.rename, directory)
        placed.append(directory)
        done += sum(copy.counts.values())
        if progress is not None:
            progress(done, total)
    return placed


async def _merge_into(
    target: Path, copies: list[CommittedCopy], total: int, progress: ExportProgress | None
) -> None:
    """Add every record of every shard's copy to one new Chroma directory at ``target``."""
    done = 0
    out = await ChromaSink.open(target, distinct="off")
    try:
        for copy in copies:
            shard = await ChromaSink.open(copy.path, distinct="off")
            try:
                for name in await shard.collections():
                    await out.apply(FoldPlan({name: CollectionPlan()}))  # empty ones too
                    async for page in shard.pages(name):
                        plan = CollectionPlan(puts={r.id: r for r in page})
                        await out.apply(FoldPlan({name: plan}))
                        done += len(page)
                        if progress is not None:
                            progress(done, total)
            finally:
                await shard.aclose()
    finally:
        await out.aclose()
