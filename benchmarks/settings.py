"""How big each benchmark is in each mode: ``full``, ``quick`` (< 5 min on 2 cores), ``smoke``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DIM", "MODES", "Mode", "Sizes", "sizes_for"]

Mode = Literal["full", "quick", "smoke"]
MODES: tuple[Mode, ...] = ("full", "quick", "smoke")

DIM = 1536
"""OpenAI ``text-embedding-3-small``: what production embeds."""


@dataclass(frozen=True, slots=True)
class Sizes:
    """The parameters of one run; recorded in the results."""

    mode: Mode
    concurrency: tuple[int, ...]
    """Producer tasks for the append grid."""
    cell_seconds: float
    """How long each append cell submits (it then drains what is in flight)."""
    rounds: int
    """Rounds of the three append cells at each concurrency (their figures add up)."""
    proxy_cell_seconds: float
    proxy_rounds: int
    compaction_receipts: int
    receipts_per_entry: int
    """Group commit's deltas per entry in the compaction log (``max_deltas``)."""
    proxy_compaction_receipts: int
    incremental_n: tuple[int, ...]
    """Entries already compacted when 100 new ones are compacted."""
    incremental_new: int
    incremental_vectors: int
    """Vectors per entry in the incremental log."""
    incremental_repeats: int
    codec_receipts: int
    codec_repeats: int
    fresh_snapshot_receipts: int
    fresh_tails: tuple[int, ...]
    """Vectors appended after the snapshot (0 = snapshot only)."""
    fresh_queries: int
    baseline_receipts: int
    e2e_concurrency: int
    embed_receipts: int
    """Receipts whose word and line inputs the offline embedders embed."""
    embed_repeats: int
    checkpoint_bases: tuple[int, ...] = (1_000, 10_000)
    """Vectors in each base log of the checkpoint benchmark; the last is 10x the first."""
    checkpoint_base_entry: int = 250
    """Vectors per entry when a base is built."""
    checkpoint_new_vectors: int = 4
    """Vectors per small entry of a run (``incremental_new`` entries per run)."""
    checkpoint_runs: tuple[int, int] = (3, 12)
    """Runs on each base: at least the first, at most the second, until the policy publishes."""
    checkpoint_dim: int = 384
    compression_levels: tuple[int, ...] = (1, 3, 9, 19)
    """zstd levels measured against ``none`` on the largest base's checkpoint."""
    stage_receipts: int = 16
    """Receipts the per-stage CPU profile pushes through each stage in turn."""
    pipeline_receipts: int = 128
    """Receipts the overlapped pipeline (producers + ``compact --follow``) ingests."""
    shard_base: int = 500
    """Vectors of the small log of the shard growth figures (and of each of ten shards)."""
    shard_run_entries: int = 20
    """Small entries per run in the shard growth figures."""
    shard_vectors: int = 4_000
    """Vectors of the one index and of the shards compared (apply CPU, queries, rebuild)."""
    shard_count: int = 8
    shard_queries: int = 40
    shard_dim: int = 384
    shard_scale_vectors: int = 0
    """Vectors of the scale point (``shard_count`` shards, a process each); 0: not run."""
    freshness_seconds: float = 60.0
    """How long producers submit at a steady rate in the freshness benchmark."""
    freshness_load: float = 0.7
    """Their rate, as a share of the drain rate measured first."""
    freshness_warmup: int = 4
    """Receipts of the burst that makes the freshness log's first checkpoint."""
    freshness_calibration: int = 32
    """Receipts of the burst whose time to a committed hwm gives the drain rate."""
    freshness_base: int = 30_000
    """Vectors the freshness log holds before the producers start (entries of
    ``checkpoint_base_entry``): a log with a history, whose checkpoint a minute of
    steady load grows by a fraction, as in production. From an empty log every run
    would publish (each run's entries pass the ratio of a checkpoint that small)."""
    freshness_dim: int = 384
    """The freshness receipts' vector size: a minute of steady load at 1536 dims grows the
    log (and so every checkpoint the policy publishes) past what this benchmark's 2 cores
    publish in time; the checkpoint benchmark's 384 keeps the run about Chroma's apply."""
    recall_receipts: int = 200
    """Receipts whose WordLlama word vectors the recall benchmark indexes."""
    recall_builds: int = 4
    """Builds of each kind in the recall benchmark (builds differ run to run)."""
    recall_near_queries: int = 200
    """Queries near stored vectors in the recall benchmark (besides the typed ones)."""
    proxy_low_ms: float = 20.0
    proxy_high_ms: float = 100.0
    dim: int = DIM


