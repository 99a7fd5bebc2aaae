"""Shards: what a shard costs against one index, and what splitting buys.

- **run growth** and **RSS growth**: a small log (one index of ``shard_base``
  vectors) and a log ten times larger on ten shards (each shard about the
  small log's size). Small runs (``shard_run_entries`` entries, ten times
  the vectors in the large log, so one shard applies what the small log
  does) compacted until the checkpoint policy publishes: the mean whole run
  of shard 0 against the small log's (``sharded_run_growth``); then
  ``deltalog compact --checkpoint`` with an empty cache in a child process,
  ``--shard 0`` on the large log: its peak RSS against the small log's
  (``sharded_rss_growth``).
- **apply CPU**: the same ``shard_vectors`` vectors in one index and on
  ``shard_count`` shards, each compacted by ``deltalog compact`` in a child
  process (every shard at once): CPU seconds of the child and of moto's
  server, per vector applied (``shard_apply_cpu``: shards / one index).
- **fan-out queries**: top-10 queries on those two logs through a snapshot
  ``Reader``: p50 latency (``fanout_query_vs_single``) and recall@10 of
  each against brute force over every vector.
- **parallel rebuild**: the one index rebuilt by one ``deltalog rebuild``
  process, and the shards by one ``deltalog rebuild --shard I`` process
  each, all at once (``parallel_rebuild_speedup``, with the cores there are).
- **scale point** (``shard_scale_vectors``, full sizes only): that many
  vectors on ``shard_count`` shards, each shard compacted from an empty
  cache by a ``deltalog compact --shard I`` process of its own, one per
  core at a time: each one's time and peak RSS (figures, no ratio).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import numpy as np

from benchmarks.child import DeltalogChild, Usage, run_child
from benchmarks.harness import Endpoint, Summary, process_cpu, progress, scratch_dir
from benchmarks.settings import Sizes
from benchmarks.workload import WORDS, append_each, unit_vectors, word_delta
from compactor.runner import Compactor
from deltalog.config import LogConfig
from deltalog.entry import Delta, Upsert
from deltalog.keys import Shard
from deltalog.log import DeltaLog
from deltalog.reader import Reader
from deltalog.shards import init_layout

__all__ = ["ScalePoint", "ShardFigures", "run_shards"]


@dataclass(frozen=True, slots=True)
class GrowthPoint:
    """Small runs of one index (``shards`` 1) or of shard 0 of ``shards`` shards."""

    shards: int
    vectors: int
    """Vectors in the log (all shards)."""
    runs: list[float]
    """Whole-run seconds of each small run, the policy's publish included."""
    published: bool
    """Whether the cycle ended with the policy's publish."""
    run_mean_seconds: float
    checkpoint_run_rss_mb: float
    """Peak RSS of ``compact --checkpoint`` (``--shard 0``) with an empty cache."""
    checkpoint_run_seconds: float


@dataclass(frozen=True, slots=True)
class LayoutPoint:
    """One layout of the same vectors: one index, or ``shards`` shards."""

    shards: int
    vectors: int
    compact_seconds: float
    child_cpu_seconds: float
    """The compacting process's CPU after its imports (all its threads)."""
    server_cpu_seconds: float
    cpu_us_per_vector: float
    """(child + moto CPU) per vector applied."""
    query: Summary
    recall_at_10: float
    rebuild_seconds: float
    """One rebuild process (one index), or one per shard at once (shards)."""


@dataclass(frozen=True, slots=True)
class ScalePoint:
    """A large log on ``shards`` shards, every shard compacted by a process of its own."""

    shards: int
    vectors: int
    append_seconds: float
    """Appending every vector (8 tasks, ``checkpoint_base_entry`` vectors an entry)."""
    seconds: float
    """The slowest shard's process (they run one per core at a time)."""
    shard_seconds: list[float]
    """Each shard's process, ready to exit (its first checkpoint published)."""
    shard_rss_mb: list[float]
    """Each shard's process's peak RSS."""


