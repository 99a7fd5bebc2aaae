"""The pipeline deltalog replaces, end to end against deltalog's, on the same receipts.

**Baseline**, per receipt (``e2e_concurrency`` receipts at a time):

1. write a temporary ChromaDB persistent directory holding the receipt's
   words and lines with their vectors, and close it;
2. tar.gz it, upload it as a delta (``PutObject``) and announce it (a
   DynamoDB item listing the delta's key);

then the baseline compactor lists the announcements and, downloading and
unpacking up to ``e2e_concurrency`` deltas ahead, opens each one with
ChromaDB, reads its records and copies them into the snapshot directory in
batches of Chroma's maximum size; finally it closes the snapshot, archives
and uploads it with the same ``publish_snapshot`` deltalog uses, and records
it. CPU-bound Chroma work runs in worker threads, at most one per core.

**deltalog**: ``ReceiptProducer`` (one delta per receipt, idempotency keys,
group commit) with ``e2e_concurrency`` receipts at a time, then one
``Compactor.run_once`` that publishes and commits the snapshot.

Both start from the same receipts with the same embeddings (no embedding is
timed) on the same endpoint, and both end with a published snapshot holding
every record. receipts/s = receipts / (produce + compact) seconds. Raw
chromadb upserting the same records from memory gives the floor both
pipelines share, and so a ceiling on the speedup.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import anyio
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from benchmarks.harness import (
    TABLE,
    CpuMeter,
    Endpoint,
    progress,
    raw_chroma_upsert,
    scratch_dir,
)
from benchmarks.settings import Sizes
from benchmarks.workload import LINES, WORDS, PrecomputedEmbedder, ReceiptData
from compactor.publish import publish_snapshot
from compactor.runner import Compactor
from deltalog.config import LogConfig
from deltalog.log import DeltaLog
from deltalog.read import list_entries
from deltalog.receipts.ingest import ReceiptProducer
from deltalog.storage.aws import client
from deltalog.storage.s3 import S3Store

__all__ = ["E2EFigures", "PipelineFigures", "run_baseline"]

Part = tuple[list[str], np.ndarray[Any, np.dtype[np.float32]], list[Any], list[Any]]
"""One delta's records in one collection: ids, vectors, documents, metadatas."""
Rows = dict[str, Part]


@dataclass(frozen=True, slots=True)
class PipelineFigures:
    name: str
    receipts: int
    vectors: int
    """Records in the published snapshot."""
    produce_seconds: float
    compact_seconds: float
    uploaded_mb: float
    """Bytes the producers uploaded."""
    seconds: float
    receipts_per_s: float
    client_cpu: float
    server_cpu: float


@dataclass(frozen=True, slots=True)
class E2EFigures:
    concurrency: int
    deltalog: PipelineFigures
    baseline: PipelineFigures
    speedup: float
    """deltalog receipts/s / baseline receipts/s."""
    raw_chroma_seconds: float
    """Raw chromadb upserting the same records from memory: what every pipeline pays."""
    speedup_ceiling: float
    """Baseline seconds / raw chromadb seconds: about the most a pipeline that inserts
    every vector into one Chroma snapshot can gain over the baseline."""


def _figures(
    name: str,
    receipts: int,
    vectors: int,
    times: tuple[float, float, float],
    uploaded: int,
    meter: CpuMeter,
) -> PipelineFigures:
    started, produced, compacted = times
    seconds = compacted - started
    return PipelineFigures(
        name=name,
        receipts=receipts,
        vectors=vectors,
        produce_seconds=round(produced - started, 4),
        compact_seconds=round(compacted - produced, 4),
        uploaded_mb=round(uploaded / 1e6, 2),
        seconds=round(seconds, 4),
        receipts_per_s=round(receipts / seconds, 2),
        client_cpu=meter.client_share,
        server_cpu=meter.server_share,
    )


# -- the baseline's blocking steps (worker threads) ------------------------------------


def _chroma(path: Path) -> Any:
    import chromadb
    from chromadb.config import Settings

    return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))


def _package(data: ReceiptData, work: Path) -> bytes:
    """One receipt as a tar.gz of a closed Chroma directory."""
    path = work / uuid.uuid4().hex
    chroma = _chroma(path)
    try:
        for name, records, vectors in (
            (WORDS, data.words, data.word_vectors),
            (LINES, data.lines, data.line_vectors),
        ):
            collection = chroma.get_or_create_collection(name, embedding_function=None)
            collection.add(
                ids=records.ids,
                embeddings=vectors,
                documents=records.documents,
                metadatas=cast(Any, records.metadatas),
            )
    finally:
        chroma.close()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        tar.add(path, arcname=".")
    shutil.rmtree(path)
    return out.getvalue()


