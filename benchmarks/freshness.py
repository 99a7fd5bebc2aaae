"""Freshness: how long until a receipt is searchable, with producers at a steady rate.

``deltalog compact --follow`` runs in a child process (as in the overlapped
pipeline, ``--poll-min 0.05``, the default checkpoint policy). Then:

1. **drain rate**: a base of ``freshness_base`` vectors and a burst of
   ``freshness_warmup`` receipts (the log's first checkpoint), then a burst
   of ``freshness_calibration`` receipts appended at once; the drain rate is
   its vectors over the time from its first submit until the committed hwm
   reached its last seq;
2. **steady load**: receipts are submitted at ``freshness_load`` (70 %) of
   that rate, evenly spaced, for ``freshness_seconds``, each by its own task
   through one ``ReceiptProducer``. For each receipt the benchmark records
   when ``add`` resolved (its entry is in the log), and when a snapshot
   reader (``consistency="snapshot"``) and a fresh reader first return its
   first word (both poll by ids for the receipts not
   yet seen, every ``_READ_POLL`` seconds): the **snapshot visibility** and
   **fresh visibility** latencies, measured from the resolve;
3. the follower's runs (its ``--json`` lines) give the mean run time at that
   load and each run's **wake-up latency**: from when the first entry it
   applied was written (or the previous run ended, if later) to its start.

``freshness_p99_vs_run`` = p99 snapshot visibility / mean run time. A
follower that wakes at once and keeps up shows a receipt within two runs:
it arrives during a run, waits for it to end, then for the next run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from benchmarks.child import DeltalogChild
from benchmarks.harness import Endpoint, percentile, progress, scratch_dir
from benchmarks.settings import Sizes
from benchmarks.workload import (
    WORDS,
    PrecomputedEmbedder,
    ReceiptData,
    append_each,
    receipts,
    word_delta,
)
from deltalog.config import LogConfig
from deltalog.log import DeltaLog
from deltalog.reader import Consistency, Reader
from deltalog.receipts.ingest import ReceiptProducer

__all__ = ["FreshnessFigures", "Latencies", "run_freshness"]

_POLL = 0.05
"""The follower's fastest poll (s)."""
_READ_POLL = 0.2
"""The readers' poll (s): a fresh reader folds every new entry and rebuilds its view of
the tail when it changed, so polling faster would take the follower's CPU."""


@dataclass(frozen=True, slots=True)
class Latencies:
    """Milliseconds."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    samples: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latencies:
        ms = [s * 1000 for s in seconds]
        return cls(
            round(percentile(ms, 50), 1),
            round(percentile(ms, 95), 1),
            round(percentile(ms, 99), 1),
            round(max(ms, default=0.0), 1),
            len(ms),
        )


@dataclass(frozen=True, slots=True)
class Sample:
    """One receipt: seconds from the steady phase's start."""

    submitted: float
    resolved: float
    snapshot_visible: float | None
    fresh_visible: float | None
    seq: int


@dataclass(frozen=True, slots=True)
class RunPoint:
    """One run of the follower: seconds from the steady phase's start."""

    started: float
    seconds: float
    entries: int
    vectors: int
    checkpoint: str
    warm_sink: bool
    wake_seconds: float | None
    hwm_after: int = 0


@dataclass(frozen=True, slots=True)
class FreshnessFigures:
    seconds: float
    """The steady phase: how long producers submitted."""
    drain_vectors_per_s: float
    """The calibration burst's vectors over its time to a committed hwm."""
    load: float
    offered_vectors_per_s: float
    receipts: int
    vectors: int
    submit: Latencies
    """From a receipt's scheduled submit to ``add`` resolving (its entry written)."""
    snapshot_visibility: Latencies
    """From ``add`` resolving to a snapshot reader returning the receipt."""
    fresh_visibility: Latencies
    wake_up: Latencies
    """From a run's first new entry (or the previous run's end, if later) to its start."""
    runs: int
    run_mean_seconds: float
    checkpoints: int
    warm_runs: int
    """Runs that reused the index held open since the run before."""
    p99_vs_run: float
    """p99 snapshot visibility / mean run seconds."""
    lag_at_end: int
    """Entries not yet committed when the producers stopped."""
    slowest: Attribution | None = None
    """Where the slowest 5 % of the snapshot visibility latencies went."""
    reader_loads: list[tuple[float, float]] = field(default_factory=list)
    """The snapshot reader's polls that loaded a new checkpoint: (start, seconds)."""
    samples: list[Sample] = field(default_factory=list)
    run_points: list[RunPoint] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Attribution:
    """The slowest 5 % of the snapshot visibility latencies (at or above p95), split.

    ``commit_wait``: from the resolve to the end of the run that committed the
    receipt's seq; ``reader_wait``: from there to the snapshot reader returning it
    (its poll interval, and any checkpoint it was loading meanwhile).
    """

    samples: int
    commit_wait_ms: float
    reader_wait_ms: float
    by_checkpoint_run: int
    """Committed by a run that published a checkpoint."""
    after_reopen: int
    """Committed by a run that reopened the live copy (no warm sink), or waited behind one."""
    reader_loading: int
    """Seen by a reader poll that loaded a new checkpoint."""