@dataclass(frozen=True, slots=True)
class ShardFigures:
    dim: int
    cores: int
    growth: list[GrowthPoint] = field(default_factory=list)
    layouts: list[LayoutPoint] = field(default_factory=list)
    scale: list[ScalePoint] = field(default_factory=list)

    @property
    def run_growth(self) -> float | None:
        return _ratio(self.growth, lambda p: p.run_mean_seconds)

    @property
    def rss_growth(self) -> float | None:
        return _ratio(self.growth, lambda p: p.checkpoint_run_rss_mb)

    @property
    def one(self) -> LayoutPoint | None:
        """The one index of the layout comparison."""
        return min(self.layouts, key=lambda p: p.shards) if self.layouts else None

    @property
    def sharded(self) -> LayoutPoint | None:
        """The shards of the layout comparison."""
        return max(self.layouts, key=lambda p: p.shards) if len(self.layouts) > 1 else None


def _ratio(points: list[GrowthPoint], figure: Callable[[GrowthPoint], float]) -> float | None:
    """``figure`` of the most shards over that of the fewest."""
    if len(points) < 2:
        return None
    small, large = min(points, key=lambda p: p.shards), max(points, key=lambda p: p.shards)
    below = figure(small)
    return round(figure(large) / below, 3) if below else None


def _where(config: LogConfig) -> list[str]:
    return [
        *("--bucket", config.bucket, "--table", config.table, "--log", config.log),
        *("--endpoint-url", config.endpoint_url or ""),
    ]


async def _new_log(env: Endpoint, prefix: str, shards: int) -> LogConfig:
    config = env.config(prefix)
    if shards > 1:
        async with DeltaLog.open(config) as log:
            await init_layout(log.table, log.keys, shards, now=time.time())
    return config


# -- run growth and RSS growth --------------------------------------------------------------


async def _growth(env: Endpoint, sizes: Sizes, shards: int, seed: int) -> GrowthPoint:
    """A log of ``shard_base * shards`` vectors on ``shards`` shards; shard 0's small runs."""
    rng = np.random.default_rng(seed)
    dim, vectors = sizes.shard_dim, sizes.shard_base * shards
    config = await _new_log(env, f"grow{shards}", shards)
    shard = Shard(1, 0, shards) if shards > 1 else None
    per = sizes.checkpoint_base_entry
    with scratch_dir("shard-growth") as cache:
        async with (
            DeltaLog.open(config) as log,
            Compactor(config, cache_dir=cache / "warm", grace=3600, shard=shard) as compactor,
        ):
            base = [
                word_delta(rng, min(per, vectors - start), dim, "Base")
                for start in range(0, vectors, per)
            ]
            await append_each(log, base, tasks=8)
            await compactor.run_once()
            runs: list[float] = []
            published = False
            low, high = sizes.checkpoint_runs
            while len(runs) < high and not (published and len(runs) >= low):
                small = [
                    word_delta(rng, sizes.checkpoint_new_vectors * shards, dim, "Costco")
                    for _ in range(sizes.shard_run_entries)
                ]
                await append_each(log, small)
                started = time.perf_counter()
                result = await compactor.run_once()
                runs.append(time.perf_counter() - started)
                published = published or bool(result.checkpoint)
            await append_each(log, [word_delta(rng, 4 * shards, dim, "Costco")])
            only = ["--shard", "0"] if shards > 1 else []
            argv = ["compact", "--checkpoint", "-q", *only, *_where(config)]
            usage = await run_child([*argv, "--cache-dir", str(cache / "rss")])
    point = GrowthPoint(
        shards,
        vectors,
        [round(r, 4) for r in runs],
        published,
        round(statistics.mean(runs), 4),
        usage.peak_rss_mb,
        usage.seconds,
    )
    progress(
        f"shards: growth x{shards}: {len(runs)} runs of shard 0, mean {point.run_mean_seconds:.2f}"
        f" s, --checkpoint peak RSS {point.checkpoint_run_rss_mb:.0f} MB"
    )
    return point


# -- one index against shards: apply CPU, queries, rebuild -------------------------------------


