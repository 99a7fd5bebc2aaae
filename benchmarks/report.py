"""The results of one run: the ratios, the table, the JSON and the plots.

``Results`` holds what each benchmark measured (``None`` for one that was
not run). ``ratios`` reduces it to the figures tracked over time, each a
ratio of two measurements of the same run:

- ``append_mb_vs_raw_put``: receipt deltas, 64 tasks, group commit on:
  MB/s appended / MB/s of raw ``PutObject`` of objects the size of one delta;
- ``group_commit_gain``: label deltas, 64 tasks: deltas/s with group commit /
  without;
- ``compaction_vs_raw_chroma``, ``rebuild_vs_raw_chroma``: replay vectors/s
  / raw chromadb upsert vectors/s of the same records;
- ``incremental_growth``: replay seconds for 100 new entries at the largest
  N / at the smallest;
- ``speedup_vs_baseline``: end-to-end receipts/s, deltalog / baseline
  (reported: no target);
- ``publish_bytes_per_entry_byte``: S3 bytes written by small runs on the
  largest base, over the bytes of the entries they applied (default policy,
  over a cycle that ends with the policy's publish);
- ``run_growth_with_publish``: mean whole-run seconds of those runs on the
  largest base / on the smallest (10x smaller);
- ``rss_growth``: peak RSS of ``compact --checkpoint`` (child process, empty
  cache) on the largest base / on the smallest;
- ``cold_start_vs_warm``: a run with an empty cache / one on the live copy,
  largest base (reported);
- ``end_to_end_vs_raw_chroma``: raw chromadb seconds / seconds of producers
  and ``compact --follow`` running together, for the same vectors;
- ``sharded_run_growth``, ``sharded_rss_growth``: the mean whole run and the
  ``compact --checkpoint`` peak RSS of shard 0 of a log ten times larger on
  ten shards / of a small log in one index (``benchmarks.shards``);
- ``shard_apply_cpu``: CPU seconds (compactor and moto) per vector applied,
  shards / one index, the same vectors;
- ``fanout_query_vs_single``: p50 top-10 query latency, shards / one index;
- ``parallel_rebuild_speedup``: one index's rebuild seconds / the shards'
  rebuild, one process each (reported, with the cores the machine has).
- ``freshness_p99_vs_run``: producers at 70 % of the drain rate while
  ``compact --follow`` runs: p99 of the time from a receipt's append to a
  snapshot reader returning it / the mean run time at that load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.append import AppendCell
from benchmarks.baseline import E2EFigures
from benchmarks.checkpoints import CheckpointFigures
from benchmarks.codec import CodecFigures
from benchmarks.compaction import CompactionFigures
from benchmarks.compression import CompressionRow
from benchmarks.cost_report import (
    checkpoint_section,
    compression_section,
    freshness_section,
    pipeline_section,
    stage_section,
)
from benchmarks.embed import EmbedFigures
from benchmarks.fresh import FreshPoint
from benchmarks.freshness import FreshnessFigures
from benchmarks.incremental import IncrementalPoint
from benchmarks.pipeline import OverlapFigures
from benchmarks.recall import RecallFigures
from benchmarks.shards import ShardFigures
from benchmarks.stages import StageFigures
from benchmarks.tables import num, table

__all__ = ["RATIO_KEYS", "TARGETS", "Results", "ratios", "render_table", "write_json"]

RATIO_KEYS = (
    "append_mb_vs_raw_put",
    "group_commit_gain",
    "compaction_vs_raw_chroma",
    "rebuild_vs_raw_chroma",
    "incremental_growth",
    "speedup_vs_baseline",
    "publish_bytes_per_entry_byte",
    "run_growth_with_publish",
    "rss_growth",
    "cold_start_vs_warm",
    "end_to_end_vs_raw_chroma",
    "sharded_run_growth",
    "sharded_rss_growth",
    "shard_apply_cpu",
    "fanout_query_vs_single",
    "parallel_rebuild_speedup",
    "freshness_p99_vs_run",
    "recall_lowest",
    "raw_chroma_recall_lowest",
)
TARGETS: dict[str, tuple[str, float] | None] = {
    "append_mb_vs_raw_put": (">=", 0.8),
    "group_commit_gain": (">=", 10.0),
    "compaction_vs_raw_chroma": (">=", 0.95),
    "rebuild_vs_raw_chroma": (">=", 0.9),
    "incremental_growth": ("<=", 1.2),
    "speedup_vs_baseline": None,
    "publish_bytes_per_entry_byte": ("<=", 20.0),
    "run_growth_with_publish": ("<=", 1.3),
    "rss_growth": ("<=", 1.3),
    "cold_start_vs_warm": None,
    "sharded_run_growth": ("<=", 1.15),
    "sharded_rss_growth": ("<=", 1.15),
    "shard_apply_cpu": ("<=", 1.0),
    "fanout_query_vs_single": ("<=", 2.0),
    "parallel_rebuild_speedup": None,
    "end_to_end_vs_raw_chroma": (">=", 0.8),
    "freshness_p99_vs_run": ("<=", 2.5),
    "recall_lowest": (">=", 0.99),
    "raw_chroma_recall_lowest": None,
}
"""``None``: reported, no target (the baseline's 10x was retired: it takes only about 4x
raw Chroma's time, the ceiling for any pipeline that inserts every vector into Chroma)."""
HEADLINE_TASKS = 64


@dataclass(slots=True)
class Results:
    mode: str
    started_at: str
    machine: dict[str, Any]
    parameters: dict[str, Any]
    append: list[AppendCell] = field(default_factory=list)
    compaction: CompactionFigures | None = None
    compaction_proxy: CompactionFigures | None = None
    incremental: list[IncrementalPoint] = field(default_factory=list)
    codec: CodecFigures | None = None
    embed: EmbedFigures | None = None
    recall: RecallFigures | None = None
    fresh: list[FreshPoint] = field(default_factory=list)
    e2e: E2EFigures | None = None
    checkpoints: CheckpointFigures | None = None
    compression: list[CompressionRow] = field(default_factory=list)
    stages: StageFigures | None = None
    pipeline: OverlapFigures | None = None
    shards: ShardFigures | None = None
    freshness: FreshnessFigures | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    """Wall seconds per benchmark."""


def _cell(
    cells: Sequence[AppendCell], workload: str, mode: str, *, path: str = "direct"
) -> AppendCell | None:
    """The cell at 64 tasks (or the largest concurrency measured below it)."""
    found = [
        c
        for c in cells
        if (c.workload, c.mode, c.path) == (workload, mode, path) and c.tasks <= HEADLINE_TASKS
    ]
    return max(found, key=lambda c: c.tasks) if found else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def ratios(results: Results) -> dict[str, float | None]:
    """The tracked ratios; ``None`` for a benchmark that was not run."""
    on = _cell(results.append, "receipt", "group_on")
    raw = _cell(results.append, "receipt", "raw_put")
    label_on = _cell(results.append, "label", "group_on")
    label_off = _cell(results.append, "label", "group_off")
    c = results.compaction
    points = sorted(results.incremental, key=lambda p: p.n)
    out: dict[str, float | None] = dict.fromkeys(RATIO_KEYS)
    if on is not None and raw is not None:
        out["append_mb_vs_raw_put"] = _ratio(on.mb_per_s, raw.mb_per_s)
    if label_on is not None and label_off is not None:
        out["group_commit_gain"] = _ratio(label_on.deltas_per_s, label_off.deltas_per_s)
    if c is not None:
        out["compaction_vs_raw_chroma"] = _ratio(c.replay_vectors_per_s, c.raw_vectors_per_s)
        out["rebuild_vs_raw_chroma"] = _ratio(c.rebuild_vectors_per_s, c.raw_vectors_per_s)
    if points:
        out["incremental_growth"] = _ratio(points[-1].replay_seconds, points[0].replay_seconds)
    if results.e2e is not None:
        out["speedup_vs_baseline"] = results.e2e.speedup
    out.update(_checkpoint_ratios(results.checkpoints))
    if results.pipeline is not None:
        out["end_to_end_vs_raw_chroma"] = results.pipeline.vs_raw_chroma
    if results.freshness is not None:
        out["freshness_p99_vs_run"] = results.freshness.p99_vs_run
    if results.recall is not None:
        deltalog = ("deltalog", "deltalog incremental")
        out["recall_lowest"] = min(results.recall.lowest(system) for system in deltalog)
        out["raw_chroma_recall_lowest"] = results.recall.lowest("raw chromadb")
    out.update(_shard_ratios(results.shards))
    return out


def _shard_ratios(f: ShardFigures | None) -> dict[str, float | None]:
    if f is None:
        return {}
    out: dict[str, float | None] = {
        "sharded_run_growth": f.run_growth,
        "sharded_rss_growth": f.rss_growth,
    }
    one, sharded = f.one, f.sharded
    if one is not None and sharded is not None:
        out["shard_apply_cpu"] = _ratio(sharded.cpu_us_per_vector, one.cpu_us_per_vector)
        out["fanout_query_vs_single"] = _ratio(sharded.query.p50_ms, one.query.p50_ms)
        out["parallel_rebuild_speedup"] = _ratio(one.rebuild_seconds, sharded.rebuild_seconds)
    return out


def _checkpoint_ratios(c: CheckpointFigures | None) -> dict[str, float | None]:
    """Small runs on the largest base against the smallest (10x smaller)."""
    if c is None or not c.points:
        return {}
    small = min(c.points, key=lambda p: p.vectors)
    large = max(c.points, key=lambda p: p.vectors)
    return {
        "publish_bytes_per_entry_byte": large.bytes_per_entry_byte,
        "run_growth_with_publish": _ratio(large.run_mean_seconds, small.run_mean_seconds),
        "rss_growth": _ratio(large.checkpoint_run_rss_mb, small.checkpoint_run_rss_mb),
        "cold_start_vs_warm": _ratio(large.cold_seconds, large.warm_seconds),
    }


def verdict(key: str, value: float | None) -> str:
    if value is None:
        return "not run"
    goal = TARGETS[key]
    if goal is None:
        return "reported"
    op, target = goal
    met = value >= target if op == ">=" else value <= target
    return "met" if met else "MISSED"


def write_json(results: Results, path: Path) -> dict[str, Any]:
    """Write the results with their ratios and targets; return what was written."""
    document: dict[str, Any] = {
        "schema": 1,
        "date": results.started_at,
        "mode": results.mode,
        "seconds": round(results.seconds, 1),
        "machine": results.machine,
        "parameters": results.parameters,
        "ratios": ratios(results),
        "targets": {k: {"op": t[0], "value": t[1]} for k, t in TARGETS.items() if t is not None},
        "timings": {k: round(v, 1) for k, v in results.timings.items()},
        "results": {
            "append": results.append,
            "compaction": results.compaction,
            "compaction_proxy": results.compaction_proxy,
            "incremental": results.incremental,
            "codec": results.codec,
            "embed": results.embed,
            "recall": results.recall,
            "fresh": results.fresh,
            "end_to_end": results.e2e,
            "checkpoints": results.checkpoints,
            "compression": results.compression,
            "stages": results.stages,
            "cpu_seconds_per_vector": results.stages.per_vector() if results.stages else None,
            "pipeline": results.pipeline,
            "shards": results.shards,
            "freshness": results.freshness,
        },
    }
    plain: dict[str, Any] = msgspec.to_builtins(document)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(plain), indent=2) + b"\n")
    return plain


