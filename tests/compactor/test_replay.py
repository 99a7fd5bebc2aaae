"""The replay pipeline's chunks: what bounds the memory a run holds."""

from __future__ import annotations

import numpy as np
import pytest

from compactor.replay import Replayer
from deltalog import DeltaLog
from deltalog.fold import FoldPlan
from deltalog.snapshot.sink import ApplyStats, MemorySink
from tests.builders import delta


class ChunkRecordingSink(MemorySink):
    """A memory sink that records the seqs each applied chunk spans."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[tuple[int | None, int | None]] = []

    async def apply(self, plan: FoldPlan) -> ApplyStats:
        self.chunks.append((plan.first_seq, plan.last_seq))
        return await super().apply(plan)


@pytest.mark.parametrize(("cap", "chunks"), [(1, 6), (2, 3), (3, 2), (100, 1)])
async def test_chunks_are_capped_by_the_bytes_their_entries_keep_alive(
    memory_log: DeltaLog, rng: np.random.Generator, cap: int, chunks: int
) -> None:
    """Six entries of one size; a chunk is applied once it holds ``cap`` entries' bytes."""
    for i in range(6):
        await memory_log.append(delta(rng, f"r{i}", rows=4))
    sizes = {i.size async for i in memory_log.store.list_after(memory_log.keys.entries_prefix)}
    (size,) = sizes
    sink = ChunkRecordingSink()
    replayer = Replayer(memory_log, chunk_bytes=cap * size, chunk_vectors=10**6)
    replay = await replayer.run(sink, after=0)
    assert replay.last_seq == 6 and replay.vectors_upserted == 24
    per = min(cap, 6)
    assert sink.chunks == [(s, min(s + per - 1, 6)) for s in range(1, 7, per)]
    assert len(sink.chunks) == chunks
