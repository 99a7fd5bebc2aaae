"""``deltalog import chroma`` from a real Chroma directory (and a ``chroma run`` server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import chromadb
import numpy as np
import pytest
from chromadb.config import Settings

from compactor.committed import committed_copy
from deltalog import Delete, Delta, DeltaLog, LogConfig, Upsert
from deltalog.cli import main
from deltalog.errors import ConfigurationError, InvalidInput
from deltalog.fold import Record, State
from deltalog.migrate.chroma import ChromaImporter, ChromaSource
from deltalog.migrate.pages import SourceMap
from deltalog.snapshot.server import ChromaTarget
from tests.chroma_server import ChromaServer, free_port
from tests.commands import where
from tests.compaction import assert_states_equal, log_entries, reference

SIZES = {"words": (8, 1100), "lines": (4, 230)}


def make_source(path: Path, rng: np.random.Generator) -> State:
    """A Chroma directory with two collections; returns what it holds."""
    client: Any = chromadb.PersistentClient(
        path=str(path), settings=Settings(anonymized_telemetry=False)
    )
    state: State = {}
    try:
        for name, (dim, n) in SIZES.items():
            collection = client.create_collection(name, embedding_function=None)
            ids = [f"{name}-{i:05d}" for i in rng.permutation(n)]
            vectors = rng.standard_normal((n, dim), dtype=np.float32)
            half = n // 2  # with documents and metadata, then without
            collection.add(
                ids=ids[:half],
                embeddings=vectors[:half],
                documents=[f"text {i}" for i in ids[:half]],
                metadatas=[{"n": i, "ok": i % 2 == 0, "x": i / 8, "s": "é"} for i in range(half)],
            )
            collection.add(ids=ids[half:], embeddings=vectors[half:])
            state[name] = {
                id_: Record(
                    id_,
                    vectors[i],
                    f"text {id_}" if i < half else None,
                    {"n": i, "ok": i % 2 == 0, "x": i / 8, "s": "é"} if i < half else None,
                )
                for i, id_ in enumerate(ids)
            }
    finally:
        client.close()
    return state


async def run_cli(*args: str) -> int:
    code: int = await anyio.to_thread.run_sync(main, list(args))
    return code


async def upserted_ids(log: DeltaLog) -> list[str]:
    return [
        id_
        for _, entry in await log_entries(log)
        for delta in entry.deltas
        for op in delta.ops
        if isinstance(op, Upsert)
        for id_ in op.ids
    ]


async def test_import_a_directory_then_verify_then_a_repeat_writes_nothing(
    log: DeltaLog,
    config: LogConfig,
    rng: np.random.Generator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = make_source(tmp_path / "src", rng)
    args = ["import", "chroma", "--path", str(tmp_path / "src"), *where(config)]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert await run_cli(*args, "--batch", "200", "--verify", *cache, "-q") == 0
    out = capsys.readouterr().out
    assert "imported 1330 records" in out and "verify: equal" in out
    assert_states_equal(await reference(log), source)
    head = await log.head()
    assert await run_cli(*args, "--batch", "200", "-q", "--json") == 0
    assert '"deltas_written": 0' in capsys.readouterr().out
    assert await log.head() == head, "a repeated import writes nothing"


async def test_an_interrupted_import_resumes_and_writes_each_record_once(
    log: DeltaLog, rng: np.random.Generator, tmp_path: Path
) -> None:
    source = make_source(tmp_path / "src", rng)

    class Interrupted(Exception):
        pass

    def stop_after_three(result: Any) -> None:
        if result.deltas_written >= 3:
            raise Interrupted

    where = ChromaSource(path=tmp_path / "src")
    async with await ChromaImporter.open(log, where, batch=100) as importer:
        with pytest.raises(Interrupted):
            await importer.run(stop_after_three)
    partial = len(await upserted_ids(log))
    assert 0 < partial < 1330
    async with await ChromaImporter.open(log, where, batch=100) as importer:
        result = await importer.run()
    assert result.deltas_skipped == 3 and result.records_written == 1330 - partial
    ids = await upserted_ids(log)
    assert len(ids) == len(set(ids)) == 1330, "each record written once"
    assert_states_equal(await reference(log), source)


async def test_dry_run_prints_collections_counts_dims_and_bytes_and_writes_nothing(
    log: DeltaLog,
    config: LogConfig,
    rng: np.random.Generator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_source(tmp_path / "src", rng)
    args = ["import", "chroma", "--path", str(tmp_path / "src"), "--dry-run", "--json"]
    assert await run_cli(*args, "--collections", "lines", *where(config)) == 0
    out = capsys.readouterr().out
    assert '"collection": "lines"' in out and '"records": 230' in out and '"dim": 4' in out
    assert '"words"' not in out
    assert await log.head() == 0


async def test_bad_sources_are_typed_errors_and_write_nothing(
    log: DeltaLog, rng: np.random.Generator, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="not a Chroma directory"):
        await ChromaImporter.open(log, ChromaSource(path=tmp_path / "empty"))
    unreachable = ChromaSource(target=ChromaTarget(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(ConfigurationError, match="cannot use the Chroma server"):
        await ChromaImporter.open(log, unreachable)
    make_source(tmp_path / "src", rng)
    await log.append(Delta(ops=[Upsert("words", ["other"], np.zeros((1, 3), np.float32))]))
    async with await ChromaImporter.open(log, ChromaSource(path=tmp_path / "src")) as importer:
        with pytest.raises(InvalidInput, match="dimension clash, nothing written: words"):
            await importer.run()
        importer._wanted = [SourceMap("nope", "nope")]
        with pytest.raises(InvalidInput, match="no collection 'nope'"):
            await importer.run()
    assert await log.head() == 1, "nothing but the delta that fixed the dimension"


async def test_verify_finds_a_record_the_log_lost(
    log: DeltaLog, rng: np.random.Generator, tmp_path: Path
) -> None:
    from compactor import Compactor

    make_source(tmp_path / "src", rng)
    where = ChromaSource(path=tmp_path / "src")
    async with await ChromaImporter.open(log, where, collections=["lines"]) as importer:
        await importer.run()
        await log.append(Delta(ops=[Delete("lines", ["lines-00007"])]))
        async with Compactor(log.config, cache_dir=tmp_path / "c") as compactor:
            await compactor.run_once()
        async with committed_copy(log, tmp_path / "c") as committed:
            seen, differences = await importer.verify(committed, sample=230)
    assert seen == {"lines": (230, 229)}
    assert "lines: 230 in the source, 229 in the log" in differences
    assert "lines/lines-00007: missing from the log" in differences


async def test_import_from_a_server(
    log: DeltaLog, rng: np.random.Generator, tmp_path: Path
) -> None:
    with ChromaServer(tmp_path / "server") as server:
        database = server.new_database()
        with server.client(database) as client:
            words = client.create_collection("words", embedding_function=None)
            vectors = rng.standard_normal((300, 8), dtype=np.float32)
            words.add(ids=[f"w{i}" for i in range(300)], embeddings=vectors)
        source = ChromaSource(target=ChromaTarget(server.url, database=database))
        async with await ChromaImporter.open(log, source, batch=64) as importer:
            result = await importer.run()
    assert result.records_written == 300
    state = await reference(log)
    assert sorted(state["words"]) == sorted(f"w{i}" for i in range(300))
    assert state["words"]["w5"].embedding.tobytes() == vectors[5].tobytes()


def _source_with(path: Path, rng: np.random.Generator, **collections: list[dict[str, Any]]) -> None:
    """A Chroma directory whose collections hold records with these metadatas (4-d vectors);
    a collection given no metadatas is created empty."""
    client: Any = chromadb.PersistentClient(
        path=str(path), settings=Settings(anonymized_telemetry=False)
    )
    try:
        for name, metadatas in collections.items():
            collection = client.create_collection(name, embedding_function=None)
            if metadatas:
                collection.add(
                    ids=[f"{name}-{i:03d}" for i in range(len(metadatas))],
                    embeddings=rng.standard_normal((len(metadatas), 4), dtype=np.float32),
                    metadatas=metadatas,
                )
    finally:
        client.close()


async def test_list_metadata_imports_bit_exact_and_verifies(
    log: DeltaLog,
    config: LogConfig,
    rng: np.random.Generator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """chromadb 1.5's list values pass through: the log carries them, the committed
    snapshot holds them, ``--verify`` compares them bit-exact and a fresh read filters
    them with ``$contains`` as Chroma does."""
    from deltalog import Reader

    tagged = [
        {"n": i, "tags": ["a", "b"] if i % 2 else ["c"], "xs": [0.1, i / 3], "ks": [i, -i]}
        for i in range(8)
    ]
    _source_with(tmp_path / "src", rng, tagged=tagged)
    args = ["import", "chroma", "--path", str(tmp_path / "src"), *where(config), "-q"]
    assert await run_cli(*args, "--verify", "--cache-dir", str(tmp_path / "cache")) == 0
    assert "verify: equal (1 collections)" in capsys.readouterr().out
    state = await reference(log)
    assert state["tagged"]["tagged-003"].metadata == tagged[3]
    vector = rng.standard_normal((1, 4), dtype=np.float32)
    await log.append(Delta(ops=[Upsert("tagged", ["tail"], vector, metadatas=[{"tags": ["a"]}])]))
    async with Reader.open(config, consistency="fresh", cache_dir=tmp_path / "r") as reader:
        got = await reader.get(collection="tagged", where={"tags": {"$contains": "a"}})
        assert sorted(got["ids"]) == [*(f"tagged-{i:03d}" for i in range(1, 8, 2)), "tail"]
        none = await reader.get(collection="tagged", where={"ks": {"$contains": 1.0}})
        assert none["ids"] == [], "typed: 1.0 is not in a list of ints"


async def test_dry_run_lists_every_refusal_with_counts_and_the_import_writes_none_of_their_pages(
    config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Records too large for one delta of a log with a small ``max_delta_bytes`` (what
    Chroma takes and the log does not): the plan lists every one, with counts; the
    import writes the pages before the first page that holds one, and nothing of it."""
    from dataclasses import replace

    from deltalog.migrate.pages import refusal_counts

    client: Any = chromadb.PersistentClient(
        path=str(tmp_path / "src"), settings=Settings(anonymized_telemetry=False)
    )
    try:
        for name, big in (("alpha", ()), ("beta", (0, 3, 6, 9))):
            collection = client.create_collection(name, embedding_function=None)
            collection.add(
                ids=[f"{name}-{i:03d}" for i in range(10)],
                embeddings=rng.standard_normal((10, 4), dtype=np.float32),
                documents=["x" * (8000 if i in big else 10) for i in range(10)],
            )
    finally:
        client.close()
    small = replace(config, max_delta_bytes=4096)
    async with DeltaLog.open(small) as log:
        source = ChromaSource(path=tmp_path / "src")
        async with await ChromaImporter.open(log, source, batch=5) as importer:
            plan, refused = await importer.plan()
            assert [(r.namespace, r.id) for r in refused] == [
                ("beta", f"beta-{i:03d}") for i in (0, 3, 6, 9)
            ]
            assert refusal_counts(refused) == [
                ("beta", refused[0].reason, 4, ["beta-000", "beta-003", "beta-006"])
            ]
            assert "over the log's max_delta_bytes (4,096): not one delta" in refused[0].reason
            assert [c.records for c in plan.collections] == [10, 10]
            assert await log.head() == 0, "a plan writes nothing"
            with pytest.raises(InvalidInput, match="2 records the log refuses, nothing of"):
                await importer.run()
        ids = await upserted_ids(log)
    assert sorted(ids) == [f"alpha-{i:03d}" for i in range(10)], "only the collection before"


