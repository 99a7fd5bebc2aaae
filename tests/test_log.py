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


async def test_numpy_strings_and_floats_are_stored_as_plain_ones(memory_log: DeltaLog) -> None:
    """ids from a numpy array (numpy.str_) and numpy.float64 metadata are str and float."""
    ids = list(np.array(["a", "b"]))
    assert type(ids[0]) is np.str_
    upsert = Upsert(
        collection="words",
        ids=ids,
        embeddings=np.zeros((2, 3), np.float32),
        documents=[np.str_("TOTAL"), "x"],
        metadatas=[{"price": np.float64(1.5)}, {np.str_("k"): np.str_("v")}],
    )
    assert await memory_log.append(Delta(ops=[upsert])) == 1
    entries = [entry async for _, entry in memory_log.read(after=0)]
    (op,) = [op for entry in entries for d in entry.deltas for op in d.ops]
    assert isinstance(op, Upsert)
    assert op.ids == ["a", "b"] and all(type(i) is str for i in op.ids)
    assert op.documents == ["TOTAL", "x"] and op.metadatas == [{"price": 1.5}, {"k": "v"}]
    assert type(op.metadatas[0]["price"]) is float
