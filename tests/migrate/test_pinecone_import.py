"""``deltalog import pinecone`` through the unmodified official SDK against a local stand-in.

The SDK is pointed at ``tests.pinecone_server`` with only its host set
(``--host``); the log is on moto's server.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest

from deltalog import DeltaLog, LogConfig
from deltalog.cli import main
from deltalog.fold import Record, State
from tests.commands import where
from tests.compaction import assert_states_equal, reference
from tests.migrate.test_chroma_import import upserted_ids
from tests.pinecone_server import API_KEY, PineconeServer

DIM = 8


@pytest.fixture
def pinecone(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> Iterator[PineconeServer]:
    monkeypatch.setenv("PINECONE_API_KEY", API_KEY)
    with PineconeServer(dim=DIM) as server:
        yield server


def fill(server: PineconeServer, rng: np.random.Generator, namespace: str, n: int) -> list[str]:
    ids = [f"{namespace or 'd'}-{i:04d}" for i in range(n)]
    for i, id_ in enumerate(ids):
        values = [float(v) for v in rng.standard_normal(DIM).astype(np.float32)]
        metadata = {"text": f"word {i}", "receipt_id": i, "score": i / 4, "valid": i % 2 == 0}
        server.add(namespace, id_, values, metadata if i % 5 else {"plain": "x"})
    return ids


def expected(server: PineconeServer, namespace: str, collection: str) -> State:
    records = {}
    for id_, v in server.namespaces[namespace].items():
        meta = dict(v["metadata"])
        document = meta.pop("text", None)
        vector = np.asarray(v["values"], np.float32)
        records[id_] = Record(id_, vector, document, meta or None)
    return {collection: records}


async def run_cli(*args: str) -> int:
    code: int = await anyio.to_thread.run_sync(main, list(args))
    return code


def args(config: LogConfig, server: PineconeServer, *extra: str) -> list[str]:
    return [
        "import",
        "pinecone",
        "--index",
        "receipts",
        "--host",
        server.host,
        *extra,
        *where(config),
    ]


async def test_namespaces_are_listed_by_token_fetched_and_verified(
    log: DeltaLog,
    config: LogConfig,
    pinecone: PineconeServer,
    rng: np.random.Generator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fill(pinecone, rng, "words", 250)
    fill(pinecone, rng, "lines", 40)
    fill(pinecone, rng, "", 12)  # the default namespace
    namespaces = ["--namespace", "words", "--namespace", "lines=receipt_lines"]
    default = ["--namespace", "__default__=misc"]
    cache = ["--cache-dir", str(tmp_path)]
    assert (
        await run_cli(*args(config, pinecone, *namespaces, *default, "--verify", *cache, "-q")) == 0
    )
    out = capsys.readouterr().out
    assert "imported 302 records" in out and "verify: equal" in out
    want = {
        **expected(pinecone, "words", "words"),
        **expected(pinecone, "lines", "receipt_lines"),
        **expected(pinecone, "", "misc"),
    }
    assert_states_equal(await reference(log), want)
    assert pinecone.requests["/vectors/list"] == 3 + 1 + 1, "words took 3 pages (tokens)"
    assert pinecone.requests["/vectors/fetch"] == 5
    assert pinecone.requests["/describe_index_stats"] >= 2  # the import and the verify
    head = await log.head()
    assert await run_cli(*args(config, pinecone, *namespaces, *default, "-q")) == 0
    assert await log.head() == head, "a repeat writes nothing"
    assert pinecone.requests["/vectors/fetch"] == 5, "and fetches nothing it wrote"


async def test_a_failure_halfway_then_a_resume_writes_each_vector_once(
    log: DeltaLog,
    config: LogConfig,
    pinecone: PineconeServer,
    rng: np.random.Generator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fill(pinecone, rng, "words", 520)
    pinecone.fail_fetches_after = 3  # pages 4..6 fail (503, the SDK retries, then gives up)
    assert await run_cli(*args(config, pinecone, "--namespace", "words", "-q")) == 1
    assert "Unavailable" in capsys.readouterr().err
    assert len(await upserted_ids(log)) == 300
    pinecone.fail_fetches_after = None
    pinecone.fetched_ids.clear()
    assert await run_cli(*args(config, pinecone, "--namespace", "words", "-q")) == 0
    ids = await upserted_ids(log)
    assert len(ids) == len(set(ids)) == 520, "each vector written once"
    assert len(pinecone.fetched_ids) == 220, "the resume fetched only what was missing"
    assert_states_equal(await reference(log), expected(pinecone, "words", "words"))


async def test_a_missing_or_wrong_key_is_a_configuration_error(
    log: DeltaLog,
    config: LogConfig,
    pinecone: PineconeServer,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fill(pinecone, rng, "words", 5)
    monkeypatch.delenv("PINECONE_API_KEY")
    assert await run_cli(*args(config, pinecone, "--namespace", "words")) == 2
    assert "ConfigurationError: set PINECONE_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("PINECONE_API_KEY", "pc-wrong")
    assert await run_cli(*args(config, pinecone, "--namespace", "words")) == 2
    assert "refused the API key" in capsys.readouterr().err
    assert await log.head() == 0
    assert pinecone.requests["/vectors/fetch"] == 0


async def test_metadata_that_cannot_map_is_refused_and_listed(
    log: DeltaLog,
    config: LogConfig,
    pinecone: PineconeServer,
    rng: np.random.Generator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fill(pinecone, rng, "words", 10)
    pinecone.namespaces["words"]["words-0003"]["metadata"]["tags"] = []
    pinecone.namespaces["words"]["words-0005"]["metadata"]["tags"] = ["a", "b"]  # taken
    pinecone.namespaces["words"]["words-0007"]["metadata"]["text"] = 42
    assert await run_cli(*args(config, pinecone, "--namespace", "words", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "refused: words/words-0003: metadata 'tags': a list value must not be empty" in out
    assert "words-0005" not in out, "a list of strings maps"
    counted = r"^words\s+\| metadata 'tags': a list value must not be empty\s+\|\s+1 \| words-0003$"
    assert re.search(counted, out, re.M), out
    assert "refused: words/words-0007: document field 'text' is a int, not a string" in out
    assert await run_cli(*args(config, pinecone, "--namespace", "words")) == 1
    err = capsys.readouterr().err
    assert "2 records cannot map" in err and "words-0003" in err and "words-0007" in err
    assert await log.head() == 0, "nothing of the page written"


async def test_an_unknown_namespace_and_a_dimension_clash_write_nothing(
    log: DeltaLog,
    config: LogConfig,
    pinecone: PineconeServer,
    rng: np.random.Generator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from deltalog import Delta, Upsert

    fill(pinecone, rng, "words", 5)
    assert await run_cli(*args(config, pinecone, "--namespace", "nope")) == 1
    assert "has no namespace 'nope'; it has words" in capsys.readouterr().err
    await log.append(Delta(ops=[Upsert("words", ["x"], np.zeros((1, 3), np.float32))]))
    assert await run_cli(*args(config, pinecone, "--namespace", "words")) == 1
    assert "dimension clash" in capsys.readouterr().err
    assert await log.head() == 1