_FULL = Sizes(
    mode="full",
    concurrency=(1, 8, 64, 256),
    cell_seconds=2.0,
    rounds=3,
    proxy_cell_seconds=2.0,
    proxy_rounds=2,
    compaction_receipts=200,
    receipts_per_entry=4,
    proxy_compaction_receipts=200,
    incremental_n=(100, 1_000, 10_000),
    incremental_new=100,
    incremental_vectors=4,
    incremental_repeats=3,
    codec_receipts=64,
    codec_repeats=5,
    fresh_snapshot_receipts=100,
    fresh_tails=(0, 1_000, 10_000),
    fresh_queries=200,
    baseline_receipts=100,
    e2e_concurrency=8,
    embed_receipts=200,
    embed_repeats=3,
    checkpoint_bases=(10_000, 30_000, 100_000),
    checkpoint_base_entry=500,
    checkpoint_runs=(3, 60),
    stage_receipts=64,
    shard_base=10_000,
    shard_vectors=100_000,
    shard_queries=200,
    shard_scale_vectors=500_000,
    pipeline_receipts=256,
    freshness_seconds=120.0,
    freshness_calibration=64,
    freshness_base=100_000,
)

_QUICK = Sizes(
    mode="quick",
    concurrency=(1, 8, 64, 256),
    cell_seconds=0.6,
    rounds=2,
    proxy_cell_seconds=0.5,
    proxy_rounds=1,
    compaction_receipts=32,
    receipts_per_entry=4,
    proxy_compaction_receipts=32,
    incremental_n=(100, 300, 1_000),
    incremental_new=100,
    incremental_vectors=2,
    incremental_repeats=2,
    codec_receipts=8,
    codec_repeats=2,
    fresh_snapshot_receipts=20,
    fresh_tails=(0, 1_000, 10_000),
    fresh_queries=20,
    baseline_receipts=16,
    e2e_concurrency=8,
    embed_receipts=50,
    embed_repeats=2,
    checkpoint_runs=(2, 12),
    compression_levels=(1, 3, 9),
    recall_receipts=120,
    recall_builds=2,
    recall_near_queries=100,
)

_SMOKE = Sizes(
    mode="smoke",
    concurrency=(1, 8, 64),
    cell_seconds=0.2,
    rounds=1,
    proxy_cell_seconds=0.2,
    proxy_rounds=1,
    compaction_receipts=4,
    receipts_per_entry=2,
    proxy_compaction_receipts=4,
    incremental_n=(5, 10),
    incremental_new=5,
    incremental_vectors=2,
    incremental_repeats=1,
    codec_receipts=2,
    codec_repeats=1,
    fresh_snapshot_receipts=2,
    fresh_tails=(0, 100),
    fresh_queries=4,
    baseline_receipts=3,
    e2e_concurrency=2,
    embed_receipts=5,
    embed_repeats=1,
    checkpoint_bases=(100, 1_000),
    checkpoint_base_entry=100,
    checkpoint_new_vectors=50,
    checkpoint_runs=(2, 6),
    checkpoint_dim=64,
    compression_levels=(1, 3),
    stage_receipts=3,
    pipeline_receipts=4,
    shard_base=100,
    shard_run_entries=4,
    shard_vectors=400,
    shard_count=2,
    shard_queries=5,
    shard_dim=64,
    freshness_seconds=4.0,
    freshness_warmup=1,
    freshness_calibration=2,
    freshness_base=200,
    freshness_dim=64,
    recall_receipts=6,
    recall_builds=1,
    recall_near_queries=10,
    dim=64,
)


def sizes_for(mode: Mode) -> Sizes:
    return {"full": _FULL, "quick": _QUICK, "smoke": _SMOKE}[mode]
