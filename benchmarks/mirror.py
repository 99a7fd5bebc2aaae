"""The mirror and the Chroma importer against ``chroma run``, as ratios to the raw client.

``python -m benchmarks.mirror [--vectors N] [--dim D]`` starts moto's server
and a ``chroma run`` server on loopback and measures, in one run, on the
same vectors (entries of 500 upserts with a document and metadata each):

- **raw**: ``chromadb.HttpClient.add`` in batches of the server's maximum
  into an empty database: what the server takes at best;
- **bootstrap**: ``Mirror.run_once`` on an empty database, the log compacted
  (every record comes from the snapshot);
- **follow**: ``Mirror.run_once`` on an empty database, nothing compacted
  (every record comes from the log's entries, in batches);
- **import chroma**: the mirrored database read back into a new log.

It prints vectors/s for each and the ratio to raw, as one JSON object. The
machine's load moves the absolute figures; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from compactor import Compactor
from compactor.mirror import Mirror
from deltalog import Delta, DeltaLog, LogConfig, Upsert
from deltalog.migrate.chroma import ChromaImporter, ChromaSource
from deltalog.snapshot.server import ChromaTarget
from deltalog.storage.create import ensure_storage
from deltalog.storage.endpoint import FAKE_CREDENTIALS, EmbeddedEndpoint
from tests.chroma_server import ChromaServer

ENTRY = 500


async def _fill(log: DeltaLog, vectors: np.ndarray[Any, Any]) -> None:
    for start in range(0, len(vectors), ENTRY):
        ids = [f"w{i:08d}" for i in range(start, min(start + ENTRY, len(vectors)))]
        await log.append(
            Delta(
                ops=[
                    Upsert(
                        "words",
                        ids,
                        vectors[start : start + len(ids)],
                        documents=[f"doc {i}" for i in ids],
                        metadatas=[{"n": n, "label": "x"} for n in range(len(ids))],
                    )
                ]
            )
        )


def _raw(server: ChromaServer, vectors: np.ndarray[Any, Any]) -> float:
    with server.client(server.new_database()) as client:
        collection = client.create_collection("words", embedding_function=None)
        batch = client.get_max_batch_size()
        started = time.perf_counter()
        for start in range(0, len(vectors), batch):
            chunk = vectors[start : start + batch]
            ids = [f"w{i:08d}" for i in range(start, start + len(chunk))]
            collection.add(
                ids=ids,
                embeddings=chunk,
                documents=[f"doc {i}" for i in ids],
                metadatas=[{"n": n, "label": "x"} for n in range(len(ids))],
            )
        return len(vectors) / (time.perf_counter() - started)


async def _mirror_rate(config: LogConfig, server: ChromaServer, cache: Path) -> tuple[float, str]:
    database = server.new_database()
    target = ChromaTarget(server.url, database=database)
    async with Mirror(config, target, cache_dir=cache) as mirror:
        started = time.perf_counter()
        result = await mirror.run_once()
        seconds = time.perf_counter() - started
    return (result.vectors_upserted + result.bootstrapped) / seconds, database


async def run(vectors_n: int, dim: int, url: str, work: Path) -> dict[str, Any]:
    await ensure_storage(LogConfig(bucket="bench-mirror", table="bench-mirror", endpoint_url=url))
    vectors = np.random.default_rng(1).standard_normal((vectors_n, dim), dtype=np.float32)
    base = LogConfig(bucket="bench-mirror", table="bench-mirror", endpoint_url=url)
    compacted = replace(base, log=f"b-{uuid.uuid4().hex[:8]}")
    tail = replace(base, log=f"f-{uuid.uuid4().hex[:8]}")
    with ChromaServer(work / "chroma") as server:
        raw = await anyio.to_thread.run_sync(_raw, server, vectors)
        async with DeltaLog.open(compacted) as log:
            await _fill(log, vectors)
        async with Compactor(compacted, cache_dir=work / "cache") as compactor:
            await compactor.run_once()
        bootstrap, database = await _mirror_rate(compacted, server, work / "cache")
        async with DeltaLog.open(tail) as log:
            await _fill(log, vectors)
        follow, _ = await _mirror_rate(tail, server, work / "cache")
        target = replace(base, log=f"i-{uuid.uuid4().hex[:8]}")
        source = ChromaSource(target=ChromaTarget(server.url, database=database))
        async with DeltaLog.open(target) as log, await ChromaImporter.open(log, source) as imp:
            imported = (await imp.run()).records_per_second
    rates = {"raw": raw, "bootstrap": bootstrap, "follow": follow, "import_chroma": imported}
    return {
        "vectors": vectors_n,
        "dim": dim,
        "vectors_per_second": {k: round(v, 1) for k, v in rates.items()},
        "ratio_to_raw": {k: round(v / raw, 3) for k, v in rates.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mirror")
    parser.add_argument("--vectors", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    args = parser.parse_args()
    os.environ.update(FAKE_CREDENTIALS)
    with tempfile.TemporaryDirectory() as scratch, EmbeddedEndpoint() as endpoint:
        result = anyio.run(run, args.vectors, args.dim, endpoint.url, Path(scratch))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
