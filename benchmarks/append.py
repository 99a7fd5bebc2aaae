"""Append throughput: deltalog against raw ``PutObject`` at the same concurrency.

For each workload (``receipt``: one receipt per delta, ~100 vectors, ~0.6 MiB;
``label``: one label update per delta, a few hundred bytes) and each number
of concurrent tasks, three cells, measured back to back on one endpoint:

- ``raw_put``: each task puts objects of exactly the size of one delta's
  entry (plain ``PutObject``, botocore's default CRC32 checksum), one after
  another: the store's limit at that concurrency;
- ``group_off``: each task calls ``DeltaLog.append``: one entry per delta
  (reserve a seq in DynamoDB, then a conditional put);
- ``group_on``: each task calls ``Producer.submit``: group commit shares
  entries between concurrent deltas (linger 5 ms, up to 8 MiB per entry).

A cell submits for ``cell_seconds`` and then waits for what is in flight;
latency is from call to acknowledgement. Each concurrency runs ``rounds``
rounds of the three cells, each round in a rotated order, and each cell's
figures add up its rounds: drift on a shared machine hits all three alike.
Through the latency proxy the same grid shows how concurrency and group
commit hide 20-100 ms requests.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

from benchmarks.harness import MB, CpuMeter, Endpoint, Run, Summary, drive, progress
from benchmarks.settings import Sizes
from benchmarks.workload import ReceiptData, label_delta
from deltalog.codec import Frame, batch_body, encode_delta
from deltalog.config import LogConfig
from deltalog.entry import Delta
from deltalog.log import DeltaLog
from deltalog.producer import Producer
from deltalog.storage.aws import client

__all__ = ["AppendCell", "Workload", "run_append"]

Workload = Literal["receipt", "label"]
Path = Literal["direct", "proxy"]
Mode = Literal["raw_put", "group_off", "group_on"]
MODES: tuple[Mode, ...] = ("raw_put", "group_off", "group_on")


@dataclass(frozen=True, slots=True)
class AppendCell:
    workload: Workload
    path: Path
    mode: Mode
    tasks: int
    ops: int
    """Deltas appended (objects put, for ``raw_put``)."""
    seconds: float
    deltas_per_s: float
    mb_per_s: float
    """Delta bytes (object bytes for ``raw_put``) per second, 10^6 bytes per MB."""
    vectors_per_s: float
    latency: Summary
    entries: int
    """Objects written: one per op except with group commit."""
    deltas_per_entry: float
    client_cpu: float
    """Share of one core the benchmark process used."""
    server_cpu: float
    """Share of one core moto's server used."""


@dataclass(frozen=True, slots=True)
class _Source:
    """Deltas to append, and the bytes of each one's entry for the raw puts."""

    make: Callable[[int], Delta]
    sizes: list[int]
    """Encoded delta bytes of ``make(i)`` for ``i`` modulo the pool size."""
    objects: list[bytes]
    vectors: int
    """Vectors per delta, on average."""

    def size(self, i: int) -> int:
        return self.sizes[i % len(self.sizes)]


def _source(workload: Workload, pool: Sequence[ReceiptData]) -> _Source:
    if workload == "receipt":

        def make(i: int) -> Delta:
            return pool[i % len(pool)].delta()

        vectors = sum(r.vectors for r in pool) / len(pool)
    else:

        def make(i: int) -> Delta:
            return label_delta(pool[i % len(pool)], i)

        vectors = 0.0
    encoded = [encode_delta(make(i)) for i in range(len(pool))]
    objects = [
        Frame(batch_body("0" * 32, [e], producer_id="benchmark", created_at=time.time())).at(1)
        for e in encoded
    ]
    return _Source(make, [len(e) for e in encoded], objects, round(vectors))


@dataclass(slots=True)
class _Totals:
    """One mode's cells at one concurrency, over the rounds."""

    ops: int = 0
    seconds: float = 0.0
    bytes: int = 0
    entries: int = 0
    latencies: list[float] = field(default_factory=list)
    client_cpu: float = 0.0
    server_cpu: float = 0.0

    def add(self, run: Run, meter: CpuMeter, nbytes: int, entries: int) -> None:
        self.ops += run.ops
        self.seconds += run.seconds
        self.bytes += nbytes
        self.entries += entries
        self.latencies += run.latencies
        self.client_cpu += meter.client
        self.server_cpu += meter.server

    def cell(self, key: tuple[Workload, Path, Mode, int], vectors: int) -> AppendCell:
        workload, path, mode, tasks = key
        rate = self.ops / self.seconds
        return AppendCell(
            workload=workload,
            path=path,
            mode=mode,
            tasks=tasks,
            ops=self.ops,
            seconds=round(self.seconds, 4),
            deltas_per_s=round(rate, 1),
            mb_per_s=round(self.bytes / MB / self.seconds, 4),
            vectors_per_s=round(rate * vectors, 1) if mode != "raw_put" else 0.0,
            latency=Summary.of(self.latencies),
            entries=self.entries,
            deltas_per_entry=round(self.ops / self.entries, 2) if self.entries else 0.0,
            client_cpu=round(self.client_cpu / self.seconds, 2),
            server_cpu=round(self.server_cpu / self.seconds, 2),
        )


