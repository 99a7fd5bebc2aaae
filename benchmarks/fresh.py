"""Fresh reads: query latency with an uncompacted tail, against snapshot-only reads.

A log of ``fresh_snapshot_receipts`` receipts is compacted into a snapshot;
then receipts are appended (not compacted) until the tail holds each size in
``fresh_tails`` vectors. At each tail size a new ``Reader`` with
``consistency="fresh"`` opens (its **catch-up**: loading the snapshot and
folding the whole tail), and then it and a snapshot reader answer the same
queries in alternation, so that drift is shared:

- ``vector``: the 10 nearest words to a word vector (with a little noise);
- ``vector+where``: the same, among the words of the query's merchant.

Every call of either reader first reads the committed state (a DynamoDB
read); the fresh reader also lists the log after what it has folded and
reads the head, folds anything new, searches the overlay exactly and merges.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.compaction import append_receipts
from benchmarks.harness import Endpoint, Summary, progress, scratch_dir
from benchmarks.settings import Sizes
from benchmarks.workload import WORDS, ReceiptData, receipts
from compactor.runner import Compactor
from deltalog.config import LogConfig
from deltalog.reader import Reader

__all__ = ["FreshPoint", "run_fresh"]

KINDS = ("vector", "vector+where")


@dataclass(frozen=True, slots=True)
class FreshPoint:
    tail_target: int
    tail_vectors: int
    tail_entries: int
    snapshot_vectors: int
    catch_up_seconds: float
    """Opening a fresh reader: the snapshot, then the whole tail read and folded."""
    kind: str
    snapshot: Summary
    fresh: Summary
    p50_ratio: float
    """Fresh p50 / snapshot p50."""


def _queries(
    data: Sequence[ReceiptData], count: int, seed: int
) -> list[tuple[np.ndarray[Any, np.dtype[np.float32]], str]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        receipt = data[i % len(data)]
        row = receipt.word_vectors[int(rng.integers(len(receipt.word_vectors)))]
        noisy = row + rng.normal(0, 0.01, row.shape).astype(np.float32)
        merchant = receipt.receipt.merchant_name or "Costco Wholesale"
        out.append((noisy[None, :].astype(np.float32), merchant))
    return out


async def _timed_query(
    reader: Reader, vector: np.ndarray[Any, np.dtype[np.float32]], merchant: str, kind: str
) -> float:
    where = {"merchant_name": merchant} if kind == "vector+where" else None
    started = time.perf_counter()
    await reader.query(collection=WORDS, query_embeddings=vector, n_results=10, where=where)
    return time.perf_counter() - started


async def _tail_to(config: LogConfig, pool: list[ReceiptData], have: int, want: int) -> int:
    """Append receipts from ``pool`` until the tail holds at least ``want`` vectors."""
    batch: list[ReceiptData] = []
    while have + sum(r.vectors for r in batch) < want:
        batch.append(pool.pop())
    if batch:
        await append_receipts(config, batch, per_entry=4)
    return have + sum(r.vectors for r in batch)


async def _measure(
    config: LogConfig,
    snap: Reader,
    sizes: Sizes,
    data: Sequence[ReceiptData],
    cache: Any,
    target: int,
    tail: int,
) -> list[FreshPoint]:
    started = time.perf_counter()
    async with Reader.open(config, consistency="fresh", cache_dir=cache) as fresh:
        catch_up = time.perf_counter() - started
        stats = fresh.statistics()
        points = []
        for kind in KINDS:
            queries = _queries(data, sizes.fresh_queries + 1, seed=tail)
            timings: dict[str, list[float]] = {"snapshot": [], "fresh": []}
            for i, (vector, merchant) in enumerate(queries):
                for name, reader in (("snapshot", snap), ("fresh", fresh)):
                    took = await _timed_query(reader, vector, merchant, kind)
                    if i > 0:  # the first query of each builds caches
                        timings[name].append(took)
            snapshot, fresh_ = Summary.of(timings["snapshot"]), Summary.of(timings["fresh"])
            point = FreshPoint(
                tail_target=target,
                tail_vectors=tail,
                tail_entries=stats.tail_entries,
                snapshot_vectors=sum(r.vectors for r in data),
                catch_up_seconds=round(catch_up, 4),
                kind=kind,
                snapshot=snapshot,
                fresh=fresh_,
                p50_ratio=round(fresh_.p50_ms / snapshot.p50_ms, 2) if snapshot.p50_ms else 0.0,
            )
            points.append(point)
            progress(
                f"fresh tail={target:>6} {kind:12}: snapshot p50 {point.snapshot.p50_ms:6.1f} ms, "
                f"fresh p50 {point.fresh.p50_ms:6.1f} ms p99 {point.fresh.p99_ms:6.1f} ms "
                f"(catch-up {catch_up:.2f} s)"
            )
    return points


async def run_fresh(env: Endpoint, sizes: Sizes, seed: int) -> list[FreshPoint]:
    config = env.config("fresh")
    data = receipts(sizes.fresh_snapshot_receipts, seed=seed + 1, dim=sizes.dim)
    pool = receipts(max(sizes.fresh_tails) // 60 + 2, seed=seed + 2, dim=sizes.dim)
    await append_receipts(config, data, per_entry=4)
    points: list[FreshPoint] = []
    with scratch_dir("fresh") as cache:
        async with Compactor(config, cache_dir=cache / "compactor") as compactor:
            await compactor.run_once()
        async with Reader.open(config, consistency="snapshot", cache_dir=cache) as snap:
            have = 0
            for tail in sorted(sizes.fresh_tails):
                have = await _tail_to(config, pool, have, tail)
                points += await _measure(config, snap, sizes, data, cache, tail, have)
    await env.reset()
    return points
