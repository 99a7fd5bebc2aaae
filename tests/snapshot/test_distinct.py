"""The distinct index beside a snapshot (``deltalog.snapshot.distinct``), on real chromadb.

It must hold exactly one point per distinct vector of each collection and
map every record to it, through puts, deletes and re-puts; queries through
it must give brute force's answer; a snapshot written before it gets it
when a compactor opens it; exports leave it behind.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings
from chromadb.errors import NotFoundError

from compactor import Compactor
from deltalog import Delete, Delta, DeltaLog, LogConfig, Reader, Upsert
from deltalog.fold import CollectionPlan, FoldPlan, Record
from deltalog.snapshot.distinct import DISTINCT_DIR, GROUP_LIMIT, digest
from deltalog.snapshot.sink import ChromaSink
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import MemoryTable
from tests.compaction import commit_altered_snapshot, saved_seq_ids

DIM = 8
SETTINGS = Settings(anonymized_telemetry=False)


def plan(puts: list[Record] = (), deletes: list[str] = ()) -> FoldPlan:  # type: ignore[assignment]
    changes = CollectionPlan()
    for record in puts:
        changes.put(record)
    for id_ in deletes:
        changes.delete(id_)
    return FoldPlan({"words": changes})


def records(rng: np.random.Generator, n: int, groups: int, prefix: str = "r") -> list[Record]:
    """``n`` records whose vectors are drawn from ``groups`` distinct ones."""
    pool = rng.normal(size=(groups, DIM)).astype(np.float32)
    return [Record(f"{prefix}{i:04d}", pool[rng.integers(groups)], f"doc {i}") for i in range(n)]


def index_of(path: Path) -> tuple[dict[str, bytes], set[str]]:
    """What the distinct index holds: members (id -> digest) and the digests in Chroma."""
    root = path / DISTINCT_DIR
    with sqlite3.connect(root / "members.sqlite3") as db:
        members = {row[0]: row[1] for row in db.execute("SELECT id, digest FROM members")}
    client = chromadb.PersistentClient(str(root / "chroma"), settings=SETTINGS)
    try:
        points = set(client.get_collection("words").get(include=[])["ids"])
    finally:
        client.close()  # type: ignore[attr-defined]
    return members, points


async def assert_index_matches(path: Path) -> None:
    """Members are every record; points every vector (the collection has a large group)."""
    sink = await ChromaSink.open(path, distinct="off")
    try:
        held = await sink.records("words")
    finally:
        await sink.aclose()
    members, points = index_of(path)
    assert members == {r.id: digest(r.embedding) for r in held}
    assert points == {d.hex() for d in members.values()}


async def test_the_index_follows_puts_deletes_and_re_puts(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    first = records(rng, 60, 3)
    sink = await ChromaSink.open(tmp_path, distinct="keep", max_batch_size=16)
    try:
        await sink.apply(plan(first))
        await sink.apply(plan(deletes=[r.id for r in first[:25]]))
        moved = [Record(r.id, r.embedding + 1, r.document) for r in first[25:40]]
        await sink.apply(plan(moved + records(rng, 10, 2, prefix="n"), [first[45].id]))
        assert await sink.counts() == {"words": 60 - 25 - 1 + 10}
    finally:
        await sink.aclose()
    await assert_index_matches(tmp_path)


async def test_a_group_that_loses_every_member_leaves_the_index(tmp_path: Path) -> None:
    same = np.ones(DIM, np.float32)
    copies = [Record(f"c{i}", same) for i in range(GROUP_LIMIT + 1)]
    other = Record("o", np.zeros(DIM, np.float32))
    async with await ChromaSink.open(tmp_path, distinct="keep") as sink:
        await sink.apply(plan([*copies, other]))
    assert len(index_of(tmp_path)[1]) == 2
    async with await ChromaSink.open(tmp_path, distinct="keep") as sink:
        await sink.apply(plan(deletes=[c.id for c in copies[:-1]]))
    assert len(index_of(tmp_path)[1]) == 2
    async with await ChromaSink.open(tmp_path, distinct="keep") as sink:
        await sink.apply(plan(deletes=[copies[-1].id]))
    assert index_of(tmp_path)[1] == {digest(other.embedding).hex()}
    await assert_index_matches(tmp_path)


async def test_queries_through_the_index_are_brute_force_answers(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    held = records(rng, 300, 12)
    async with await ChromaSink.open(tmp_path, distinct="keep") as sink:
        await sink.apply(plan(held))
    queries = rng.normal(size=(20, DIM)).astype(np.float32)
    async with await ChromaSink.open(tmp_path) as reader:
        found = await reader.query("words", queries, 12, None)
    matrix = np.stack([r.embedding for r in held]).astype(np.float64)
    for q, hits in zip(queries, found, strict=True):
        exact = ((matrix - q) ** 2).sum(axis=1)
        want = sorted((float(exact[i]), held[i].id) for i in range(len(held)))[:12]
        assert len(hits) == 12
        assert [h.distance for h in hits] == pytest.approx([d for d, _ in want], rel=1e-5)
        docs = {r.id: r.document for r in held}
        assert all(h.document == docs[h.id] for h in hits)


async def test_a_snapshot_without_the_index_gets_it_from_a_compactor(tmp_path: Path) -> None:
    """A checkpoint written before the index existed: readers query Chroma's own
    collection; the compactor's sink indexes it whole on open."""
    rng = np.random.default_rng(3)
    held = records(rng, 80, 3)
    async with await ChromaSink.open(tmp_path, distinct="off") as old:
        await old.apply(plan(held))
    assert not (tmp_path / DISTINCT_DIR).exists()
    async with await ChromaSink.open(tmp_path) as reader:
        found = await reader.query("words", held[0].embedding[None, :], 3, None)
        assert found[0][0].distance == 0.0
    assert not (tmp_path / DISTINCT_DIR).exists()
    async with await ChromaSink.open(tmp_path, distinct="keep") as compactor:
        await compactor.index_distinct()
    await assert_index_matches(tmp_path)