def _unpack(blob: bytes, work: Path) -> Rows:
    """A delta's records, read back from its Chroma directory."""
    path = work / uuid.uuid4().hex
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
            tar.extractall(path, filter="data")
        else:  # pragma: no cover
            tar.extractall(path)  # our own archive
    chroma = _chroma(path)
    rows: Rows = {}
    try:
        for name in (WORDS, LINES):
            got = chroma.get_collection(name, embedding_function=None).get(
                include=["embeddings", "documents", "metadatas"]
            )
            vectors = np.asarray(got["embeddings"], dtype=np.float32)
            documents = list(got["documents"] or [])
            rows[name] = (list(got["ids"]), vectors, documents, list(got["metadatas"] or []))
    finally:
        chroma.close()
    shutil.rmtree(path)
    return rows


@dataclass(slots=True)
class _Snapshot:
    """The baseline compactor's snapshot directory and the rows waiting to go in."""

    path: Path
    chroma: Any = None
    batch: int = 0
    pending: dict[str, list[Part]] = field(default_factory=dict)
    vectors: int = 0

    def open(self) -> None:
        self.chroma = _chroma(self.path)
        self.batch = int(self.chroma.get_max_batch_size())
        for name in (WORDS, LINES):
            self.chroma.get_or_create_collection(name, embedding_function=None)

    def add(self, rows: Rows) -> None:
        """Queue a delta's rows; write a collection's queue once it fills a batch."""
        for name, part in rows.items():
            parts = self.pending.setdefault(name, [])
            parts.append(part)
            if sum(len(p[0]) for p in parts) >= self.batch:
                self._write(name, parts)
                self.pending[name] = []

    def _write(self, name: str, parts: list[Part]) -> None:
        ids = [i for p in parts for i in p[0]]
        vectors = np.concatenate([p[1] for p in parts])
        documents = [d for p in parts for d in p[2]]
        metadatas = [m for p in parts for m in p[3]]
        collection = self.chroma.get_collection(name, embedding_function=None)
        for start in range(0, len(ids), self.batch):
            end = start + self.batch
            collection.upsert(
                ids=ids[start:end],
                embeddings=vectors[start:end],
                documents=documents[start:end],
                metadatas=metadatas[start:end],
            )
        self.vectors += len(ids)

    def close(self) -> None:
        for name, parts in self.pending.items():
            if parts:
                self._write(name, parts)
        self.pending.clear()
        self.chroma.close()


# -- the baseline pipeline ------------------------------------------------------------


class _Baseline:
    def __init__(self, env: Endpoint, config: LogConfig, work: Path, concurrency: int) -> None:
        self.env = env
        self.config = config
        self.work = work
        self.concurrency = concurrency
        self.chroma_threads = anyio.CapacityLimiter(os.cpu_count() or 1)
        self.announce_pk = f"baseline#{config.log}"
        self.uploaded = 0
        self.s3: Any = None
        self.db: Any = None

    async def produce(self, receipts: Sequence[ReceiptData]) -> None:
        queue = iter(receipts)

        async def worker() -> None:
            for data in queue:
                await self._produce_one(data)

        async with anyio.create_task_group() as tg:
            for _ in range(self.concurrency):
                tg.start_soon(worker)

    async def _produce_one(self, data: ReceiptData) -> None:
        blob = await anyio.to_thread.run_sync(
            _package, data, self.work, limiter=self.chroma_threads
        )
        receipt = data.receipt
        key = (
            f"{self.config.keys.prefix}baseline/{receipt.image_id}-{receipt.receipt_id:05d}.tar.gz"
        )
        await self.s3.put_object(Bucket=self.config.bucket, Key=key, Body=blob)
        await self.db.put_item(
            TableName=TABLE,
            Item={"pk": {"S": self.announce_pk}, "sk": {"S": key}, "size": {"N": str(len(blob))}},
        )
        self.uploaded += len(blob)

    async def _announced(self) -> list[str]:
        keys: list[str] = []
        kwargs: dict[str, Any] = {
            "TableName": TABLE,
            "KeyConditionExpression": "pk = :pk",
            "ExpressionAttributeValues": {":pk": {"S": self.announce_pk}},
        }
        while True:
            page = await self.db.query(**kwargs)
            keys += [item["sk"]["S"] for item in page.get("Items", [])]
            if "LastEvaluatedKey" not in page:
                return keys
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    async def compact(self, store: S3Store) -> int:
        keys = await self._announced()
        snapshot = _Snapshot(self.work / "snapshot")
        await anyio.to_thread.run_sync(snapshot.open, limiter=self.chroma_threads)
        send, receive = anyio.create_memory_object_stream[Rows](self.concurrency)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._fetch_all, keys, send)
            await self._apply_all(snapshot, receive)
        await anyio.to_thread.run_sync(snapshot.close, limiter=self.chroma_threads)
        published = await publish_snapshot(
            store,
            self.config.keys,
            snapshot.path,
            hwm=len(keys),
            token=1,
            counts={WORDS: 0, LINES: 0},
        )
        record = {"key": {"S": published.key}, "sha256": {"S": published.sha256}}
        await self.db.put_item(
            TableName=TABLE,
            Item={"pk": {"S": self.announce_pk}, "sk": {"S": "~snapshot"}, **record},
        )
        return snapshot.vectors

    async def _fetch_all(self, keys: list[str], send: MemoryObjectSendStream[Rows]) -> None:
        """Download and unpack deltas, ``concurrency`` at a time, in announcement order."""
        slots = anyio.Semaphore(self.concurrency)
        done: dict[int, Rows] = {}
        ready = anyio.Condition()

        async def fetch(i: int, key: str) -> None:
            async with slots:
                answer = await self.s3.get_object(Bucket=self.config.bucket, Key=key)
                async with answer["Body"] as body:
                    blob = await body.read()
                rows = await anyio.to_thread.run_sync(
                    _unpack, blob, self.work, limiter=self.chroma_threads
                )
            async with ready:
                done[i] = rows
                ready.notify_all()

        async with send, anyio.create_task_group() as tg:
            for i, key in enumerate(keys):
                tg.start_soon(fetch, i, key)
            for i in range(len(keys)):
                async with ready:
                    while i not in done:
                        await ready.wait()
                await send.send(done.pop(i))

    async def _apply_all(
        self, snapshot: _Snapshot, receive: MemoryObjectReceiveStream[Rows]
    ) -> None:
        async with receive:
            async for rows in receive:
                await anyio.to_thread.run_sync(snapshot.add, rows, limiter=self.chroma_threads)


