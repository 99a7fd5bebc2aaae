"""Checkpoints: what a small run costs as the snapshot grows, in bytes, seconds and memory.

For each size in ``checkpoint_bases`` a fresh log gets a **base** of that
many vectors (entries of ``checkpoint_base_entry`` vectors), which a first
run compacts and publishes as the checkpoint. Then, on that base:

- **runs**: ``incremental_new`` small entries (``checkpoint_new_vectors``
  vectors each) are appended and one ``run_once`` with the default policy
  compacts them, again and again until the policy publishes a checkpoint
  (a whole cycle: the runs that commit hwm alone and the one that pays the
  upload), within ``checkpoint_runs``. The S3 bytes each run writes are
  counted through a ``CountingStore``, the entry bytes through another one
  under the producer;
- **publish every run**: one more such run with ``checkpoint_ratio=0``,
  what deltalog did before checkpoints;
- **warm** and **cold**: one run on this host's live copy, then one by a
  compactor with an empty cache (it downloads the checkpoint and replays
  the committed tail);
- **raw chromadb**: one run's records upserted from memory into a copy of
  the checkpoint, Chroma's own cost of that apply at this size;
- **checkpoint run**: ``deltalog compact --checkpoint`` in a child process
  with an empty cache (download, replay, apply, archive and upload the
  whole snapshot): its wall time and its own peak RSS, beside the peak RSS
  of a child in which raw chromadb upserts as many vectors into a copy of
  the checkpoint (``benchmarks.chroma_child``).

``on_largest(store, keys, directory)`` is called with the largest base's
checkpoint, extracted, before its log is dropped (the compression table
measures it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.child import run_child
from benchmarks.chroma_child import raw_chroma_rss
from benchmarks.counting import CountingStore
from benchmarks.harness import (
    MB,
    Endpoint,
    SinkTimer,
    progress,
    raw_chroma_upsert_into,
    scratch_dir,
)
from benchmarks.settings import Sizes
from benchmarks.workload import append_each, word_delta
from compactor.checkpoint import DEFAULT_RATIO
from compactor.runner import CompactionResult, Compactor
from deltalog.config import LogConfig
from deltalog.entry import Delta, Upsert
from deltalog.keys import LogKeys
from deltalog.log import DeltaLog
from deltalog.storage.s3 import S3Store
from deltalog.storage.store import ObjectStore

__all__ = ["BasePoint", "CheckpointFigures", "RunSample", "run_checkpoints"]

OnLargest = Callable[[ObjectStore, LogKeys, Path], Awaitable[None]]
_MERCHANT = "Costco Wholesale"


@dataclass(frozen=True, slots=True)
class RunSample:
    """One small run: its wall time and what it wrote."""

    seconds: float
    entry_bytes: int
    """Stored bytes of the entries it applied."""
    written: int
    """S3 bytes the run wrote (a checkpoint archive, if it published one)."""
    checkpoint: str
    """Why it published a checkpoint, or ""."""
    working_copy: str
    replayed_tail: int
    chroma_open_seconds: float = 0.0
    """Of ``seconds``: opening the working copy with Chroma (timed through ``sink_factory``)."""
    apply_seconds: float = 0.0
    """Chroma's upserts."""
    chroma_close_seconds: float = 0.0
    """Closing it (Chroma persists its index), before the archive, if any."""


@dataclass(frozen=True, slots=True)
class BasePoint:
    vectors: int
    """Vectors in the base."""
    snapshot_mb: float
    """The base's checkpoint archive."""
    runs: list[RunSample]
    cycle_complete: bool
    """Whether the policy published within the runs (else the mean misses a publish)."""
    run_mean_seconds: float
    """Mean whole-run time over the runs: the publish amortized over its cycle."""
    run_median_seconds: float
    bytes_per_entry_byte: float
    """S3 bytes written by the runs / entry bytes they applied, default policy."""
    every_run_bytes_per_entry_byte: float
    """The same for one run with ``checkpoint_ratio=0`` (publish every run)."""
    every_run_seconds: float
    warm_seconds: float
    cold_seconds: float
    cold_replayed_tail: int
    checkpoint_run_seconds: float
    """``deltalog compact --checkpoint`` with an empty cache, in a child process."""
    checkpoint_run_rss_mb: float
    """Its peak RSS."""
    checkpoint_run_cpu_seconds: float
    raw_chroma_rss_mb: float
    """Peak RSS of a child in which raw chromadb upserts one run's worth of vectors into a copy
    of the checkpoint: Chroma's own floor under the checkpoint run's RSS."""
    raw_chroma_seconds: float
    """Raw chromadb upserting one run's records into a copy of the checkpoint: Chroma's own
    cost of a run's apply at this size (HNSW inserts get dearer as the index grows)."""