def _submitter(producer: Producer, source: _Source) -> Callable[[int], Awaitable[None]]:
    async def submit(i: int) -> None:
        await producer.submit(source.make(i))

    return submit


class _Grid:
    """One workload's cells on one path (direct or proxied)."""

    def __init__(
        self, env: Endpoint, log: DeltaLog, s3: Any, source: _Source, config: LogConfig
    ) -> None:
        self.env = env
        self.log = log
        self.s3 = s3
        self.source = source
        self.config = config

    async def raw_put(self, i: int) -> None:
        body = self.source.objects[i % len(self.source.objects)]
        key = f"raw/{self.config.log}/{i}"
        await self.s3.put_object(Bucket=self.config.bucket, Key=key, Body=body)

    async def append(self, i: int) -> None:
        await self.log.append(self.source.make(i))

    async def warm_up(self, tasks: int) -> None:
        """Open the connection pools before anything is timed."""
        await drive(tasks, 0.05, self.raw_put)
        await drive(tasks, 0.05, self.append)

    async def measure(self, mode: Mode, tasks: int, seconds: float, totals: _Totals) -> None:
        meter = CpuMeter(self.env.server_pid)
        if mode == "group_on":
            async with self.log.producer() as producer:
                with meter.measure():
                    run = await drive(tasks, seconds, _submitter(producer, self.source))
            entries = producer.statistics().entries_written
        else:
            op = self.raw_put if mode == "raw_put" else self.append
            with meter.measure():
                run = await drive(tasks, seconds, op)
            entries = run.ops
        if mode == "raw_put":
            objects = self.source.objects
            nbytes = sum(len(objects[i % len(objects)]) for i in range(run.ops))
        else:
            nbytes = sum(self.source.size(i) for i in range(run.ops))
        totals.add(run, meter, nbytes, entries)


async def _grid(
    env: Endpoint,
    sizes: Sizes,
    workload: Workload,
    pool: Sequence[ReceiptData],
    *,
    proxied: bool,
) -> list[AppendCell]:
    source = _source(workload, pool)
    config = env.config(f"append-{workload}", proxied=proxied)
    seconds = sizes.proxy_cell_seconds if proxied else sizes.cell_seconds
    rounds = sizes.proxy_rounds if proxied else sizes.rounds
    path: Path = "proxy" if proxied else "direct"
    cells: list[AppendCell] = []
    async with AsyncExitStack() as stack:
        log = await stack.enter_async_context(DeltaLog.open(config))
        grid = _Grid(env, log, await client(stack, config, "s3"), source, config)
        await grid.warm_up(min(64, max(sizes.concurrency)))
        for tasks in sizes.concurrency:
            totals = {mode: _Totals() for mode in MODES}
            for n in range(rounds):
                for mode in MODES[n % 3 :] + MODES[: n % 3]:  # each round starts elsewhere
                    await grid.measure(mode, tasks, seconds, totals[mode])
            for mode in MODES:
                cell = totals[mode].cell((workload, path, mode, tasks), source.vectors)
                cells.append(cell)
                progress(
                    f"append {workload:7} {path:6} {mode:9} x{tasks:<3}: "
                    f"{cell.deltas_per_s:8.1f}/s {cell.mb_per_s:7.2f} MB/s "
                    f"p50 {cell.latency.p50_ms:7.1f} ms p99 {cell.latency.p99_ms:7.1f} ms "
                    f"cpu {cell.client_cpu:.2f}+{cell.server_cpu:.2f}"
                )
    return cells


async def run_append(
    env: Endpoint, sizes: Sizes, pool: Sequence[ReceiptData], *, proxied: bool
) -> list[AppendCell]:
    """The whole grid for both workloads, directly or through the latency proxy."""
    cells: list[AppendCell] = []
    for workload in ("receipt", "label"):
        cells += await _grid(env, sizes, workload, pool, proxied=proxied)
        await env.reset()
    return cells