async def _run_baseline(
    env: Endpoint, receipts: Sequence[ReceiptData], concurrency: int
) -> PipelineFigures:
    config = env.config("baseline")
    meter = CpuMeter(env.server_pid)
    with scratch_dir("baseline") as work, meter.measure():
        baseline = _Baseline(env, config, work, concurrency)
        async with AsyncExitStack() as stack:
            baseline.s3 = await client(stack, config, "s3")
            baseline.db = await client(stack, config, "dynamodb")
            store = await S3Store.connect(config)
            stack.push_async_callback(store.aclose)
            started = time.perf_counter()
            await baseline.produce(receipts)
            produced = time.perf_counter()
            vectors = await baseline.compact(store)
            compacted = time.perf_counter()
    times = (started, produced, compacted)
    return _figures("baseline", len(receipts), vectors, times, baseline.uploaded, meter)


async def _run_deltalog(
    env: Endpoint, sizes: Sizes, receipts: Sequence[ReceiptData], concurrency: int
) -> PipelineFigures:
    config = env.config("e2e")
    embedder = PrecomputedEmbedder(receipts, sizes.dim)
    meter = CpuMeter(env.server_pid)
    with scratch_dir("e2e") as cache, meter.measure():
        started = time.perf_counter()
        async with DeltaLog.open(config) as log:
            async with ReceiptProducer(log, embedder, concurrency=concurrency) as producer:
                await producer.add_many(r.receipt for r in receipts)
            produced = time.perf_counter()
            async with Compactor(config, cache_dir=cache) as compactor:
                result = await compactor.run_once()
            compacted = time.perf_counter()
            uploaded = sum([info.size async for _, info in list_entries(log.store, log.keys, 0)])
    times = (started, produced, compacted)
    return _figures("deltalog", len(receipts), result.vectors_upserted, times, uploaded, meter)


async def run_baseline(env: Endpoint, sizes: Sizes, receipts: Sequence[ReceiptData]) -> E2EFigures:
    concurrency = sizes.e2e_concurrency
    ours = await _run_deltalog(env, sizes, receipts, concurrency)
    progress(
        f"end to end, deltalog: {ours.receipts_per_s:.2f} receipts/s "
        f"(produce {ours.produce_seconds:.2f} s, compact {ours.compact_seconds:.2f} s)"
    )
    await env.reset()
    theirs = await _run_baseline(env, receipts, concurrency)
    progress(
        f"end to end, baseline: {theirs.receipts_per_s:.2f} receipts/s "
        f"(produce {theirs.produce_seconds:.2f} s, compact {theirs.compact_seconds:.2f} s)"
    )
    await env.reset()
    _vectors, raw = await raw_chroma_upsert(receipts)
    progress(f"end to end, raw chromadb upsert of the same records: {raw:.2f} s")
    speedup = ours.receipts_per_s / theirs.receipts_per_s if theirs.receipts_per_s else 0.0
    ceiling = theirs.seconds / raw if raw else 0.0
    return E2EFigures(
        concurrency, ours, theirs, round(speedup, 2), round(raw, 4), round(ceiling, 2)
    )