# -- the table ------------------------------------------------------------------------


def _lat(p50: float, p99: float) -> str:
    return f"{p50:,.0f}/{p99:,.0f}"


def _ratio_rows(results: Results) -> list[list[str]]:
    rows = []
    for key, value in ratios(results).items():
        goal = TARGETS[key]
        shown = "-" if value is None else f"{value:.2f}"
        rows.append(
            [key, shown, "-" if goal is None else f"{goal[0]} {goal[1]:g}", verdict(key, value)]
        )
    return rows


def _append_rows(cells: Sequence[AppendCell], workload: str, path: str) -> list[list[str]]:
    rows = []
    for tasks in sorted({c.tasks for c in cells}):
        by = {c.mode: c for c in cells if (c.workload, c.path, c.tasks) == (workload, path, tasks)}
        raw, off, on = by.get("raw_put"), by.get("group_off"), by.get("group_on")
        if raw is None or off is None or on is None:
            continue
        rows.append(
            [
                str(tasks),
                num(raw.deltas_per_s),
                num(raw.mb_per_s, 1),
                num(off.deltas_per_s),
                num(off.mb_per_s, 1),
                _lat(off.latency.p50_ms, off.latency.p99_ms),
                num(on.deltas_per_s),
                num(on.mb_per_s, 1),
                _lat(on.latency.p50_ms, on.latency.p99_ms),
                num(on.deltas_per_entry, 1),
                f"{on.mb_per_s / raw.mb_per_s:.2f}" if raw.mb_per_s else "-",
                f"{on.deltas_per_s / off.deltas_per_s:.1f}" if off.deltas_per_s else "-",
            ]
        )
    return rows


