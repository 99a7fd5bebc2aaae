"""Raw chromadb's own peak RSS for one small run's upsert into a snapshot, in a child process.

``python -m benchmarks.chroma_child DIR COUNT DIM`` copies the Chroma
directory ``DIR``, opens it with chromadb, upserts ``COUNT`` new random unit
vectors of ``DIM`` dimensions into its ``words`` collection, closes it and
prints ``{"peak_rss_mb": ...}``: the memory Chroma itself needs to apply to a
snapshot of that size, the floor under ``compact``'s peak RSS.
``raw_chroma_rss`` runs it from an async parent.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio

from benchmarks.procstat import peak_rss_mb

__all__ = ["raw_chroma_rss"]

COLLECTION = "words"


async def raw_chroma_rss(directory: Path, count: int, dim: int) -> float:
    """Peak RSS (MB) of a child that upserts ``count`` vectors into a copy of ``directory``."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.chroma_child",
        str(directory),
        str(count),
        str(dim),
    ]
    done = await anyio.run_process(command)
    report: dict[str, float] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return report["peak_rss_mb"]


def _client(path: Path) -> Any:
    import chromadb
    from chromadb.config import Settings

    return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))


def _upsert(path: Path, count: int, dim: int) -> None:
    import numpy as np

    client = _client(path)
    try:
        collection = client.get_collection(COLLECTION, embedding_function=None)
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((count, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        collection.upsert(ids=[f"raw-{i}" for i in range(count)], embeddings=vectors)
    finally:
        client.close()


def _main(argv: list[str]) -> int:
    source, count, dim = Path(argv[0]), int(argv[1]), int(argv[2])
    with tempfile.TemporaryDirectory(prefix="deltalog-bench-raw-rss-") as tmp:
        shutil.copytree(source, Path(tmp) / "chroma")
        _upsert(Path(tmp) / "chroma", count, dim)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
