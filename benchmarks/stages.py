"""Where the time goes: CPU-seconds per vector of each stage of the pipeline.

The receipts go through the stages one at a time, each with the function
deltalog itself calls there, so each stage's CPU is measured alone:

- **encode**: ``DeltaLog.prepare`` (validate + msgspec encode) of every delta;
- **append**: group commit (``log.producer()``, ``e2e_concurrency`` tasks)
  of the same deltas, less the encode it repeats: claims, ``PutObject``,
  counter and botocore;
- **read**: ``log.read`` of every entry: list, GET, checksum, decode;
- **fold**: ``Folder`` of every entry into one plan;
- **apply**: ``ChromaSink.apply`` of the plan into an empty directory, and
  its close (Chroma's own threads are in this process, so they count);
- **publish**: ``publish_snapshot`` of that directory (archive + upload);
- **S3 stand-in**: the embedded moto server's CPU (a child process, read
  from ``/proc``) during append, read and publish.

CPU is user + system time of the whole process (every thread) over the
stage (``time.process_time``). Divided by the vectors, it says what each
stage would cost on a machine of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import anyio

from benchmarks.harness import CpuMeter, Endpoint, progress, scratch_dir
from benchmarks.settings import Sizes
from benchmarks.workload import ReceiptData
from compactor.publish import publish_snapshot
from deltalog.entry import Delta, Entry
from deltalog.fold import Folder, FoldPlan
from deltalog.log import DeltaLog
from deltalog.snapshot.sink import ChromaSink

__all__ = ["STAGES", "StageFigures", "StageRow", "run_stages"]

STAGES = ("encode", "append", "s3_standin", "read", "fold", "apply", "publish")


@dataclass(frozen=True, slots=True)
class StageRow:
    stage: str
    cpu_seconds_per_vector: float
    """Client CPU for every stage but ``s3_standin``, whose figure is the server's."""
    server_cpu_seconds_per_vector: float
    """The S3 stand-in's CPU during the stage."""
    wall_seconds: float


@dataclass(frozen=True, slots=True)
class StageFigures:
    receipts: int
    vectors: int
    rows: list[StageRow]

    def per_vector(self) -> dict[str, float]:
        """CPU-seconds per vector by stage."""
        return {row.stage: row.cpu_seconds_per_vector for row in self.rows}


async def _append(log: DeltaLog, deltas: Sequence[Delta], tasks: int) -> None:
    queue = iter(deltas)
    async with log.producer() as producer:

        async def worker() -> None:
            for delta in queue:
                await producer.submit(delta)

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(worker)


def _fold(entries: list[tuple[int, Entry]], name: str) -> FoldPlan:
    folder = Folder(log=name)
    for seq, entry in entries:
        folder.add(seq, entry)
    return folder.plan()


async def run_stages(env: Endpoint, sizes: Sizes, receipts: Sequence[ReceiptData]) -> StageFigures:
    config = env.config("stages")
    vectors = sum(r.vectors for r in receipts)
    meters = {stage: CpuMeter(env.server_pid) for stage in STAGES}
    async with DeltaLog.open(config) as log:
        deltas = [r.delta() for r in receipts]
        await log.prepare(deltas[0])  # one-time costs (the encoder's first use) stay out
        with meters["encode"].measure():
            for delta in deltas:
                await log.prepare(delta)
        with meters["append"].measure():
            await _append(log, [r.delta() for r in receipts], sizes.e2e_concurrency)
        with meters["read"].measure():
            entries = [item async for item in log.read()]
        with meters["fold"].measure():
            plan = _fold(entries, config.log)
        with scratch_dir("stages") as work:
            sink = await ChromaSink.open(work / "chroma", limiter=anyio.CapacityLimiter(1))
            with meters["apply"].measure():
                await sink.apply(plan)
                await sink.aclose()
            with meters["publish"].measure():
                await publish_snapshot(
                    log.store,
                    log.keys,
                    work / "chroma",
                    hwm=entries[-1][0],
                    token=1,
                    counts={},
                )
    await env.reset()
    return _figures(len(receipts), vectors, meters)


def _figures(receipts: int, vectors: int, meters: dict[str, CpuMeter]) -> StageFigures:
    server = sum(m.server for m in meters.values())
    rows = []
    for stage in STAGES:
        m = meters[stage]
        if stage == "s3_standin":
            wall = sum(m.wall for m in meters.values())
            rows.append(StageRow(stage, _per(server, vectors), _per(server, vectors), wall))
            continue
        client = m.client - meters["encode"].client if stage == "append" else m.client
        rows.append(
            StageRow(stage, _per(client, vectors), _per(m.server, vectors), round(m.wall, 4))
        )
    figures = StageFigures(receipts, vectors, rows)
    shown = ", ".join(f"{k} {v * 1e6:.0f}" for k, v in figures.per_vector().items())
    progress(f"stages, CPU microseconds per vector: {shown}")
    return figures


def _per(seconds: float, vectors: int) -> float:
    return round(max(seconds, 0.0) / vectors, 9) if vectors else 0.0