_APPEND_HEADERS = [
    "tasks",
    "put/s",
    "put MB/s",
    "off d/s",
    "off MB/s",
    "off p50/p99 ms",
    "on d/s",
    "on MB/s",
    "on p50/p99 ms",
    "d/entry",
    "on/put MB",
    "on/off",
]


def _append_section(results: Results) -> list[str]:
    out: list[str] = []
    sizes = {"receipt": "one receipt per delta", "label": "one label update per delta"}
    for path in ("direct", "proxy"):
        for workload, what in sizes.items():
            rows = _append_rows(results.append, workload, path)
            if rows:
                where = "moto" if path == "direct" else "moto behind the 20-100 ms proxy"
                out += table(f"Append: {what}, {where}", _APPEND_HEADERS, rows)
    return out


def _compaction_section(results: Results) -> list[str]:
    c, proxy = results.compaction, results.compaction_proxy
    if c is None:
        return []
    raw = c.raw_vectors_per_s
    rows = [
        ["raw chromadb upsert (from memory)", num(raw), "1.00", "-"],
        [
            "compaction replay",
            num(c.replay_vectors_per_s),
            f"{c.replay_vectors_per_s / raw:.2f}",
            f"{c.replay_seconds:.2f}",
        ],
        [
            "rebuild from seq 1",
            num(c.rebuild_vectors_per_s),
            f"{c.rebuild_vectors_per_s / raw:.2f}",
            f"{c.rebuild_seconds:.2f}",
        ],
    ]
    if proxy is not None:
        rows.append(
            [
                "compaction replay through the proxy",
                num(proxy.replay_vectors_per_s),
                f"{proxy.replay_vectors_per_s / raw:.2f}",
                f"{proxy.replay_seconds:.2f}",
            ]
        )
    title = (
        f"Compaction: {c.vectors:,} vectors in {c.entries} entries ({c.entry_mb:,.1f} MB); "
        f"whole run {c.run_seconds:.2f} s; publish {c.snapshot_mb:,.1f} MB at "
        f"{c.publish_mb_per_s:,.1f} MB/s"
    )
    return table(title, ["", "vectors/s", "vs raw", "seconds"], rows)