def _deltas(sizes: Sizes, seed: int) -> tuple[list[Delta], list[str], np.ndarray]:
    """The same deltas for both layouts; the ids and vectors, for brute force."""
    rng = np.random.default_rng(seed)
    per, total = sizes.checkpoint_base_entry, sizes.shard_vectors
    ids = [f"w{i:07d}" for i in range(total)]
    vectors = unit_vectors(rng, total, sizes.shard_dim)
    deltas = [
        Delta(
            ops=[
                Upsert(
                    WORDS,
                    ids[start : start + per],
                    vectors[start : start + per],
                    [f"doc {i}" for i in ids[start : start + per]],
                    [{"merchant_name": "Costco", "n": i} for i in range(start, start + per)],
                )
            ]
        )
        for start in range(0, total, per)
    ]
    return deltas, ids, vectors


async def _layout(
    env: Endpoint,
    sizes: Sizes,
    shards: int,
    deltas: list[Delta],
    ids: list[str],
    vectors: np.ndarray,
    queries: np.ndarray,
) -> LayoutPoint:
    config = await _new_log(env, f"layout{shards}", shards)
    async with DeltaLog.open(config) as log:
        await append_each(log, deltas, tasks=8)
    with scratch_dir("shard-layout") as cache:
        argv = ["compact", "-q", *_where(config), "--cache-dir", str(cache / "c")]
        async with DeltalogChild(argv) as child:  # CPU counted from ready: imports left out
            server, imported = process_cpu(env.server_pid), child.cpu_now()
            usage = await child.wait()
            server_cpu = process_cpu(env.server_pid) - server
        if usage.returncode:
            raise RuntimeError(f"deltalog {' '.join(argv)} exited with {usage.returncode}")
        compact_cpu = round(usage.cpu_seconds - imported, 3)
        latencies, recall = await _queries(config, cache, ids, vectors, queries)
        rebuild = await _rebuild(config, cache, shards)
    applied = len(ids)
    point = LayoutPoint(
        shards,
        applied,
        usage.seconds,
        compact_cpu,
        round(server_cpu, 3),
        round((compact_cpu + server_cpu) / applied * 1e6, 1),
        Summary.of(latencies),
        recall,
        rebuild,
    )
    progress(
        f"shards: {shards} shard(s) of {applied:,} vectors: compact {point.compact_seconds:.1f} s, "
        f"{point.cpu_us_per_vector:,.0f} CPU us/vector, query p50 {point.query.p50_ms:.1f} ms, "
        f"recall@10 {recall:.3f}, rebuild {rebuild:.1f} s"
    )
    return point


async def _queries(
    config: LogConfig, cache: object, ids: list[str], vectors: np.ndarray, queries: np.ndarray
) -> tuple[list[float], float]:
    """Top-10 query latencies through a snapshot reader, and recall@10 against brute force."""
    found_right = 0
    latencies: list[float] = []
    async with Reader.open(config, cache_dir=f"{cache}/reader") as reader:
        await reader.query(collection=WORDS, query_embeddings=queries[:1], n_results=10)  # warm
        for query in queries:
            started = time.perf_counter()
            got = await reader.query(collection=WORDS, query_embeddings=query[None], n_results=10)
            latencies.append(time.perf_counter() - started)
            distances = ((vectors - query) ** 2).sum(axis=1)
            exact = {ids[i] for i in np.argsort(distances)[:10]}
            found_right += len(exact & set(got["ids"][0]))
    return latencies, round(found_right / (10 * len(queries)), 4)


async def _rebuild(config: LogConfig, cache: object, shards: int) -> float:
    """Seconds to rebuild: one process, or one per shard started together (ready to last exit)."""
    argv = ["rebuild", "-q", *_where(config), "--cache-dir", f"{cache}/rebuild"]
    if shards == 1:
        return (await run_child(argv)).seconds
    children = [DeltalogChild([*argv, "--shard", str(i)]) for i in range(shards)]
    async with anyio.create_task_group() as tg:
        started: list[float] = []
        usages: list[Usage] = []

        async def one(child: DeltalogChild) -> None:
            async with child:
                started.append(anyio.current_time())
                usages.append(await child.wait())

        for child in children:
            tg.start_soon(one, child)
    if any(u.returncode for u in usages):
        raise RuntimeError(f"a shard rebuild failed: {[u.returncode for u in usages]}")
    ends = [s + u.seconds for s, u in zip(started, usages, strict=False)]
    return round(max(ends) - min(started), 3)


