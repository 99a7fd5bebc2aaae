"""``deltalog import chroma`` from a real Chroma directory (and a ``chroma run`` server)."""

from __future__ import annotations

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