def _incremental_section(results: Results) -> list[str]:
    points = sorted(results.incremental, key=lambda p: p.n)
    if not points:
        return []
    first = points[0]
    rows = [
        [
            num(p.n),
            f"{p.replay_seconds:.2f}",
            f"{p.replay_seconds / first.replay_seconds:.2f}",
            f"{p.read_fold_seconds:.2f}",
            f"{p.apply_seconds:.2f}",
            f"{p.raw_chroma_seconds:.2f}",
            f"{p.run_seconds:.2f}",
            num(p.snapshot_mb, 1),
        ]
        for p in points
    ]
    title = (
        f"Incremental: compact {first.new_entries} new entries ({first.vectors} vectors) "
        "into a log of N compacted entries (medians)"
    )
    headers = [
        "N",
        "replay s",
        "vs first",
        "read+fold s",
        "apply s",
        "raw chroma s",
        "whole run s",
        "snapshot MB",
    ]
    return table(title, headers, rows)


def _codec_section(results: Results) -> list[str]:
    c = results.codec
    if c is None:
        return []
    rows = [
        [
            f.format,
            num(f.encoded_mb, 2),
            num(f.encode_payload_mb_per_s, 1),
            num(f.decode_payload_mb_per_s, 1),
            num(f.encode_mb_per_s, 1),
            num(f.decode_mb_per_s, 1),
        ]
        for f in c.formats
    ]
    title = (
        f"Codec: {c.receipts} receipt deltas, {c.vectors:,} vectors "
        f"({c.payload_mb:.1f} MB of float32)"
    )
    headers = ["format", "size MB", "enc vec MB/s", "dec vec MB/s", "enc MB/s", "dec MB/s"]
    return table(title, headers, rows)