class _Watcher:
    """A reader polling for the receipts it has not seen yet (by their first word's id)."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.pending: dict[str, float] = {}
        """First word id -> the time it was submitted (perf_counter)."""
        self.seen: dict[str, float] = {}
        self.loads: list[tuple[float, float]] = []
        """Polls that loaded a new checkpoint: (start, seconds), perf_counter."""

    def expect(self, word_id: str) -> None:
        self.pending[word_id] = time.perf_counter()

    async def poll(self, stop: anyio.Event) -> None:
        while not (stop.is_set() and not self.pending):
            if self.pending:
                wanted = list(self.pending)
                loads, began = self.reader.statistics().snapshot_loads, time.perf_counter()
                got = await self.reader.get(collection=WORDS, ids=wanted)
                now = time.perf_counter()
                if self.reader.statistics().snapshot_loads != loads:
                    self.loads.append((began, now - began))
                for found in got["ids"]:
                    if self.pending.pop(found, None) is not None:
                        self.seen[found] = now
            await anyio.sleep(_READ_POLL)


async def _base(log: DeltaLog, sizes: Sizes) -> None:
    """``freshness_base`` vectors in entries of ``checkpoint_base_entry``."""
    rng = np.random.default_rng(sizes.freshness_base)
    per, total = sizes.checkpoint_base_entry, sizes.freshness_base
    deltas = [
        word_delta(rng, min(per, total - start), sizes.freshness_dim, "Base")
        for start in range(0, total, per)
    ]
    await append_each(log, deltas, tasks=8)


async def _burst(
    producer: ReceiptProducer, child: DeltalogChild, log: DeltaLog, batch: Sequence[ReceiptData]
) -> float:
    """Submit ``batch`` at once; seconds until the committed hwm reaches its last seq."""
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for data in batch:
            tg.start_soon(producer.add, data.receipt)
    head = await log.head()
    await child.result(lambda run: run.get("hwm_after", 0) >= head)
    return time.perf_counter() - started


async def _steady(
    producer: ReceiptProducer,
    pool: Sequence[ReceiptData],
    rate: float,
    seconds: float,
    watchers: Sequence[_Watcher],
) -> list[tuple[ReceiptData, float, float, int]]:
    """Receipts at ``rate`` per second for ``seconds``: (data, submitted, resolved, seq)."""
    done: list[tuple[ReceiptData, float, float, int]] = []
    start = time.perf_counter()

    async def one(data: ReceiptData, at: float) -> None:
        added = await producer.add(data.receipt)
        resolved = time.perf_counter()
        for watcher in watchers:
            watcher.expect(data.words.ids[0])
        done.append((data, at, resolved, added.seq))

    async with anyio.create_task_group() as tg:
        for i, data in enumerate(pool):
            at = start + i / rate
            if at - start >= seconds:
                break
            await anyio.sleep(max(0.0, at - time.perf_counter()))
            tg.start_soon(one, data, at)
    return done


async def run_freshness(env: Endpoint, sizes: Sizes, seed: int) -> FreshnessFigures:
    """The freshness benchmark on a new log; see the module docstring."""
    config = env.config("freshness")
    warmup = receipts(sizes.freshness_warmup, seed=seed + 50, dim=sizes.freshness_dim)
    calibration = receipts(sizes.freshness_calibration, seed=seed + 51, dim=sizes.freshness_dim)
    with scratch_dir("freshness") as cache:
        args = [
            *("compact", "--follow", "-q", "--json"),
            *("--bucket", config.bucket, "--table", config.table),
            *("--log", config.log, "--endpoint-url", config.endpoint_url or ""),
            *("--cache-dir", str(cache / "follower"), "--poll-min", str(_POLL)),
            *("--poll-max", "0.2"),
        ]
        async with DeltaLog.open(config) as log, DeltalogChild(args) as child:
            await _base(log, sizes)
            embedder = PrecomputedEmbedder([*warmup, *calibration], sizes.freshness_dim)
            async with ReceiptProducer(log, embedder, concurrency=sizes.e2e_concurrency) as p:
                await _burst(p, child, log, warmup)
                drain_seconds = await _burst(p, child, log, calibration)
            drain = sum(r.vectors for r in calibration) / drain_seconds
            per_receipt = sum(r.vectors for r in calibration) / len(calibration)
            rate = sizes.freshness_load * drain / per_receipt
            count = int(rate * sizes.freshness_seconds) + 1
            pool = receipts(count, seed=seed + 52, dim=sizes.freshness_dim)
            progress(
                f"freshness: drain {drain:,.0f} vectors/s; {rate:.2f} receipts/s for "
                f"{sizes.freshness_seconds:g} s ({count} receipts)"
            )
            measured = await _measure(sizes, config, log, child, pool, rate, cache)
            usage = await child.stop()
    await env.reset()
    return _figures(sizes, rate, drain, measured, _runs(usage.results(), measured.wall_start))


@dataclass(slots=True)
class _Measured:
    """What the steady phase saw, before the follower's runs are known."""

    wall_start: float
    start: float
    produced: float
    lag: int
    done: list[tuple[ReceiptData, float, float, int]]
    watchers: dict[Consistency, _Watcher]