async def test_an_export_is_a_plain_chroma_directory(tmp_path: Path) -> None:
    config = LogConfig(bucket="memory", table="memory", log="plain")
    store, table = MemoryStore(), MemoryTable()
    vectors = np.repeat(np.eye(DIM, dtype=np.float32), 3, axis=0)
    ids = [f"w{i}" for i in range(len(vectors))]
    async with DeltaLog.open(config, store=store, table=table) as log:
        await log.append(Delta([Upsert("words", ids, vectors)]))
        await log.append(Delta([Delete("words", ids[:2])]))
    options = {"store": store, "table": table, "cache_dir": tmp_path / "c"}
    async with Compactor(config, **options) as compactor:  # type: ignore[arg-type]
        await compactor.run_once(checkpoint=True)
        exported = await compactor.export(tmp_path / "out")
    assert not (exported.path / DISTINCT_DIR).exists()
    client = chromadb.PersistentClient(str(exported.path), settings=SETTINGS)
    try:
        assert [c.name for c in client.list_collections()] == ["words"]
        assert client.get_collection("words").count() == len(ids) - 2
    finally:
        client.close()  # type: ignore[attr-defined]
    async with Reader.open(config, cache_dir=tmp_path / "r", store=store, table=table) as r:
        got = await r.query(collection="words", query_embeddings=vectors[:1], n_results=3)
    assert (got["ids"][0][0], got["distances"][0][0]) == ("w2", 0.0)