def _embed_section(results: Results) -> list[str]:
    e = results.embed
    if e is None:
        return []
    rows = [
        [
            r.embedder,
            str(r.dim),
            num(r.texts_per_s),
            f"{r.seconds:.3f}",
            f"{r.load_seconds:.2f}",
            f"{r.quality.lines:.2f}",
            f"{r.quality.words:.2f}",
        ]
        for r in e.rows
    ]
    title = (
        f"Offline embedders: {e.texts:,} texts of {e.receipts} receipts, one call per receipt, "
        f"one thread (wordllama / hashing {e.wordllama_vs_hashing:.2f})"
    )
    headers = ["embedder", "dim", "texts/s", "seconds", "load s", "P@20 lines", "P@20 words"]
    return table(title, headers, rows)


def _recall_section(results: Results) -> list[str]:
    r = results.recall
    if r is None:
        return []
    rows = [
        [
            row.system,
            str(row.build),
            f"{row.typed:.4f}",
            f"{row.near:.4f}",
            f"{row.worst:.1f}",
            str(row.misses),
            f"{row.apply_s:.2f}",
            f"{row.index_mb:.1f}",
        ]
        for row in r.rows
    ]
    title = (
        f"Recall@10 against brute force: {r.receipts} receipts, {r.vectors:,} word vectors "
        f"({r.distinct:,} distinct), {r.typed_queries} typed and {r.near_queries} near queries"
    )
    headers = ["index", "build", "typed", "near", "worst", "misses", "apply s", "MB"]
    return table(title, headers, rows)


def _fresh_section(results: Results) -> list[str]:
    if not results.fresh:
        return []
    rows = [
        [
            num(p.tail_vectors),
            p.kind,
            _lat(p.snapshot.p50_ms, p.snapshot.p99_ms),
            _lat(p.fresh.p50_ms, p.fresh.p99_ms),
            f"{p.p50_ratio:.2f}",
            f"{p.catch_up_seconds:.2f}",
        ]
        for p in results.fresh
    ]
    title = (
        f"Fresh reads: top-10 queries on a {results.fresh[0].snapshot_vectors:,}-vector snapshot"
    )
    headers = [
        "tail vectors",
        "query",
        "snapshot p50/p99 ms",
        "fresh p50/p99 ms",
        "p50 ratio",
        "catch-up s",
    ]
    return table(title, headers, rows)


