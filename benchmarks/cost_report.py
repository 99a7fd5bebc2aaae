"""The table sections of the cost benchmarks: checkpoints, compression, stages, pipeline,
freshness."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from benchmarks.checkpoints import CheckpointFigures
from benchmarks.compression import CompressionRow
from benchmarks.freshness import FreshnessFigures
from benchmarks.pipeline import OverlapFigures
from benchmarks.stages import StageFigures
from benchmarks.tables import num, table

__all__ = [
    "checkpoint_section",
    "compression_section",
    "freshness_section",
    "pipeline_section",
    "stage_section",
]

STAGE_NAMES = {
    "encode": "encode (validate + msgspec)",
    "append": "append (group commit, botocore)",
    "s3_standin": "S3 stand-in (moto server)",
    "read": "read (list, GET, verify, decode)",
    "fold": "fold",
    "apply": "apply (Chroma upsert + close)",
    "publish": "publish (archive + upload)",
}


def checkpoint_section(c: CheckpointFigures | None) -> list[str]:
    if c is None or not c.points:
        return []
    rows = [
        [
            num(p.vectors),
            num(p.snapshot_mb, 1),
            f"{len(p.runs)}{'' if p.cycle_complete else '*'}",
            p.runs[-1].checkpoint or "-",
            f"{p.run_mean_seconds:.2f}",
            f"{statistics.mean(r.apply_seconds for r in p.runs):.2f}",
            f"{p.warm_seconds:.2f}",
            f"{p.raw_chroma_seconds:.2f}",
            f"{p.every_run_seconds:.2f}",
            f"{p.cold_seconds:.2f}",
            f"{p.checkpoint_run_seconds:.2f}",
            num(p.checkpoint_run_rss_mb),
            num(p.raw_chroma_rss_mb),
            f"{p.bytes_per_entry_byte:.1f}",
            f"{p.every_run_bytes_per_entry_byte:.1f}",
        ]
        for p in c.points
    ]
    title = (
        f"Checkpoints: runs of {c.new_entries} entries x {c.new_vectors} vectors ({c.dim}-d) on "
        f"bases of N vectors, checkpoint_ratio {c.checkpoint_ratio:g} (* = no publish in the runs)"
    )
    headers = [
        "N",
        "checkpoint MB",
        "runs",
        "ended by",
        "mean run s",
        "its apply s",
        "warm s",
        "raw chroma s",
        "every-run s",
        "cold s",
        "--checkpoint s",
        "its RSS MB",
        "raw chroma RSS MB",
        "B/entry B",
        "every-run B/B",
    ]
    return table(title, headers, rows)


def compression_section(rows: Sequence[CompressionRow]) -> list[str]:
    if not rows:
        return []
    body = [
        [
            r.compression,
            num(r.archive_mb, 1),
            f"{r.vs_none:.2f}",
            f"{r.publish_seconds:.2f}",
            f"{r.fetch_seconds:.2f}",
            f"{r.total_seconds:.2f}",
        ]
        for r in rows
    ]
    headers = ["archive", "MB", "vs none", "publish s", "fetch s", "total s"]
    return table("Compression of the largest checkpoint", headers, body)


def stage_section(s: StageFigures | None) -> list[str]:
    if s is None:
        return []
    rows = [
        [
            STAGE_NAMES.get(r.stage, r.stage),
            f"{r.cpu_seconds_per_vector * 1e6:,.1f}",
            f"{r.server_cpu_seconds_per_vector * 1e6:,.1f}",
            f"{r.wall_seconds:.2f}",
        ]
        for r in s.rows
    ]
    title = f"CPU per stage: {s.receipts} receipts, {s.vectors:,} vectors, one stage at a time"
    headers = ["stage", "CPU us/vector", "server CPU us/vector", "wall s"]
    return table(title, headers, rows)


def pipeline_section(p: OverlapFigures | None) -> list[str]:
    if p is None:
        return []
    per = 1e6 / p.vectors if p.vectors else 0.0
    rows = [
        ["producers + compact --follow", f"{p.seconds:.2f}", f"{p.vs_raw_chroma:.2f}"],
        ["raw chromadb upsert (from memory)", f"{p.raw_chroma_seconds:.2f}", "1.00"],
    ]
    title = (
        f"Overlapped pipeline: {p.receipts} receipts ({p.vectors:,} vectors), {p.concurrency} at "
        f"a time; producers done at {p.produce_seconds:.2f} s; {p.runs} runs (replay "
        f"{p.replay_seconds:.2f} s), {p.checkpoints} checkpoints"
    )
    lines = table(title, ["", "seconds", "raw / this"], rows)
    lines.append(
        f"(CPU us/vector: producers {p.producer_cpu_seconds * per:,.0f}, compactor "
        f"{p.compactor_cpu_seconds * per:,.0f}, S3 stand-in {p.server_cpu_seconds * per:,.0f}; "
        f"compactor peak RSS {p.compactor_peak_rss_mb:,.0f} MB)"
    )
    return lines


def freshness_section(f: FreshnessFigures | None) -> list[str]:
    if f is None:
        return []
    rows = [
        [name, f"{x.p50_ms:,.0f}", f"{x.p95_ms:,.0f}", f"{x.p99_ms:,.0f}", f"{x.max_ms:,.0f}"]
        for name, x in (
            ("submit (add resolved)", f.submit),
            ("snapshot reader sees it", f.snapshot_visibility),
            ("fresh reader sees it", f.fresh_visibility),
            ("follower wake-up", f.wake_up),
        )
    ]
    title = (
        f"Freshness: {f.receipts} receipts ({f.vectors:,} vectors) over {f.seconds:.0f} s at "
        f"{f.offered_vectors_per_s:,.0f} vectors/s ({f.load:.0%} of the drain rate, "
        f"{f.drain_vectors_per_s:,.0f}); {f.runs} runs of {f.run_mean_seconds:.2f} s on average "
        f"({f.warm_runs} on the warm sink, {f.checkpoints} checkpoints)"
    )
    lines = table(title, ["latency ms", "p50", "p95", "p99", "max"], rows)
    lines.append(
        f"(p99 snapshot visibility / mean run: {f.p99_vs_run:.2f}; entries not committed when "
        f"the producers stopped: {f.lag_at_end})"
    )
    if f.slowest is not None:
        a = f.slowest
        lines.append(
            f"(the slowest 5 %, {a.samples} receipts: {a.commit_wait_ms:,.0f} ms waiting for "
            f"their commit, {a.reader_wait_ms:,.0f} ms more for the reader; {a.by_checkpoint_run} "
            f"committed by a checkpoint run, {a.after_reopen} behind a reopen, "
            f"{a.reader_loading} seen by a reader loading a checkpoint; the snapshot reader "
            f"loaded {len(f.reader_loads)} checkpoints, "
            f"{', '.join(f'{s:.1f}' for _, s in f.reader_loads)} s)"
        )
    return lines
