"""The overlapped pipeline: producers and a following compactor at the same time.

``ReceiptProducer`` (``e2e_concurrency`` receipts at a time, group commit,
the benchmark's fixed embeddings) appends ``pipeline_receipts`` receipts
while ``deltalog compact --follow`` runs in a child process, as it would on
a host of its own (``--poll-min 0.05``), with the default checkpoint
policy. The clock starts once the follower is up (its imports done) and
stops when the committed hwm reaches the last appended seq: every vector is
then in a committed state that snapshot readers see (its checkpoint plus
the committed tail).

The figure is ``raw chromadb seconds / pipeline seconds``: raw chromadb
upserting the same records from memory, in batches of its maximum size, is
the sink's physical limit on this machine. CPU is reported per process:
this one (the producers), the follower and the S3 stand-in.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.child import DeltalogChild
from benchmarks.harness import CpuMeter, Endpoint, progress, raw_chroma_upsert, scratch_dir
from benchmarks.settings import Sizes
from benchmarks.workload import PrecomputedEmbedder, ReceiptData
from deltalog.log import DeltaLog
from deltalog.receipts.ingest import ReceiptProducer

__all__ = ["OverlapFigures", "run_pipeline"]

_POLL = 0.05
"""The follower's fastest poll (s)."""


@dataclass(frozen=True, slots=True)
class OverlapFigures:
    receipts: int
    vectors: int
    concurrency: int
    seconds: float
    """From the first append to the committed hwm reaching the last seq."""
    produce_seconds: float
    """Until the producers were done."""
    catch_up_seconds: float
    """From the producers' end to the last commit."""
    raw_chroma_seconds: float
    vs_raw_chroma: float
    """Raw chromadb seconds / pipeline seconds."""
    producer_cpu_seconds: float
    compactor_cpu_seconds: float
    """The follower's own CPU, imports excluded."""
    server_cpu_seconds: float
    compactor_peak_rss_mb: float
    runs: int
    """Runs of the follower that applied something."""
    checkpoints: int
    """Of which published a checkpoint."""
    replay_seconds: float
    """The runs' replay (read, fold, apply) seconds, added up; the rest of a run is its
    lease, working copy, publish and commit."""
    first_run_hwm: int
    """The seq the first run reached (every later run started from there)."""


async def run_pipeline(
    env: Endpoint, sizes: Sizes, receipts: Sequence[ReceiptData]
) -> OverlapFigures:
    config = env.config("pipeline")
    vectors = sum(r.vectors for r in receipts)
    embedder = PrecomputedEmbedder(receipts, sizes.dim)
    meter = CpuMeter(env.server_pid)
    with scratch_dir("pipeline") as cache:
        args = [
            *("compact", "--follow", "-q", "--json"),
            *("--bucket", config.bucket, "--table", config.table),
            *("--log", config.log, "--endpoint-url", config.endpoint_url or ""),
            *("--cache-dir", str(cache), "--poll-min", str(_POLL), "--poll-max", "0.2"),
        ]
        async with DeltaLog.open(config) as log, DeltalogChild(args) as child:
            before = child.cpu_now()
            with meter.measure():
                started = time.perf_counter()
                async with ReceiptProducer(
                    log, embedder, concurrency=sizes.e2e_concurrency
                ) as producer:
                    await producer.add_many(r.receipt for r in receipts)
                produced = time.perf_counter()
                head = await log.head()
                await child.result(lambda run: run.get("hwm_after", 0) >= head)
                done = time.perf_counter()
            follower = child.cpu_now() - before
            usage = await child.stop()
    await env.reset()
    _raw_vectors, raw = await raw_chroma_upsert(receipts)
    runs = [r for r in usage.results() if r.get("status") == "applied"]
    seconds = done - started
    figures = OverlapFigures(
        receipts=len(receipts),
        vectors=vectors,
        concurrency=sizes.e2e_concurrency,
        seconds=round(seconds, 4),
        produce_seconds=round(produced - started, 4),
        catch_up_seconds=round(done - produced, 4),
        raw_chroma_seconds=round(raw, 4),
        vs_raw_chroma=round(raw / seconds, 3) if seconds else 0.0,
        producer_cpu_seconds=round(meter.client, 3),
        compactor_cpu_seconds=round(follower, 3),
        server_cpu_seconds=round(meter.server, 3),
        compactor_peak_rss_mb=usage.peak_rss_mb,
        runs=len(runs),
        checkpoints=sum(1 for r in runs if r.get("checkpoint")),
        replay_seconds=round(sum(float(r.get("seconds", 0.0)) for r in runs), 3),
        first_run_hwm=int(runs[0].get("hwm_after", 0)) if runs else 0,
    )
    progress(
        f"pipeline: {vectors:,} vectors in {seconds:.2f} s (produce {figures.produce_seconds:.2f}"
        f" s, catch-up {figures.catch_up_seconds:.2f} s); raw chromadb {raw:.2f} s: "
        f"{figures.vs_raw_chroma:.2f}; {figures.runs} runs, {figures.checkpoints} checkpoints"
    )
    return figures