SCALE_LEASE_TTL = 180.0


async def _scale(env: Endpoint, sizes: Sizes, seed: int) -> ScalePoint:
    """``shard_scale_vectors`` on ``shard_count`` shards: one compact process per shard."""
    rng = np.random.default_rng(seed)
    shards, total, per = sizes.shard_count, sizes.shard_scale_vectors, sizes.checkpoint_base_entry
    config = await _new_log(env, "scale", shards)
    started = time.perf_counter()
    async with DeltaLog.open(config) as log:
        for start in range(0, total, 20 * per):  # in slices: the deltas of a slice in memory
            deltas = [
                word_delta(rng, min(per, total - at), sizes.shard_dim, "Base")
                for at in range(start, min(total, start + 20 * per), per)
            ]
            await append_each(log, deltas, tasks=8)
    appended = round(time.perf_counter() - started, 3)
    progress(f"shards: scale: {total:,} vectors appended in {appended:.0f} s")
    with scratch_dir("shard-scale") as cache:
        # A longer lease than the default 30 s: with the default, these compactors lost
        # their leases on 2 cores (every renewal timed out), see ``_all_at_once``.
        argv = ["compact", "-q", "--lease-ttl", str(SCALE_LEASE_TTL), *_where(config)]
        children = [
            DeltalogChild([*argv, "--shard", str(i), "--cache-dir", str(cache / f"s{i}")])
            for i in range(shards)
        ]
        usages = await _all_at_once(children, limit=os.cpu_count() or 1)
    if any(u.returncode for u in usages):
        raise RuntimeError(f"a shard's compaction failed: {[u.returncode for u in usages]}")
    point = ScalePoint(
        shards,
        total,
        appended,
        round(max(u.seconds for u in usages), 3),
        [round(u.seconds, 3) for u in usages],
        [u.peak_rss_mb for u in usages],
    )
    progress(
        f"shards: scale: {total:,} vectors on {shards} shards, one process each: "
        f"{point.seconds:.0f} s, shard seconds {min(point.shard_seconds):.0f}-"
        f"{max(point.shard_seconds):.0f}, peak RSS {min(point.shard_rss_mb):.0f}-"
        f"{max(point.shard_rss_mb):.0f} MB"
    )
    return point


async def _all_at_once(children: list[DeltalogChild], *, limit: int) -> list[Usage]:
    """Run the children, ``limit`` at a time; their usages, in order.

    One per core: eight compactors of a 500,000-vector log at once on 2
    cores, behind moto's one-request-at-a-time server, lost their leases
    (every renewal timed out; 7 of 8 at load average 6.7), and two at a
    time still did with the default 30 s lease (load average 7): hence
    also ``SCALE_LEASE_TTL``.
    """
    usages: list[Usage | None] = [None] * len(children)
    limiter = anyio.CapacityLimiter(limit)

    async def one(i: int) -> None:
        async with limiter, children[i] as child:
            usages[i] = await child.wait()

    async with anyio.create_task_group() as tg:
        for i in range(len(children)):
            tg.start_soon(one, i)
    return [u for u in usages if u is not None]


async def run_shards(env: Endpoint, sizes: Sizes, seed: int) -> ShardFigures:
    figures = ShardFigures(sizes.shard_dim, os.cpu_count() or 1)
    for shards in (1, 10):
        figures.growth.append(await _growth(env, sizes, shards, seed + shards))
        await env.reset()
    deltas, ids, vectors = _deltas(sizes, seed)
    rng = np.random.default_rng(seed + 99)
    queries = unit_vectors(rng, sizes.shard_queries, sizes.shard_dim)
    for shards in (1, sizes.shard_count):
        figures.layouts.append(await _layout(env, sizes, shards, deltas, ids, vectors, queries))
        await env.reset()
    if sizes.shard_scale_vectors:
        figures.scale.append(await _scale(env, sizes, seed + 7))
        await env.reset()
    return figures
