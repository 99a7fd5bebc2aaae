"""Incremental cost: compacting 100 new entries as the log grows to N entries.

One log grows through the sizes in ``incremental_n``. At each N the log
holds N compacted entries (small upserts of ``incremental_vectors`` words
each, appended one entry per delta by concurrent tasks); then, ``repeats``
times, 100 new entries are appended and one ``run_once`` compacts them.

Per N (medians over the repeats):

- **replay**: list after hwm, fetch, decode, verify, fold, apply: the figure
  that must not grow with N. Split into its **apply** part (Chroma, timed
  through the compactor's ``sink_factory`` seam) and the rest, **read +
  fold**, which does not touch the snapshot at all;
- **raw chromadb**: the same new records upserted from memory into a copy of
  the same snapshot, Chroma's own cost at that size (HNSW inserts get
  dearer as the index grows);
- **whole run**: adds the working copy (a copy of the committed snapshot)
  and the publish (archive + upload of the whole snapshot), which grow with
  the snapshot by design: every run publishes a complete snapshot.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

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
from compactor.runner import Compactor
from deltalog.entry import Delta, Upsert
from deltalog.log import DeltaLog

__all__ = ["IncrementalPoint", "run_incremental"]


@dataclass(frozen=True, slots=True)
class IncrementalPoint:
    n: int
    """Compacted entries in the log before the new ones."""
    new_entries: int
    vectors: int
    """Vectors in the new entries."""
    replay_seconds: float
    apply_seconds: float
    """The part of the replay spent in Chroma."""
    read_fold_seconds: float
    """The rest of the replay: list, fetch, decode, verify, fold."""
    raw_chroma_seconds: float
    """Raw chromadb upserting the same records into a copy of the same snapshot."""
    run_seconds: float
    snapshot_mb: float
    replay_samples: list[float] = field(default_factory=list)
    run_samples: list[float] = field(default_factory=list)


def _deltas(count: int, sizes: Sizes, seed: int) -> list[Delta]:
    rng = np.random.default_rng(seed)
    return [
        word_delta(rng, sizes.incremental_vectors, sizes.dim, "Costco Wholesale")
        for _ in range(count)
    ]


@dataclass(slots=True)
class _Samples:
    replay: list[float] = field(default_factory=list)
    apply: list[float] = field(default_factory=list)
    run: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    snapshot: int = 0


async def _measure_once(
    log: DeltaLog, compactor: Compactor, timer: SinkTimer, deltas: list[Delta], out: _Samples
) -> None:
    """Append ``deltas``, compact them (timed), then time raw chromadb on the same snapshot."""
    state = await compactor.table.read_state(log.keys.log_id)
    assert state.snapshot_key is not None and state.snapshot_sha256 is not None
    base = await compactor.cache.committed(
        compactor.store, state.snapshot_key, state.snapshot_sha256, log=log.config.log
    )
    await append_each(log, deltas)
    started = time.perf_counter()
    result = await compactor.run_once()
    out.run.append(time.perf_counter() - started)
    out.replay.append(result.seconds)
    out.apply.append(timer.last_apply_seconds())
    out.snapshot = result.snapshot_size
    if not out.raw:  # once per N: it costs a copy of the snapshot
        ops = [op for d in deltas for op in d.ops if isinstance(op, Upsert)]
        out.raw.append(await raw_chroma_upsert_into(base, ops))


def _point(n: int, sizes: Sizes, s: _Samples) -> IncrementalPoint:
    replay, apply = statistics.median(s.replay), statistics.median(s.apply)
    rest = [r - a for r, a in zip(s.replay, s.apply, strict=True)]
    return IncrementalPoint(
        n=n,
        new_entries=sizes.incremental_new,
        vectors=sizes.incremental_new * sizes.incremental_vectors,
        replay_seconds=round(replay, 4),
        apply_seconds=round(apply, 4),
        read_fold_seconds=round(statistics.median(rest), 4),
        raw_chroma_seconds=round(statistics.median(s.raw), 4),
        run_seconds=round(statistics.median(s.run), 4),
        snapshot_mb=round(s.snapshot / MB, 2),
        replay_samples=[round(x, 4) for x in s.replay],
        run_samples=[round(x, 4) for x in s.run],
    )


async def run_incremental(env: Endpoint, sizes: Sizes) -> list[IncrementalPoint]:
    config = env.config("incremental")
    points: list[IncrementalPoint] = []
    timer = SinkTimer()
    held = 0
    with scratch_dir("incremental") as cache:
        async with (
            DeltaLog.open(config) as log,
            Compactor(config, cache_dir=cache, sink_factory=timer) as compactor,
        ):
            for n in sorted(sizes.incremental_n):
                if n > held:
                    progress(f"incremental: growing the log to {n} entries")
                    await append_each(log, _deltas(n - held, sizes, seed=n))
                    await compactor.run_once()
                    held = n
                samples = _Samples()
                for repeat in range(sizes.incremental_repeats):
                    deltas = _deltas(sizes.incremental_new, sizes, seed=n * 1000 + repeat + 1)
                    await _measure_once(log, compactor, timer, deltas, samples)
                    held += sizes.incremental_new
                point = _point(n, sizes, samples)
                points.append(point)
                progress(
                    f"incremental N={n}: replay {point.replay_seconds:.3f} s (apply "
                    f"{point.apply_seconds:.3f}, read+fold {point.read_fold_seconds:.3f}; raw "
                    f"chromadb {point.raw_chroma_seconds:.3f}), whole run {point.run_seconds:.3f} s"
                )
    await env.reset()
    return points
