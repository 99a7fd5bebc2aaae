"""Snapshot compression: ``none`` against zstd levels, on a real checkpoint.

For each setting the same closed Chroma directory (the checkpoint benchmark's
largest base) is published with ``publish_snapshot``, the function every
compaction run uses (archive streamed into a multipart upload), then
fetched into an empty ``SnapshotCache`` (parallel ranged download, sha256
and sidecar checks, extraction): what a publishing run and a cold
compactor or reader pay. Reported per setting: archive bytes, their ratio
to ``none``, publish seconds, download + extract seconds, and their sum.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import MB, progress, scratch_dir
from compactor.publish import Compression, forget_snapshot, publish_snapshot
from deltalog.keys import LogKeys
from deltalog.snapshot.cache import SnapshotCache
from deltalog.storage.store import ObjectStore

__all__ = ["CompressionRow", "run_compression"]


@dataclass(frozen=True, slots=True)
class CompressionRow:
    compression: str
    """``none`` or ``zstd-N``."""
    archive_mb: float
    vs_none: float
    """Archive bytes over those of ``none``."""
    publish_seconds: float
    fetch_seconds: float
    """Download, verify and extract into an empty cache."""
    total_seconds: float


async def _one(
    store: ObjectStore, keys: LogKeys, directory: Path, compression: Compression, level: int
) -> tuple[int, float, float]:
    started = time.perf_counter()
    published = await publish_snapshot(
        store, keys, directory, hwm=1, token=1, counts={}, compression=compression, level=level
    )
    publish = time.perf_counter() - started
    try:
        with scratch_dir("compression") as cache:
            started = time.perf_counter()
            await SnapshotCache(cache).committed(
                store, published.key, published.sha256, log=keys.log
            )
            fetch = time.perf_counter() - started
    finally:
        await forget_snapshot(store, published.key)
    return published.size, publish, fetch


async def run_compression(
    store: ObjectStore, keys: LogKeys, directory: Path, levels: tuple[int, ...]
) -> list[CompressionRow]:
    settings: list[tuple[Compression, int]] = [("none", 0), *(("zstd", lv) for lv in levels)]
    rows: list[CompressionRow] = []
    plain = 0
    for compression, level in settings:
        size, publish, fetch = await _one(store, keys, directory, compression, level or 3)
        plain = plain or size
        name = "none" if compression == "none" else f"zstd-{level}"
        rows.append(
            CompressionRow(
                name,
                round(size / MB, 2),
                round(size / plain, 3),
                round(publish, 3),
                round(fetch, 3),
                round(publish + fetch, 3),
            )
        )
        progress(
            f"compression {name}: {size / MB:.1f} MB, publish {publish:.2f} s, fetch {fetch:.2f} s"
        )
    return rows