@dataclass(frozen=True, slots=True)
class CheckpointFigures:
    dim: int
    new_entries: int
    """Small entries per run."""
    new_vectors: int
    """Vectors per small entry."""
    checkpoint_ratio: float
    points: list[BasePoint] = field(default_factory=list)


class _Base:
    """One base log, its counting stores and its long-lived (warm) compactor."""

    def __init__(self, env: Endpoint, sizes: Sizes, vectors: int, cache: Path) -> None:
        self.env, self.sizes, self.vectors, self.cache = env, sizes, vectors, cache
        self.config: LogConfig = env.config(f"ckpt{vectors}")
        self.rng = np.random.default_rng(vectors)
        self.timer = SinkTimer()
        self.stack = AsyncExitStack()

    async def __aenter__(self) -> _Base:
        self.entries = CountingStore(await S3Store.connect(self.config))
        self.stack.push_async_callback(self.entries.aclose)
        self.written = CountingStore(await S3Store.connect(self.config))
        self.stack.push_async_callback(self.written.aclose)
        self.log = await self.stack.enter_async_context(
            DeltaLog.open(self.config, store=self.entries)
        )
        self.compactor = await self.stack.enter_async_context(self.new_compactor("warm"))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stack.aclose()

    def new_compactor(self, cache: str, *, ratio: float = DEFAULT_RATIO) -> Compactor:
        return Compactor(
            self.config,
            cache_dir=self.cache / cache,
            store=self.written,
            grace=3600,
            checkpoint_ratio=ratio,
            sink_factory=self.timer,
        )

    async def build(self) -> CompactionResult:
        per = self.sizes.checkpoint_base_entry
        deltas = [
            word_delta(self.rng, min(per, self.vectors - start), self.sizes.checkpoint_dim, "Base")
            for start in range(0, self.vectors, per)
        ]
        await append_each(self.log, deltas, tasks=8)
        return await self.compactor.run_once()

    def small_deltas(self) -> list[Delta]:
        s = self.sizes
        return [
            word_delta(self.rng, s.checkpoint_new_vectors, s.checkpoint_dim, _MERCHANT)
            for _ in range(s.incremental_new)
        ]

    async def committed(self) -> Path:
        """The committed checkpoint, extracted (in the warm compactor's cache)."""
        state = await self.compactor.table.read_state(self.config.keys.log_id)
        assert state.snapshot_key is not None and state.snapshot_sha256 is not None
        return await self.compactor.cache.committed(
            self.written, state.snapshot_key, state.snapshot_sha256, log=self.config.log
        )

    async def small_run(self, compactor: Compactor) -> RunSample:
        deltas = self.small_deltas()
        before = self.entries.statistics().bytes_written
        await append_each(self.log, deltas)
        entry_bytes = self.entries.statistics().bytes_written - before
        written = self.written.statistics().bytes_written
        sinks = len(self.timer.sinks)
        started = time.perf_counter()
        result = await compactor.run_once()
        seconds = time.perf_counter() - started
        if result.status != "applied":
            raise RuntimeError(f"a benchmark run applied nothing: {result.summary()}")
        opened, applied, closed = self.timer.since(sinks)
        return RunSample(
            round(seconds, 4),
            entry_bytes,
            self.written.statistics().bytes_written - written,
            result.checkpoint,
            result.working_copy,
            result.replayed_tail,
            round(opened, 4),
            round(applied, 4),
            round(closed, 4),
        )

    def location(self) -> list[str]:
        c = self.config
        return [
            *("--bucket", c.bucket, "--table", c.table, "--log", c.log),
            *("--endpoint-url", c.endpoint_url or ""),
        ]