async def _committed_log(tmp_path: Path, rows: int) -> tuple[LogConfig, dict[str, object]]:
    config = LogConfig(bucket="memory", table="memory", log="checked")
    options: dict[str, object] = {"store": MemoryStore(), "table": MemoryTable()}
    rng = np.random.default_rng(5)
    pool = rng.normal(size=(rows // 2 - GROUP_LIMIT, DIM)).astype(np.float32)
    copies = np.repeat(pool[:1], GROUP_LIMIT + 1, axis=0)  # a group large enough for points
    vectors = np.concatenate([copies, pool[rng.integers(len(pool), size=rows - len(copies))]])
    async with DeltaLog.open(config, **options) as log:  # type: ignore[arg-type]
        await log.append(Delta([Upsert("words", [f"w{i:03d}" for i in range(rows)], vectors)]))
    async with Compactor(config, cache_dir=tmp_path / "c", **options) as c:  # type: ignore[arg-type]
        await c.run_once(checkpoint=True)
    return config, options


async def test_verify_checks_the_index_against_brute_force(tmp_path: Path) -> None:
    config, options = await _committed_log(tmp_path, 120)
    async with Compactor(config, cache_dir=tmp_path / "v", **options) as c:  # type: ignore[arg-type]
        checked = await c.verify(index_queries=30)
        skipped = await c.verify(index_queries=0)
    assert checked.ok and checked.index is not None
    assert (checked.index.queries, checked.index.recall) == (30, {"words": 1.0})
    assert skipped.ok and skipped.index is None


async def test_verify_fails_on_an_index_that_lost_points(tmp_path: Path) -> None:
    """The records are all there (a record-by-record compare says equal); the distinct
    index lost half its points, so queries miss what they should find."""
    config, options = await _committed_log(tmp_path, 120)

    async def lose_points(work: Path) -> None:
        client = chromadb.PersistentClient(str(work / DISTINCT_DIR / "chroma"), settings=SETTINGS)
        try:
            points = client.get_collection("words")
            ids = sorted(points.get(include=[])["ids"])
            points.delete(ids=ids[::2])
        finally:
            client.close()  # type: ignore[attr-defined]

    await commit_altered_snapshot(config, tmp_path / "tamper", lose_points, **options)
    async with Compactor(config, cache_dir=tmp_path / "v", **options) as c:  # type: ignore[arg-type]
        result = await c.verify()
        lenient = await c.verify(min_recall=0.0)
    assert not result.ok and result.index is not None
    assert result.index.recall["words"] < 0.9
    assert result.differences == [
        f"collection 'words': the index found {result.index.recall['words']:.4f} of the 10 "
        "nearest records (brute force), below 0.99"
    ]
    assert lenient.ok


async def test_points_appear_once_a_vector_has_more_copies_than_the_limit(tmp_path: Path) -> None:
    """Distinct data costs no second HNSW: members only, queries go to Chroma's collection."""
    rng = np.random.default_rng(13)
    held = records(rng, 40, 40)
    async with await ChromaSink.open(tmp_path, distinct="keep") as sink:
        await sink.apply(plan(held))
    assert not (tmp_path / DISTINCT_DIR / "chroma").exists()  # not even opened
    same = rng.normal(size=DIM).astype(np.float32)
    copies = [Record(f"c{i}", same) for i in range(GROUP_LIMIT + 1)]
    async with await ChromaSink.open(tmp_path, distinct="keep") as sink:
        await sink.apply(plan(copies[:-1]))
    with pytest.raises(NotFoundError):
        index_of(tmp_path)
    async with await ChromaSink.open(tmp_path, distinct="keep") as sink:
        await sink.apply(plan(copies[-1:]))
    await assert_index_matches(tmp_path)


async def test_the_index_holds_every_point_written_once_closed(tmp_path: Path) -> None:
    """The distinct collections save their HNSW index every ``PERSIST_EVERY`` writes, as
    the snapshot's own do (``deltalog.snapshot.hnsw``): closed after 131 points, their
    index holds all of them (Chroma's default would have saved none)."""
    rng = np.random.default_rng(11)
    same = np.ones(DIM, np.float32)
    copies = [Record(f"c{i:03d}", same) for i in range(GROUP_LIMIT + 4)]
    sink = await ChromaSink.open(tmp_path, distinct="keep")
    try:
        rows = rng.normal(size=(130, DIM)).astype(np.float32)  # 130 distinct vectors
        await sink.apply(plan([*copies, *(Record(f"r{i:03d}", v) for i, v in enumerate(rows))]))
    finally:
        await sink.aclose()
    vector, metadata = saved_seq_ids(tmp_path / DISTINCT_DIR / "chroma", "words")
    assert vector is not None and vector == metadata
