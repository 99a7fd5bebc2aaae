"""DeltaLog against moto's server: append, read back, status."""

from __future__ import annotations

import numpy as np

from deltalog import Delete, Delta, DeltaLog, Upsert


def _upsert(rng: np.random.Generator, ids: list[str], dim: int = 8) -> Upsert:
    return Upsert(
        collection="words",
        ids=ids,
        embeddings=rng.standard_normal((len(ids), dim), dtype=np.float32),
        documents=[f"doc {i}" for i in ids],
        metadatas=[{"n": i} for i in range(len(ids))],
    )


async def test_append_then_read_back(log: DeltaLog, rng: np.random.Generator) -> None:
    first = Delta(ops=[_upsert(rng, ["a", "b"])])
    second = Delta(ops=[Delete(collection="words", ids=["a"])])
    assert await log.append(first) == 1
    assert await log.append(second) == 2
    reader = log.read(after=0)
    got = [(seq, [d.delta_id for d in entry.deltas]) async for seq, entry in reader]
    assert got == [(1, [first.delta_id]), (2, [second.delta_id])]
    assert reader.end is not None and reader.end.seq == 3 and not reader.end.is_hole
    status = await log.status()
    assert (status.head, status.entries, status.hole_count, status.hwm) == (2, 2, 0, 0)
