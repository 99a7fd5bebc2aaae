"""``deltalog import chroma --verify`` into a sharded log: the importer writes the log as
always; the verify compacts every shard and compares with all of them at the cut."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings

from deltalog import LogConfig
from tests.commands import where
from tests.migrate.test_chroma_import import run_cli


async def test_import_into_a_sharded_log_verifies_equal(
    config: LogConfig,
    rng: np.random.Generator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client: Any = chromadb.PersistentClient(
        path=str(tmp_path / "source"), settings=Settings(anonymized_telemetry=False)
    )
    try:
        words = client.create_collection("words", embedding_function=None)
        words.add(
            ids=[f"w{i}" for i in range(60)],
            embeddings=rng.standard_normal((60, 8), dtype=np.float32),
            metadatas=[{"n": i} for i in range(60)],
        )
    finally:
        client.close()
    assert await run_cli("init", *where(config), "--shards", "3") == 0
    capsys.readouterr()
    argv = ["import", "chroma", "--path", str(tmp_path / "source"), "--verify", "--json"]
    cache = ["--cache-dir", str(tmp_path / "cache"), "-q"]
    assert await run_cli(*argv, *cache, *where(config)) == 0
    verdict = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert verdict == {"counts": {"words": [60, 60]}, "differences": [], "ok": True, "skipped": []}