async def _measure(
    sizes: Sizes,
    config: LogConfig,
    log: DeltaLog,
    child: DeltalogChild,
    pool: Sequence[ReceiptData],
    rate: float,
    cache: Path,
) -> _Measured:
    kinds: tuple[Consistency, ...] = ("snapshot", "fresh")
    async with (
        Reader.open(config, consistency="snapshot", cache_dir=cache / "snapshot") as snap,
        Reader.open(config, consistency="fresh", cache_dir=cache / "fresh") as fresh,
        anyio.create_task_group() as outer,
    ):
        outer.start_soon(child.drain)  # its --json lines, read as they come
        watchers = dict(zip(kinds, (_Watcher(snap), _Watcher(fresh)), strict=True))
        stop = anyio.Event()
        wall_start, start = time.time(), time.perf_counter()
        with anyio.fail_after(sizes.freshness_seconds + 300):
            async with anyio.create_task_group() as tg:
                for watcher in watchers.values():
                    tg.start_soon(watcher.poll, stop)
                embedder = PrecomputedEmbedder(pool, sizes.freshness_dim)
                async with ReceiptProducer(
                    log, embedder, concurrency=sizes.e2e_concurrency
                ) as producer:
                    done = await _steady(
                        producer, pool, rate, sizes.freshness_seconds, list(watchers.values())
                    )
                produced = time.perf_counter() - start
                lag = await log.head() - (await log.table.read_state(log.keys.log_id)).hwm
                stop.set()  # the watchers end once every receipt was seen
        outer.cancel_scope.cancel()
    return _Measured(wall_start, start, produced, lag, done, watchers)


def _runs(results: list[dict[str, Any]], wall_start: float) -> list[dict[str, Any]]:
    return [
        r
        for r in results
        if r.get("status") == "applied" and float(r.get("started_at", 0.0)) >= wall_start
    ]