async def test_collection_src_eq_dst_imports_under_another_name_and_the_clash_says_how(
    log: DeltaLog,
    config: LogConfig,
    rng: np.random.Generator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _source_with(tmp_path / "src", rng, words=[{"n": i} for i in range(6)])
    await log.append(Delta(ops=[Upsert("words", ["other"], np.zeros((1, 3), np.float32))]))
    args = ["import", "chroma", "--path", str(tmp_path / "src"), *where(config), "-q"]
    assert await run_cli(*args) == 1
    err = capsys.readouterr().err
    assert "dimension clash, nothing written: words: the source has 4-dimensional vectors, " in err
    assert "Import into another collection (--collection SRC=DST) or another log (--log)" in err
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert await run_cli(*args, "--collection", "words=words4", "--verify", *cache) == 0
    out = capsys.readouterr().out
    assert "imported 6 records" in out and "verify: equal (1 collections)" in out, out
    state = await reference(log)
    assert sorted(state["words4"]) == [f"words-{i:03d}" for i in range(6)]
    assert sorted(state["words"]) == ["other"], "the clashing collection is untouched"
    # A repeat writes nothing, and says where the import's records are.
    head = await log.head()
    assert await run_cli(*args, "--collection", "words=words4") == 0
    repeat = capsys.readouterr().out
    assert "imported 0 records in 0 deltas (1 already in the log)" in repeat
    assert repeat.rstrip().endswith(f"last seq {head}"), repeat
    assert await log.head() == head


async def test_an_empty_source_collection_is_skipped_and_said_so(
    log: DeltaLog,
    config: LogConfig,
    rng: np.random.Generator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _source_with(tmp_path / "src", rng, empty=[], full=[{"n": i} for i in range(3)])
    args = ["import", "chroma", "--path", str(tmp_path / "src"), *where(config), "-q"]
    assert await run_cli(*args, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "skipped, empty in the source: empty" in out, out
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert await run_cli(*args, "--verify", *cache) == 0
    out = capsys.readouterr().out
    assert "empty: skipped: empty in the source" in out, out
    assert "verify: equal (1 collections; 1 empty ones skipped)" in out, out
    assert "0 | 0" not in out, "not reported as 0/0 equal"
    assert await run_cli(*args, "--verify", "--json", *cache) == 0
    body = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (body["counts"], body["skipped"], body["ok"]) == ({"full": [3, 3]}, ["empty"], True)


async def test_a_page_claimed_by_a_write_that_never_landed_is_not_taken_as_imported(
    log: DeltaLog, rng: np.random.Generator, tmp_path: Path
) -> None:
    """An import stopped between claiming a page's key and writing its entry leaves a claim
    on a seq that stays empty. A rerun must not count that page as in the log (its records
    would never be imported): it goes to the append protocol, which writes it or refuses
    loudly, never skips it."""
    from deltalog.errors import Conflict
    from deltalog.migrate.pages import page_key
    from deltalog.storage.table import Claim

    _source_with(tmp_path / "src", rng, words=[{"n": i} for i in range(4)])
    source = ChromaSource(path=tmp_path / "src")
    async with await ChromaImporter.open(log, source) as importer:
        ((collection, _, ids, _),) = await importer.check()
        key = page_key("chroma", str(collection.id), collection.name, ids) + "/0"
        seq = await log.table.reserve(log.keys.log_id)
        await log.table.claim_keys(log.keys.log_id, [Claim(key, seq, "a-write-that-died")])
        try:
            result = await importer.run()
        except Conflict:
            written = False  # the append protocol refuses to write it twice, loudly
        else:
            assert (result.deltas_skipped, result.records_written) == (0, 4)
            written = True
    assert sorted(await upserted_ids(log)) == (sorted(ids) if written else [])
