"""What every benchmark shares: the endpoint, fresh logs, timing, and the machine.

- ``Endpoint``: moto's S3 + DynamoDB server in a child process (an in-process
  server would share the GIL and distort every figure), the benchmark bucket
  and table, and optionally the latency proxy in front of it.
- ``drive``: N concurrent tasks repeating one operation for a while, then
  draining what is in flight; returns ops, seconds and latencies.
- ``raw_chroma_upsert``: the physical limit of the sink, chromadb upserting
  records from memory in batches of its maximum size.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio
import numpy as np

from benchmarks.latency_proxy import LatencyProxy
from benchmarks.procstat import process_cpu
from benchmarks.workload import LINES, WORDS, ReceiptData
from deltalog.config import LogConfig
from deltalog.entry import Upsert
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.endpoint import FAKE_CREDENTIALS, EmbeddedEndpoint
from deltalog.storage.s3 import S3Store

if TYPE_CHECKING:
    from chromadb.api.types import Metadata as ChromaMetadata

    from deltalog.fold import FoldPlan, Record
    from deltalog.snapshot.sink import ApplyStats, ChromaSink, Sink

__all__ = [
    "CpuMeter",
    "Endpoint",
    "Run",
    "SinkTimer",
    "Summary",
    "TimedSink",
    "best_of",
    "drive",
    "load_average",
    "machine_info",
    "percentile",
    "process_cpu",
    "progress",
    "raw_chroma_upsert",
    "raw_chroma_upsert_into",
    "scratch_dir",
]

BUCKET = "deltalog-bench"
TABLE = "deltalog-bench"
MB = 1_000_000


def best_of(repeats: int, call: Callable[[], Any]) -> tuple[float, Any]:
    """The shortest of ``repeats`` timed calls (at least one), and the last call's result."""
    best, result = float("inf"), None
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - started)
    return best, result