def _per_entry_byte(samples: list[RunSample]) -> float:
    entry = sum(s.entry_bytes for s in samples)
    return round(sum(s.written for s in samples) / entry, 2) if entry else 0.0


async def _cycle(base: _Base) -> tuple[list[RunSample], bool]:
    """Small runs until the policy publishes (at least ``low``, at most ``high`` runs)."""
    low, high = base.sizes.checkpoint_runs
    runs: list[RunSample] = []
    published = False
    while len(runs) < high and not (published and len(runs) >= low):
        runs.append(await base.small_run(base.compactor))
        published = published or bool(runs[-1].checkpoint)
    return runs, published


async def _measure(base: _Base, on_largest: OnLargest | None) -> BasePoint:
    first = await base.build()
    progress(f"checkpoints: base of {base.vectors:,} vectors, {first.snapshot_size / MB:.1f} MB")
    runs, complete = await _cycle(base)
    ops = [op for d in base.small_deltas() for op in d.ops if isinstance(op, Upsert)]
    raw = await raw_chroma_upsert_into(await base.committed(), ops)
    raw_rss = await raw_chroma_rss(
        await base.committed(), sum(len(op.ids) for op in ops), base.sizes.checkpoint_dim
    )
    warm = await base.small_run(base.compactor)
    async with base.new_compactor("cold") as cold_compactor:
        cold = await base.small_run(cold_compactor)
    async with base.new_compactor("warm", ratio=0.0) as every_compactor:
        every = await base.small_run(every_compactor)
    await append_each(base.log, [word_delta(base.rng, 4, base.sizes.checkpoint_dim, _MERCHANT)])
    usage = await run_child(
        ["compact", "--checkpoint", "-q", *base.location(), "--cache-dir", str(base.cache / "rss")]
    )
    if on_largest is not None:
        await on_largest(base.written.inner, base.config.keys, await base.committed())
    seconds = [r.seconds for r in runs]
    return BasePoint(
        vectors=base.vectors,
        snapshot_mb=round(first.snapshot_size / MB, 2),
        runs=runs,
        cycle_complete=complete,
        run_mean_seconds=round(statistics.mean(seconds), 4),
        run_median_seconds=round(statistics.median(seconds), 4),
        bytes_per_entry_byte=_per_entry_byte(runs),
        every_run_bytes_per_entry_byte=_per_entry_byte([every]),
        every_run_seconds=every.seconds,
        warm_seconds=warm.seconds,
        cold_seconds=cold.seconds,
        cold_replayed_tail=cold.replayed_tail,
        checkpoint_run_seconds=usage.seconds,
        checkpoint_run_rss_mb=usage.peak_rss_mb,
        checkpoint_run_cpu_seconds=usage.cpu_seconds,
        raw_chroma_rss_mb=raw_rss,
        raw_chroma_seconds=round(raw, 4),
    )


async def run_checkpoints(
    env: Endpoint, sizes: Sizes, *, on_largest: OnLargest | None = None
) -> CheckpointFigures:
    figures = CheckpointFigures(
        sizes.checkpoint_dim, sizes.incremental_new, sizes.checkpoint_new_vectors, DEFAULT_RATIO
    )
    largest = max(sizes.checkpoint_bases)
    for vectors in sorted(sizes.checkpoint_bases):
        with scratch_dir("checkpoints") as cache:
            async with _Base(env, sizes, vectors, cache) as base:
                point = await _measure(base, on_largest if vectors == largest else None)
        figures.points.append(point)
        progress(
            f"checkpoints N={vectors:,}: {len(point.runs)} runs, mean {point.run_mean_seconds:.2f}"
            f" s, {point.bytes_per_entry_byte:.1f} B/B (every run: "
            f"{point.every_run_bytes_per_entry_byte:.1f}), warm {point.warm_seconds:.2f} s, cold "
            f"{point.cold_seconds:.2f} s, --checkpoint {point.checkpoint_run_seconds:.2f} s at "
            f"{point.checkpoint_run_rss_mb:.0f} MB"
        )
        await env.reset()
    return figures