def _figures(
    sizes: Sizes, rate: float, drain: float, m: _Measured, runs: list[dict[str, Any]]
) -> FreshnessFigures:
    start, done, watchers, produced = m.start, m.done, m.watchers, m.produced
    samples = sorted(
        (
            Sample(
                round(at - start, 4),
                round(resolved - start, 4),
                _since(watchers["snapshot"].seen.get(data.words.ids[0]), start),
                _since(watchers["fresh"].seen.get(data.words.ids[0]), start),
                seq,
            )
            for data, at, resolved, seq in done
        ),
        key=lambda s: s.submitted,
    )
    points = _run_points(runs, samples, start)
    mean_run = sum(r.seconds for r in points) / len(points) if points else 0.0
    snapshot = Latencies.of(
        [s.snapshot_visible - s.resolved for s in samples if s.snapshot_visible is not None]
    )
    vectors = sum(data.vectors for data, *_ in done)
    figures = FreshnessFigures(
        seconds=round(produced, 3),
        drain_vectors_per_s=round(drain, 1),
        load=sizes.freshness_load,
        offered_vectors_per_s=round(vectors / produced, 1) if produced else 0.0,
        receipts=len(done),
        vectors=vectors,
        submit=Latencies.of([s.resolved - s.submitted for s in samples]),
        snapshot_visibility=snapshot,
        fresh_visibility=Latencies.of(
            [s.fresh_visible - s.resolved for s in samples if s.fresh_visible is not None]
        ),
        wake_up=Latencies.of([r.wake_seconds for r in points if r.wake_seconds is not None]),
        runs=len(points),
        run_mean_seconds=round(mean_run, 4),
        checkpoints=sum(1 for r in points if r.checkpoint),
        warm_runs=sum(1 for r in points if r.warm_sink),
        p99_vs_run=round(snapshot.p99_ms / 1000 / mean_run, 3) if mean_run else 0.0,
        lag_at_end=m.lag,
        slowest=_attribution(samples, points, snapshot.p95_ms, watchers["snapshot"].loads, start),
        reader_loads=[(round(at - start, 4), round(s, 4)) for at, s in watchers["snapshot"].loads],
        samples=samples,
        run_points=points,
    )
    progress(
        f"freshness: {figures.receipts} receipts at {figures.offered_vectors_per_s:,.0f} "
        f"vectors/s; snapshot visibility p50/p99 {snapshot.p50_ms:,.0f}/{snapshot.p99_ms:,.0f} "
        f"ms, {figures.runs} runs of {mean_run:.2f} s: {figures.p99_vs_run:.2f}"
    )
    return figures


def _since(value: float | None, start: float) -> float | None:
    return None if value is None else round(value - start, 4)


def _run_points(runs: list[dict[str, Any]], samples: list[Sample], start: float) -> list[RunPoint]:
    """Each run, with its wake-up latency from the entries' write times (the resolves)."""
    offset = time.time() - time.perf_counter()  # wall clock -> perf_counter, now
    written: dict[int, float] = {}
    for s in samples:
        written[s.seq] = min(written.get(s.seq, s.resolved), s.resolved)
    points: list[RunPoint] = []
    ended: float | None = None
    for run in sorted(runs, key=lambda r: float(r["started_at"])):
        began = float(run["started_at"]) - offset - start
        first = written.get(int(run["hwm_before"]) + 1)
        wake = None
        if first is not None:
            wake = max(0.0, began - max(first, ended if ended is not None else first))
        seconds = float(run.get("run_seconds", 0.0))
        points.append(
            RunPoint(
                round(began, 4),
                round(seconds, 4),
                int(run["hwm_after"]) - int(run["hwm_before"]),
                int(run.get("vectors_upserted", 0)),
                str(run.get("checkpoint", "")),
                bool(run.get("warm_sink", False)),
                None if wake is None else round(wake, 4),
                int(run["hwm_after"]),
            )
        )
        ended = began + seconds
    return points


def _attribution(
    samples: list[Sample],
    points: list[RunPoint],
    p95_ms: float,
    loads: list[tuple[float, float]],
    start: float,
) -> Attribution | None:
    """Split the slowest snapshot latencies into the wait for a commit and the reader's."""
    slow = [
        s
        for s in samples
        if s.snapshot_visible is not None and (s.snapshot_visible - s.resolved) * 1000 >= p95_ms
    ]
    if not slow or not points:
        return None
    spans = [(at - start, at - start + took) for at, took in loads]
    commit, reader, by_checkpoint, reopened, loading = 0.0, 0.0, 0, 0, 0
    for s in slow:
        assert s.snapshot_visible is not None
        i = next((i for i, r in enumerate(points) if r.hwm_after >= s.seq), None)
        if i is None:
            continue
        run = points[i]
        ended = run.started + run.seconds
        commit += max(0.0, ended - s.resolved)
        reader += max(0.0, s.snapshot_visible - ended)
        by_checkpoint += bool(run.checkpoint)
        before = [r for r in points[:i] if r.started + r.seconds > s.resolved]
        reopened += any(not r.warm_sink for r in (run, *before))
        loading += any(a <= s.snapshot_visible <= b + 0.001 for a, b in spans)
    n = len(slow)
    return Attribution(
        n,
        round(commit / n * 1000, 1),
        round(reader / n * 1000, 1),
        by_checkpoint,
        reopened,
        loading,
    )