def _e2e_section(results: Results) -> list[str]:
    e = results.e2e
    if e is None:
        return []
    rows = [
        [
            p.name,
            f"{p.receipts_per_s:.2f}",
            f"{p.produce_seconds:.2f}",
            f"{p.compact_seconds:.2f}",
            num(p.uploaded_mb, 1),
            num(p.vectors),
        ]
        for p in (e.deltalog, e.baseline)
    ]
    title = (
        f"End to end: {e.deltalog.receipts} receipts, {e.concurrency} at a time, to a published "
        f"snapshot (speedup {e.speedup:.2f}x)"
    )
    headers = ["pipeline", "receipts/s", "produce s", "compact s", "uploaded MB", "vectors"]
    lines = table(title, headers, rows)
    lines.append(
        f"(raw chromadb upserts these records from memory in {e.raw_chroma_seconds:.2f} s; the "
        f"baseline takes {e.speedup_ceiling:.1f}x that: about the most any pipeline that "
        "inserts every vector into Chroma can gain over it here)"
    )
    return lines


def render_table(results: Results) -> str:
    m = results.machine
    packages = m.get("packages", {})
    lines = [
        f"deltalog benchmarks ({results.mode}), {results.started_at}, {results.seconds:.0f} s",
        f"{m.get('cores')} cores ({m.get('cpu')}), Python {m.get('python')}, "
        f"chromadb {packages.get('chromadb')}, moto {packages.get('moto')}, "
        f"load average at start {m.get('load_average_at_start')}, "
        f"at end {m.get('load_average_at_end')}",
    ]
    lines += table(
        "Ratios (same run, same endpoint, same concurrency)",
        ["ratio", "value", "target", ""],
        _ratio_rows(results),
    )
    for section in (
        _append_section,
        _compaction_section,
        _incremental_section,
        _codec_section,
        _embed_section,
        _recall_section,
        _fresh_section,
        _e2e_section,
    ):
        lines += section(results)
    lines += checkpoint_section(results.checkpoints)
    lines += compression_section(results.compression)
    lines += stage_section(results.stages)
    lines += pipeline_section(results.pipeline)
    lines += _shards_section(results.shards)
    lines += freshness_section(results.freshness)
    return "\n".join(lines) + "\n"


def _shards_section(f: ShardFigures | None) -> list[str]:
    if f is None:
        return []
    lines: list[str] = []
    rows = [
        [
            str(p.shards),
            num(p.vectors),
            str(len(p.runs)),
            "yes" if p.published else "no",
            f"{p.run_mean_seconds:.3f}",
            num(p.checkpoint_run_rss_mb),
            f"{p.checkpoint_run_seconds:.1f}",
        ]
        for p in f.growth
    ]
    lines += table(
        f"Shards: small runs of shard 0, one index against ten times the data on ten shards "
        f"({f.dim}-d)",
        ["shards", "vectors", "runs", "published", "mean run s", "--checkpoint RSS MB", "s"],
        rows,
    )
    rows = [
        [
            str(p.shards),
            num(p.vectors),
            f"{p.compact_seconds:.1f}",
            f"{p.child_cpu_seconds:.1f}",
            f"{p.server_cpu_seconds:.1f}",
            num(p.cpu_us_per_vector),
            _lat(p.query.p50_ms, p.query.p99_ms),
            f"{p.recall_at_10:.3f}",
            f"{p.rebuild_seconds:.1f}",
        ]
        for p in f.layouts
    ]
    lines += table(
        f"Shards: the same vectors in one index and on shards ({f.cores} cores; the shards' "
        "rebuild is one process per shard)",
        [
            "shards",
            "vectors",
            "compact s",
            "CPU s",
            "moto CPU s",
            "CPU us/vector",
            "query p50/p99 ms",
            "recall@10",
            "rebuild s",
        ],
        rows,
    )
    rows = [
        [
            str(p.shards),
            num(p.vectors),
            f"{p.append_seconds:.0f}",
            f"{p.seconds:.0f}",
            f"{min(p.shard_seconds):.0f}-{max(p.shard_seconds):.0f}",
            f"{min(p.shard_rss_mb):.0f}-{max(p.shard_rss_mb):.0f}",
        ]
        for p in f.scale
    ]
    if rows:
        lines += table(
            f"Shards: the scale point, a compact process per shard, one per core ({f.cores} cores)",
            ["shards", "vectors", "append s", "compact s", "per shard s", "per shard RSS MB"],
            rows,
        )
    return lines


def is_float(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value)
