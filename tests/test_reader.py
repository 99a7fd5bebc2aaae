"""Readers against moto's server and real ChromaDB: snapshot and fresh reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compactor import Compactor
from deltalog import (
    Delta,
    DeltaLog,
    DimensionMismatch,
    InvalidInput,
    LogConfig,
    Reader,
    UpdateMetadata,
    Upsert,
)
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import MemoryTable
from tests.builders import delete

DIM = 8


def _upsert(ids: list[str], vectors: np.ndarray, merchant: str) -> Delta:
    return Delta(
        ops=[
            Upsert(
                collection="words",
                ids=ids,
                embeddings=vectors,
                documents=[f"doc {i}" for i in ids],
                metadatas=[{"merchant_name": merchant, "n": n} for n in range(len(ids))],
            )
        ]
    )


def _basis(i: int, scale: float = 1.0) -> np.ndarray:
    v = np.zeros((1, DIM), np.float32)
    v[0, i] = scale
    return v


async def _compacted(log: DeltaLog, config: LogConfig, tmp_path: Path) -> None:
    async with Compactor(config, cache_dir=tmp_path / "compactor") as compactor:
        assert (await compactor.run_once()).status == "applied"


async def test_fresh_reads_see_the_tail_and_equal_snapshot_reads_after_compaction(
    log: DeltaLog, config: LogConfig, tmp_path: Path
) -> None:
    await log.append(_upsert(["a", "b"], np.vstack([_basis(0), _basis(1)]), "Costco"))
    await _compacted(log, config, tmp_path)
    await log.append(_upsert(["c"], _basis(2), "Costco"))  # appended, not compacted
    await log.append(delete("b"))
    await log.append(
        Delta(
            ops=[
                UpdateMetadata(
                    collection="words", ids=["a"], metadatas=[{"merchant_name": "Target"}]
                )
            ]
        )
    )
    cache = tmp_path / "reader"
    async with Reader.open(config, consistency="fresh", cache_dir=cache) as fresh:
        near_c = await fresh.query(collection="words", query_embeddings=_basis(2), n_results=3)
        assert near_c["ids"][0][0] == "c"
        assert near_c["distances"][0][0] == pytest.approx(0.0)
        assert "b" not in near_c["ids"][0], "deleted in the tail"
        costco = await fresh.get(collection="words", where={"merchant_name": "Costco"})
        assert sorted(costco["ids"]) == ["c"], "a moved to Target in the tail, b was deleted"
        target = await fresh.query(
            collection="words",
            query_embeddings=_basis(0),
            n_results=5,
            where={"merchant_name": "Target"},
        )
        assert target["ids"] == [["a"]]
        assert target["metadatas"][0][0] == {"merchant_name": "Target", "n": 0}
        stats = fresh.statistics()
        assert (stats.hwm, stats.tail_seq) == (1, 4)
    async with Reader.open(config, consistency="snapshot", cache_dir=cache) as snapshot:
        before = await snapshot.get(collection="words")
        assert sorted(before["ids"]) == ["a", "b"], "snapshot reads do not see the tail"
    await _compacted(log, config, tmp_path)
    async with (
        Reader.open(config, consistency="snapshot", cache_dir=cache) as snapshot,
        Reader.open(config, consistency="fresh", cache_dir=tmp_path / "r2") as fresh,
    ):
        for q in (_basis(0), _basis(2), _basis(1)):
            s = await snapshot.query(collection="words", query_embeddings=q, n_results=2)
            f = await fresh.query(collection="words", query_embeddings=q, n_results=2)
            assert s == f
        assert await snapshot.get(collection="words", where={"merchant_name": "Costco"}) == (
            await fresh.get(collection="words", where={"merchant_name": "Costco"})
        )


async def test_fresh_reads_without_any_snapshot(
    log: DeltaLog, config: LogConfig, tmp_path: Path
) -> None:
    await log.append(_upsert(["x", "y"], np.vstack([_basis(3), _basis(4)]), "Aldi"))
    async with Reader.open(config, consistency="fresh", cache_dir=tmp_path) as reader:
        got = await reader.query(collection="words", query_embeddings=_basis(4, 2.0), n_results=1)
        assert got["ids"] == [["y"]]
        assert got["distances"][0][0] == pytest.approx(1.0)
        assert (await reader.get(collection="words", ids=["x"]))["documents"] == ["doc x"]


async def test_a_reader_picks_up_new_commits(
    log: DeltaLog, config: LogConfig, tmp_path: Path
) -> None:
    await log.append(_upsert(["a"], _basis(0), "Costco"))
    await _compacted(log, config, tmp_path)
    async with Reader.open(config, cache_dir=tmp_path / "r") as reader:
        assert (await reader.get(collection="words"))["ids"] == ["a"]
        await log.append(_upsert(["b"], _basis(1), "Costco"))
        await _compacted(log, config, tmp_path)
        assert sorted((await reader.get(collection="words"))["ids"]) == ["a", "b"]
        assert reader.statistics().snapshot_loads == 2


async def test_bad_queries_are_refused(log: DeltaLog, config: LogConfig, tmp_path: Path) -> None:
    await log.append(_upsert(["a"], _basis(0), "Costco"))
    async with Reader.open(config, consistency="fresh", cache_dir=tmp_path) as reader:
        with pytest.raises(DimensionMismatch) as mismatch:
            await reader.query(collection="words", query_embeddings=np.ones((1, 3), np.float32))
        assert (mismatch.value.known, mismatch.value.got) == (DIM, 3)
        for words in (f"holds {DIM}-dimensional", "the query has 3", "new log", "rebuild"):
            assert words in str(mismatch.value)
        with pytest.raises(InvalidInput, match="no vectors"):
            await reader.query(collection="nothing", query_embeddings=_basis(0))
        with pytest.raises(InvalidInput, match="NaN"):
            await reader.query(collection="words", query_embeddings=_basis(0) * np.nan)
        with pytest.raises(InvalidInput, match="operator"):
            await reader.get(collection="words", where={"n": {"$regex": "x"}})
    with pytest.raises(InvalidInput, match="consistency"):
        async with Reader.open(config, consistency="eventual", cache_dir=tmp_path):  # type: ignore[arg-type]
            pass


async def test_a_fresh_read_with_nothing_new_costs_two_requests(tmp_path: Path) -> None:
    """One state read and one listing: the counter is not read."""
    config = LogConfig(bucket="memory", table="memory", log="mem")
    store, table = MemoryStore(), MemoryTable()
    async with DeltaLog.open(config, store=store, table=table) as log:
        await log.append(_upsert(["a"], _basis(0), "Costco"))
        async with Reader.open(
            config, consistency="fresh", cache_dir=tmp_path, store=store, table=table
        ) as reader:
            assert (await reader.get(collection="words"))["ids"] == ["a"]
            before = (store.requests, table.requests)
            assert (await reader.get(collection="words"))["ids"] == ["a"]
            assert (store.requests - before[0], table.requests - before[1]) == (1, 1)
