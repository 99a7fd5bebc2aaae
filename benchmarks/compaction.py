"""Compaction and rebuild against the sink's limit: raw chromadb upserts of the same vectors.

One log of receipts (group commit, ``receipts_per_entry`` receipts per
entry), then, back to back:

1. raw chromadb: upsert every record from memory in max-size batches;
2. ``Compactor.run_once``: its replay (list, fetch, decode, verify, fold,
   apply) in vectors/s, and the whole run (lease, working copy, replay,
   publish, commit) in seconds;
3. publish alone: archive the committed snapshot directory and upload it
   (``publish_snapshot``, the function the run uses), in MB/s;
4. raw chromadb again;
5. ``rounds`` times: ``Compactor.rebuild`` (replay from seq 1 into an empty
   directory), then raw chromadb again. Rebuild's figure is the median
   round; raw chromadb's pools every raw run, so drift during the section
   falls on both sides alike.

Through the latency proxy the compaction runs again on its own log (raw
chromadb needs no network and is not repeated).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import anyio

from benchmarks.harness import MB, CpuMeter, Endpoint, progress, raw_chroma_upsert, scratch_dir
from benchmarks.settings import Sizes
from benchmarks.workload import ReceiptData
from compactor.publish import publish_snapshot
from compactor.runner import Compactor
from deltalog.config import LogConfig
from deltalog.log import DeltaLog

__all__ = ["CompactionFigures", "RawChroma", "append_receipts", "run_compaction"]


@dataclass(frozen=True, slots=True)
class RawChroma:
    vectors: int
    seconds: float
    vectors_per_s: float


@dataclass(frozen=True, slots=True)
class CompactionFigures:
    path: Literal["direct", "proxy"]
    receipts: int
    entries: int
    vectors: int
    entry_mb: float
    raw_chroma: list[RawChroma]
    raw_vectors_per_s: float
    """All raw chromadb runs together: vectors / seconds."""
    replay_seconds: float
    replay_vectors_per_s: float
    run_seconds: float
    """The whole ``run_once``: lease, working copy, replay, publish, commit, release."""
    client_cpu: float
    server_cpu: float
    publish_seconds: float = 0.0
    snapshot_mb: float = 0.0
    publish_mb_per_s: float = 0.0
    rebuild_seconds: float = 0.0
    rebuild_vectors_per_s: float = 0.0


async def append_receipts(
    config: LogConfig, receipts: Sequence[ReceiptData], *, per_entry: int
) -> int:
    """Append one delta per receipt through group commit, ``per_entry`` per entry; bytes."""
    async with DeltaLog.open(config) as log, log.producer(max_deltas=per_entry) as producer:
        async with anyio.create_task_group() as tg:
            for data in receipts:
                tg.start_soon(producer.submit, data.delta())
        await producer.aclose()
        return producer.statistics().bytes_written


async def _raw(receipts: Sequence[ReceiptData]) -> RawChroma:
    vectors, seconds = await raw_chroma_upsert(receipts)
    progress(f"raw chromadb upsert: {vectors / seconds:,.0f} vectors/s ({vectors} vectors)")
    return RawChroma(vectors, round(seconds, 4), round(vectors / seconds, 1))


async def _publish_alone(compactor: Compactor) -> tuple[float, int]:
    """Archive and upload the committed snapshot again: (seconds, bytes)."""
    keys = compactor.keys
    state = await compactor.table.read_state(keys.log_id)
    assert state.snapshot_key is not None and state.snapshot_sha256 is not None
    path = await compactor.cache.committed(
        compactor.store, state.snapshot_key, state.snapshot_sha256, log=keys.log
    )
    started = time.perf_counter()
    published = await publish_snapshot(
        compactor.store, keys, path, hwm=state.hwm, token=state.token, counts={}
    )
    seconds = time.perf_counter() - started
    await compactor.store.delete(published.key)
    return seconds, published.size


@dataclass(slots=True)
class _Measured:
    """What one compaction run measured, before raw chromadb is known."""

    entries: int = 0
    vectors: int = 0
    replay_seconds: float = 0.0
    run_seconds: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    publish_seconds: float = 0.0
    snapshot_bytes: int = 0
    rebuild_seconds: float = 0.0
    rebuild_vectors: int = 0


async def _measure(config: LogConfig, env: Endpoint, *, path: str, with_publish: bool) -> _Measured:
    out = _Measured()
    with scratch_dir("compact") as cache:
        async with Compactor(config, cache_dir=cache) as compactor:
            meter = CpuMeter(env.server_pid)
            with meter.measure():
                result = await compactor.run_once()
            out.entries, out.vectors = result.entries_applied, result.vectors_upserted
            out.replay_seconds, out.run_seconds = result.seconds, meter.wall
            out.client_cpu, out.server_cpu = meter.client_share, meter.server_share
            progress(
                f"compaction ({path}): {out.vectors / out.replay_seconds:,.0f} vectors/s "
                f"replay, whole run {out.run_seconds:.2f} s, {out.entries} entries"
            )
            if not with_publish:
                return out
            out.publish_seconds, out.snapshot_bytes = await _publish_alone(compactor)
            progress(f"publish: {out.snapshot_bytes / MB / out.publish_seconds:,.1f} MB/s")
    return out


async def _rebuilds(
    config: LogConfig, receipts: Sequence[ReceiptData], rounds: int
) -> tuple[list[float], int, list[RawChroma]]:
    """``rounds`` rebuilds, each followed by a raw chromadb run: the machine's
    drift (Chroma's own speed varies by 15 % from one run to the next here)
    falls on both sides alike. Returns (rebuild seconds, vectors, raw runs)."""
    seconds: list[float] = []
    raws: list[RawChroma] = []
    vectors = 0
    with scratch_dir("rebuild") as cache:
        async with Compactor(config, cache_dir=cache) as compactor:
            for _ in range(rounds):
                rebuilt = await compactor.rebuild()
                await compactor.store.delete(rebuilt.snapshot_key)
                seconds.append(rebuilt.seconds)
                vectors = rebuilt.vectors_upserted
                progress(f"rebuild: {vectors / rebuilt.seconds:,.0f} vectors/s")
                raws.append(await _raw(receipts))
    return seconds, vectors, raws


def _per_second(amount: float, seconds: float) -> float:
    return round(amount / seconds, 1) if seconds > 0 else 0.0


async def run_compaction(
    env: Endpoint,
    sizes: Sizes,
    receipts: Sequence[ReceiptData],
    *,
    proxied: bool,
    raw: Sequence[RawChroma] = (),
) -> CompactionFigures:
    """Compaction (and, directly, publish and rebuild) of ``receipts``; see the module.

    Through the proxy, ``raw`` is the direct run's raw chromadb figures.
    """
    path: Literal["direct", "proxy"] = "proxy" if proxied else "direct"
    config = env.config("compact", proxied=proxied)
    entry_bytes = await append_receipts(config, receipts, per_entry=sizes.receipts_per_entry)
    before = [] if proxied else [await _raw(receipts)]
    m = await _measure(config, env, path=path, with_publish=not proxied)
    after = [] if proxied else [await _raw(receipts)]
    if not proxied:
        rebuilds, m.rebuild_vectors, more = await _rebuilds(config, receipts, sizes.rounds)
        m.rebuild_seconds = statistics.median(rebuilds)
        after += more
    raws = [*before, *after] or list(raw)
    await env.reset()
    return CompactionFigures(
        path=path,
        receipts=len(receipts),
        entries=m.entries,
        vectors=m.vectors,
        entry_mb=round(entry_bytes / MB, 2),
        raw_chroma=raws,
        raw_vectors_per_s=_per_second(sum(r.vectors for r in raws), sum(r.seconds for r in raws)),
        replay_seconds=round(m.replay_seconds, 4),
        replay_vectors_per_s=_per_second(m.vectors, m.replay_seconds),
        run_seconds=round(m.run_seconds, 4),
        client_cpu=m.client_cpu,
        server_cpu=m.server_cpu,
        publish_seconds=round(m.publish_seconds, 4),
        snapshot_mb=round(m.snapshot_bytes / MB, 2),
        publish_mb_per_s=_per_second(m.snapshot_bytes / MB, m.publish_seconds),
        rebuild_seconds=round(m.rebuild_seconds, 4),
        rebuild_vectors_per_s=_per_second(m.rebuild_vectors, m.rebuild_seconds),
    )
