"""``deltalog get`` and ``deltalog delete``: records by id from the shell.

On moto's S3 + DynamoDB server and real Chroma, through ``deltalog.cli.main``
in this process: a delete appended from the shell is seen by a fresh read at
once and by a snapshot read only once it is compacted.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import numpy as np
import pytest

from compactor import Compactor
from deltalog import Delta, DeltaLog, LogConfig
from deltalog.cli import main
from tests.builders import upsert
from tests.commands import where


def _seed(config: LogConfig, rng: np.random.Generator, cache: Path) -> None:
    """Words ``w0``-``w2`` and one line, compacted."""

    async def run() -> None:
        async with DeltaLog.open(config) as log:
            await log.append(Delta(ops=[upsert(rng, ["w0", "w1", "w2"])]))
            await log.append(Delta(ops=[upsert(rng, ["l0"], collection="lines", dim=4)]))
        async with Compactor(config, cache_dir=cache) as compactor:
            assert (await compactor.run_once()).status == "applied"

    anyio.run(run)


def _cells(out: str) -> dict[str, list[str]]:
    """A table printed to a pipe, by its first cell."""
    rows = [
        [cell.strip() for cell in line.split("|")]
        for line in out.splitlines()
        if "|" in line and not set(line) <= set("-+| ")
    ]
    return {row[0]: row for row in rows}


def test_a_delete_from_the_shell_is_seen_fresh_at_once_and_in_the_snapshot_once_compacted(
    config: LogConfig,
    rng: np.random.Generator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _seed(config, rng, tmp_path / "compactor")
    cache = ["--cache-dir", str(tmp_path / "reader")]
    get = [
        "get",
        "--collection",
        "words",
        "--ids",
        "w0,w1",
        "--ids",
        "nope",
        *cache,
        *where(config),
    ]

    assert main([*get, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["ids"] == ["w0", "w1"] and got["documents"] == ["doc w0", "doc w1"]
    assert got["metadatas"][0] == {"n": 0, "label": "l0", "ok": True, "x": 0.0}

    delete = ["delete", "--collection", "words", "--ids", "w0", *where(config)]
    assert main([*delete, "--idempotency-key", "shell-1"]) == 0
    said = capsys.readouterr().out
    assert said == (
        f"{config.log}: delete of 1 ids from 'words' appended at seq 3: fresh reads see it "
        "now, snapshot reads once it is compacted (`deltalog compact`)\n"
    )
    assert main([*delete, "--idempotency-key", "shell-1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seq"] == 3, "the same key writes nothing twice"

    assert main([*get, "--consistency", "snapshot"]) == 0
    snapshot = capsys.readouterr().out
    assert snapshot.lstrip().startswith("words: snapshot read at the committed hwm 2\n")
    assert set(_cells(snapshot)) == {"id", "w0", "w1"}, "the committed state still has w0"
    assert _cells(snapshot)["w0"][1:] == [
        "'doc w0'",
        '{"label": "l0", "n": 0, "ok": true, "x": 0.0}',
    ]
    assert snapshot.endswith("not found (snapshot read): nope\n")

    assert main([*get, "--consistency", "fresh"]) == 0
    fresh = capsys.readouterr().out
    assert fresh.lstrip().startswith("words: fresh read at seq 3 (committed hwm 2)\n"), fresh
    assert set(_cells(fresh)) == {"id", "w1"}, "the fresh read folds the delete in"
    assert fresh.endswith("not found (fresh read): w0, nope\n")

    compact = ["compact", "-q", "--cache-dir", str(tmp_path / "compactor"), *where(config)]
    assert main(compact) == 0
    capsys.readouterr()
    assert main(get) == 0
    assert set(_cells(capsys.readouterr().out)) == {"id", "w1"}, "compacted: both agree"


def test_a_collection_the_log_does_not_hold_is_refused_with_those_it_does(
    config: LogConfig,
    rng: np.random.Generator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _seed(config, rng, tmp_path / "compactor")
    cache = ["--cache-dir", str(tmp_path / "reader")]
    for command in (
        ["get", "--collection", "word", "--ids", "w0", *cache],
        ["delete", "--collection", "word", "--ids", "w0"],
    ):
        assert main([*command, *where(config)]) == 1
        err = capsys.readouterr().err
        assert f"log {config.log!r} has no collection 'word'; its collections: " in err, err
        assert "lines (4 dims), words (8 dims)" in err
    query = ["query", "--collection", "word", "--text", "x", "--embedder", "hash", "--dim", "8"]
    assert main([*query, *cache, *where(config)]) == 1
    err = capsys.readouterr().err
    assert "collection 'word' holds no vectors" in err and "words (8 dims)" in err, err

    assert main(["get", "--collection", "words", *cache, *where(config)]) == 1
    assert "give the records to read: --ids a,b" in capsys.readouterr().err

    async def head() -> int:
        async with DeltaLog.open(config) as log:
            return await log.head()

    assert anyio.run(head) == 2, "nothing was written"