def progress(message: str) -> None:
    """One line on stderr, so a long run shows where it is."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Endpoint:
    """moto in a child process, the bucket and table, and the latency proxy once asked for."""

    def __init__(self, *, low_ms: float, high_ms: float) -> None:
        self._stack = ExitStack()
        self._server = EmbeddedEndpoint()
        self._low_ms, self._high_ms = low_ms, high_ms
        self._proxy: LatencyProxy | None = None
        self.url = ""

    async def __aenter__(self) -> Endpoint:
        os.environ.update(FAKE_CREDENTIALS)
        os.environ.pop("AWS_PROFILE", None)
        self.url = self._stack.enter_context(self._server).url
        await self.ensure_bucket(BUCKET)
        table = await DynamoTable.connect(self.config("init"))
        try:
            await table.ensure_table()
        finally:
            await table.aclose()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stack.close()

    async def reset(self) -> None:
        """Forget everything stored (moto keeps objects in memory, and lists slow down)."""
        await anyio.to_thread.run_sync(self._server.reset)
        await self.ensure_bucket(BUCKET)
        table = await DynamoTable.connect(self.config("init"))
        try:
            await table.ensure_table()
        finally:
            await table.aclose()

    @property
    def server_pid(self) -> int | None:
        process = self._server._process
        return process.pid if process is not None else None

    @property
    def proxy_url(self) -> str:
        """The latency proxy in front of moto, started on first use."""
        if self._proxy is None:
            proxy = LatencyProxy(self.url, low_ms=self._low_ms, high_ms=self._high_ms)
            self._proxy = self._stack.enter_context(proxy)
        return self._proxy.url

    def config(
        self, prefix: str, *, bucket: str = BUCKET, proxied: bool = False, **kwargs: Any
    ) -> LogConfig:
        """A fresh log (a new name) on the endpoint, or through the proxy."""
        url = self.proxy_url if proxied else self.url
        log = f"{prefix}-{uuid.uuid4().hex[:8]}"
        return LogConfig(bucket=bucket, table=TABLE, log=log, endpoint_url=url, **kwargs)

    async def ensure_bucket(self, bucket: str) -> None:
        store = await S3Store.connect(LogConfig(bucket=bucket, table=TABLE, endpoint_url=self.url))
        try:
            await store.ensure_bucket()
        finally:
            await store.aclose()


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


@dataclass(frozen=True, slots=True)
class Summary:
    """Latencies in milliseconds."""

    p50_ms: float
    p99_ms: float
    mean_ms: float
    samples: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Summary:
        ms = [s * 1000 for s in seconds]
        mean = float(np.mean(ms)) if ms else 0.0
        return cls(
            round(percentile(ms, 50), 2), round(percentile(ms, 99), 2), round(mean, 2), len(ms)
        )


@dataclass(slots=True)
class Run:
    """What ``drive`` measured."""

    ops: int
    seconds: float
    latencies: list[float] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


async def drive(tasks: int, seconds: float, op: Callable[[int], Awaitable[None]]) -> Run:
    """``tasks`` tasks call ``op(i)`` (``i`` unique) until ``seconds`` pass, then drain.

    Throughput counts every op over the time until the last one finished, so
    the ops still in flight at the deadline are paid for, not dropped. Every
    task makes at least one call, so a cell is never empty, even when a loaded
    machine starts a task after the deadline.
    """
    counter = itertools.count()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while True:
            started = time.perf_counter()
            await op(next(counter))
            latencies.append(time.perf_counter() - started)
            if time.perf_counter() >= deadline:
                return

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)
    return Run(len(latencies), time.perf_counter() - started, latencies)


@dataclass(slots=True)
class CpuMeter:
    """CPU used by this process and by the endpoint's server while it was running.

    Read as a share of one core over the wall time: a process near 1.0 is
    the bottleneck (Python runs one thread at a time).
    """

    server_pid: int | None
    wall: float = 0.0
    client: float = 0.0
    server: float = 0.0

    @contextmanager
    def measure(self) -> Iterator[CpuMeter]:
        wall, client = time.perf_counter(), time.process_time()
        server = process_cpu(self.server_pid)
        try:
            yield self
        finally:
            self.wall = time.perf_counter() - wall
            self.client = time.process_time() - client
            self.server = process_cpu(self.server_pid) - server

    @property
    def client_share(self) -> float:
        return round(self.client / self.wall, 2) if self.wall > 0 else 0.0

    @property
    def server_share(self) -> float:
        return round(self.server / self.wall, 2) if self.wall > 0 else 0.0


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"deltalog-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class TimedSink:
    """A ``ChromaSink`` that adds up the seconds its ``apply`` calls take.

    Passed to ``Compactor`` through its ``sink_factory`` seam, it splits a
    replay into the sink's part (Chroma) and the rest (list, fetch, decode,
    verify, fold), which run one after the other for small runs.
    """

    def __init__(self, inner: ChromaSink) -> None:
        self.inner = inner
        self.apply_seconds = 0.0
        self.open_seconds = 0.0
        self.close_seconds = 0.0

    @classmethod
    async def open(cls, path: Path) -> TimedSink:
        from deltalog.snapshot.sink import ChromaSink

        started = time.perf_counter()
        sink = cls(await ChromaSink.open(path, limiter=anyio.CapacityLimiter(1)))
        sink.open_seconds = time.perf_counter() - started
        return sink

    async def apply(self, plan: FoldPlan) -> ApplyStats:
        started = time.perf_counter()
        try:
            return await self.inner.apply(plan)
        finally:
            self.apply_seconds += time.perf_counter() - started

    async def counts(self) -> dict[str, int]:
        return await self.inner.counts()

    async def records(self, collection: str) -> list[Record]:
        return await self.inner.records(collection)

    async def collections(self) -> list[str]:
        return await self.inner.collections()

    async def aclose(self) -> None:
        started = time.perf_counter()
        try:
            await self.inner.aclose()
        finally:
            self.close_seconds += time.perf_counter() - started


class SinkTimer:
    """A ``sink_factory`` for ``Compactor`` that keeps the ``TimedSink`` of each run."""

    def __init__(self) -> None:
        self.sinks: list[TimedSink] = []

    async def __call__(self, path: Path) -> Sink:
        sink = await TimedSink.open(path)
        self.sinks.append(sink)
        return sink

    def last_apply_seconds(self) -> float:
        return self.sinks[-1].apply_seconds if self.sinks else 0.0

    def since(self, count: int) -> tuple[float, float, float]:
        """Open, apply and close seconds of the sinks opened after the first ``count``."""
        mine = self.sinks[count:]
        return (
            sum(s.open_seconds for s in mine),
            sum(s.apply_seconds for s in mine),
            sum(s.close_seconds for s in mine),
        )


def _chroma_client(path: Path) -> Any:
    import chromadb
    from chromadb.config import Settings

    return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))


def _upsert_all(path: Path, receipts: Sequence[ReceiptData]) -> tuple[int, float]:
    client = _chroma_client(path)
    try:
        batch = int(client.get_max_batch_size())
        collections = {
            name: client.get_or_create_collection(name, embedding_function=None)
            for name in (WORDS, LINES)
        }
        rows = {
            WORDS: [(r.words, r.word_vectors) for r in receipts],
            LINES: [(r.lines, r.line_vectors) for r in receipts],
        }
        started = time.perf_counter()
        vectors = 0
        for name, parts in rows.items():
            ids = [i for records, _ in parts for i in records.ids]
            docs = [d for records, _ in parts for d in records.documents]
            metas = [m for records, _ in parts for m in records.metadatas]
            matrix = np.concatenate([v for _, v in parts])
            for start in range(0, len(ids), batch):
                end = start + batch
                collections[name].upsert(
                    ids=ids[start:end],
                    embeddings=matrix[start:end],
                    documents=docs[start:end],
                    metadatas=cast("list[ChromaMetadata]", metas[start:end]),
                )
            vectors += len(ids)
        return vectors, time.perf_counter() - started
    finally:
        client.close()


async def raw_chroma_upsert(receipts: Sequence[ReceiptData]) -> tuple[int, float]:
    """Upsert every record of ``receipts`` into a new Chroma directory: (vectors, seconds).

    Batches of Chroma's maximum size, from memory; only the upserts are timed.
    """
    with scratch_dir("raw-chroma") as path:
        return await anyio.to_thread.run_sync(_upsert_all, path / "chroma", receipts)


def _upsert_ops(path: Path, ops: Sequence[Upsert]) -> float:
    client = _chroma_client(path)
    try:
        batch = int(client.get_max_batch_size())
        collections = {
            name: client.get_or_create_collection(name, embedding_function=None)
            for name in {op.collection for op in ops}
        }
        started = time.perf_counter()
        for name, collection in collections.items():
            mine = [op for op in ops if op.collection == name]
            ids = [i for op in mine for i in op.ids]
            none: list[None] = [None] * max(len(op.ids) for op in mine)
            docs: list[str | None] = [
                d for op in mine for d in (op.documents or none[: len(op.ids)])
            ]
            metas: list[Any] = [m for op in mine for m in (op.metadatas or none[: len(op.ids)])]
            matrix = np.concatenate([op.embeddings for op in mine])
            for start in range(0, len(ids), batch):
                end = start + batch
                collection.upsert(
                    ids=ids[start:end],
                    embeddings=matrix[start:end],
                    documents=cast("list[str]", docs[start:end]),
                    metadatas=cast("list[ChromaMetadata]", metas[start:end]),
                )
        return time.perf_counter() - started
    finally:
        client.close()


def _copy_and_upsert(base: Path, ops: Sequence[Upsert]) -> float:
    with scratch_dir("raw-into") as path:
        shutil.copytree(base, path / "chroma")
        return _upsert_ops(path / "chroma", ops)


async def raw_chroma_upsert_into(base: Path, ops: Sequence[Upsert]) -> float:
    """Seconds chromadb takes to upsert ``ops`` into a copy of the directory ``base``.

    The limit for an incremental run: the same records into the same
    snapshot, from memory; only the upserts are timed.
    """
    return await anyio.to_thread.run_sync(_copy_and_upsert, base, ops)


_PACKAGES = (
    "deltalog",
    "chromadb",
    "moto",
    "aioboto3",
    "aiobotocore",
    "botocore",
    "numpy",
    "msgspec",
    "anyio",
    "matplotlib",
    "wordllama",
)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """Cores, CPU, memory, OS, Python, package versions and the load when the run started."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cores": os.cpu_count() or 0,
        "usable_cores": usable,
        "cpu": _cpu_model(),
        "memory_gb": _memory_gb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "load_average_at_start": load_average(),
    }
