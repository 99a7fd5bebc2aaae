"""Search finds the obvious match on receipts data, on every build (issue 19, item 1).

Receipts repeat texts, so many word vectors are bit-identical (120 receipts:
every one's ``THANK YOU FOR SHOPPING``). Chroma's HNSW, fed such groups,
missed the nearest neighbour in about one build of four: ``walmart``
answered ``YOU`` at 1.50 with ``WAL*MART`` at 0.06 (README "Search
quality"). Builds differ run to run (Chroma inserts in threads, in a hash
order), so the test builds several times; on the code before the fix at
least one of the merchant names missed its nearest receipt word in nearly
every build.

Real WordLlama vectors and real Chroma; the log and table are the memory
adapters (the read path under test is the reader's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compactor import Compactor
from deltalog import Delta, DeltaLog, LogConfig, Reader, Upsert
from deltalog.receipts.generate import MERCHANTS, generate_receipts
from deltalog.receipts.model import word_records
from deltalog.receipts.wordllama import WordLlamaEmbedder
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import MemoryTable

RECEIPTS = 120
"""Enough for groups of identical vectors larger than Chroma's ef (100)."""
BUILDS = 3
CLOSE = 0.01
"""A first answer within 1 % of the nearest distance counts as found: an approximate
index may answer an equally good neighbour (the misses fixed here were 0.06 against 1.50)."""


@pytest.fixture(scope="module")
def words() -> tuple[list[Delta], np.ndarray]:
    """The receipts' word deltas (20 receipts each) and all their vectors."""
    embedder = WordLlamaEmbedder()
    deltas, vectors = [], []
    receipts = list(generate_receipts(RECEIPTS, seed=1))
    for start in range(0, RECEIPTS, 20):
        ids: list[str] = []
        inputs: list[str] = []
        documents: list[str] = []
        for receipt in receipts[start : start + 20]:
            records = word_records(receipt)
            ids += records.ids
            inputs += records.inputs
            documents += records.documents
        embedded = np.asarray(embedder.embed_sync(inputs), np.float32)
        vectors.append(embedded)
        deltas.append(Delta([Upsert("words", ids, embedded, documents)]))
    return deltas, np.concatenate(vectors)


async def test_every_merchant_name_finds_its_nearest_word_on_every_build(
    tmp_path: Path, words: tuple[list[Delta], np.ndarray]
) -> None:
    """Three builds of 10,000 vectors (about 30 s on 2 cores): the miss needs
    groups of copies larger than Chroma's ef, so about 100 receipts at least."""
    deltas, vectors = words
    names = [m.name.lower() for m in MERCHANTS]
    queries = np.asarray(WordLlamaEmbedder().embed_sync(names), np.float32)
    nearest = ((queries[:, None, :] - vectors[None, :, :]) ** 2).sum(axis=2).min(axis=1)
    config = LogConfig(bucket="memory", table="memory", log="recall")
    store, table = MemoryStore(), MemoryTable()
    async with DeltaLog.open(config, store=store, table=table) as log:
        for delta in deltas:
            await log.append(delta)
    options = {"store": store, "table": table, "cache_dir": tmp_path / "compactor"}
    async with Compactor(config, **options) as compactor:  # type: ignore[arg-type]
        for build in range(BUILDS):
            if build == 0:
                await compactor.run_once()
            else:
                await compactor.rebuild(publish=True)
            reader_dir = tmp_path / f"reader-{build}"
            async with Reader.open(config, cache_dir=reader_dir, store=store, table=table) as r:
                got = await r.query(collection="words", query_embeddings=queries, n_results=5)
            walmart = names.index("walmart")
            assert got["documents"][walmart][0] == "WAL*MART", (build, got["documents"][walmart])
            missed = [
                (name, got["distances"][q][0], float(nearest[q]))
                for q, name in enumerate(names)
                if got["distances"][q][0] > nearest[q] * (1 + CLOSE) + 1e-4
            ]
            assert missed == [], f"build {build}: {missed}"
