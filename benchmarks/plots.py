"""PNG plots of one run (matplotlib, no display needed).

- ``append.png``: throughput and latency against concurrent tasks, raw put,
  group commit off and on, directly and through the latency proxy;
- ``compaction.png``: vectors/s of raw chromadb, compaction and rebuild, and
  end-to-end receipts/s of deltalog and the baseline;
- ``incremental.png``: seconds to compact 100 new entries against N;
- ``codec.png``: encode and decode MB/s of vectors per format;
- ``fresh.png``: query p50/p99 against the tail's size, snapshot and fresh;
- ``checkpoints.png``: the cost of a small run against the checkpoint's size
  (mean with the default policy, warm, publishing every run, cold, and
  ``compact --checkpoint``), and the peak RSS of the latter;
- ``freshness.png``: each receipt's visibility latency (snapshot and fresh
  readers) against when it was submitted, with the follower's runs and
  checkpoints along the time axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib import ticker

from benchmarks.append import AppendCell
from benchmarks.report import Results

__all__ = ["write_plots"]

_STYLE = {"raw_put": "tab:gray", "group_off": "tab:red", "group_on": "tab:blue"}
_LABEL = {
    "raw_put": "raw PutObject",
    "group_off": "append, one entry each",
    "group_on": "group commit",
}


def _series(cells: Sequence[AppendCell], workload: str, mode: str, path: str) -> list[AppendCell]:
    return sorted(
        (c for c in cells if (c.workload, c.mode, c.path) == (workload, mode, path)),
        key=lambda c: c.tasks,
    )


def _append(results: Results, out: Path) -> Path | None:
    if not results.append:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for row, (workload, metric, unit) in enumerate(
        (("receipt", "mb_per_s", "MB/s"), ("label", "deltas_per_s", "deltas/s"))
    ):
        for mode, color in _STYLE.items():
            for path, style in (("direct", "-"), ("proxy", "--")):
                cells = _series(results.append, workload, mode, path)
                if not cells:
                    continue
                tasks = [c.tasks for c in cells]
                label = f"{_LABEL[mode]} ({path})"
                axes[row][0].plot(
                    tasks,
                    [getattr(c, metric) for c in cells],
                    style,
                    color=color,
                    marker="o",
                    label=label,
                )
                axes[row][1].plot(
                    tasks,
                    [c.latency.p50_ms for c in cells],
                    style,
                    color=color,
                    marker="o",
                    label=f"{label} p50",
                )
                axes[row][1].plot(
                    tasks,
                    [c.latency.p99_ms for c in cells],
                    style,
                    color=color,
                    marker="x",
                    alpha=0.5,
                )
        what = "one receipt (~100 vectors) per delta" if workload == "receipt" else "label updates"
        ticks = sorted({c.tasks for c in results.append})
        _axis(axes[row][0], f"Append throughput: {what}", unit, ticks)
        _axis(axes[row][1], f"Append latency: {what} (o p50, x p99)", "ms", ticks)
    axes[0][0].legend(fontsize=7)
    return _save(fig, out / "append.png")


def _axis(ax: Any, title: str, ylabel: str, ticks: Sequence[int]) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks), [str(t) for t in ticks])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("concurrent tasks")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _compaction(results: Results, out: Path) -> Path | None:
    c = results.compaction
    if c is None and results.e2e is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if c is not None:
        names = ["raw chromadb", "compaction", "rebuild"]
        values = [c.raw_vectors_per_s, c.replay_vectors_per_s, c.rebuild_vectors_per_s]
        if results.compaction_proxy is not None:
            names.append("compaction\n(proxy)")
            values.append(results.compaction_proxy.replay_vectors_per_s)
        left.bar(
            names, values, color=["tab:gray", "tab:blue", "tab:cyan", "tab:purple"][: len(values)]
        )
        left.set_title(f"Vectors/s into Chroma ({c.vectors:,} vectors)", fontsize=10)
        left.set_ylabel("vectors/s")
    if results.e2e is not None:
        e = results.e2e
        right.bar(
            ["deltalog", "baseline"],
            [e.deltalog.receipts_per_s, e.baseline.receipts_per_s],
            color=["tab:blue", "tab:red"],
        )
        right.set_title(f"End to end receipts/s (speedup {e.speedup:.1f}x)", fontsize=10)
        right.set_ylabel("receipts/s")
    return _save(fig, out / "compaction.png")


def _incremental(results: Results, out: Path) -> Path | None:
    points = sorted(results.incremental, key=lambda p: p.n)
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ns = [p.n for p in points]
    series = (
        ("replay (read + fold + apply)", "replay_seconds", "-o"),
        ("read + fold", "read_fold_seconds", "-s"),
        ("apply (Chroma)", "apply_seconds", "-^"),
        ("raw chromadb, same records", "raw_chroma_seconds", ":^"),
        ("whole run (+ copy, publish)", "run_seconds", "--o"),
    )
    for label, attr, style in series:
        ax.plot(ns, [getattr(p, attr) for p in points], style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("entries already in the log (N)")
    ax.set_ylabel("seconds")
    ax.set_title(f"Compacting {points[0].new_entries} new entries", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "incremental.png")


def _codec(results: Results, out: Path) -> Path | None:
    c = results.codec
    if c is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [f.format for f in c.formats]
    xs = list(range(len(names)))
    ax.bar(
        [x - 0.2 for x in xs], [f.encode_payload_mb_per_s for f in c.formats], 0.4, label="encode"
    )
    ax.bar(
        [x + 0.2 for x in xs], [f.decode_payload_mb_per_s for f in c.formats], 0.4, label="decode"
    )
    ax.set_xticks(xs, names)
    ax.set_yscale("log")
    ax.set_ylabel("MB/s of float32 vectors")
    ax.set_title(f"Codec: {c.vectors:,} vectors in {c.receipts} receipt deltas", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, out / "codec.png")


def _fresh(results: Results, out: Path) -> Path | None:
    if not results.fresh:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind in zip(axes, ("vector", "vector+where"), strict=True):
        points = sorted((p for p in results.fresh if p.kind == kind), key=lambda p: p.tail_vectors)
        tails = [p.tail_vectors for p in points]
        for name, color in (("snapshot", "tab:gray"), ("fresh", "tab:blue")):
            ax.plot(
                tails,
                [getattr(p, name).p50_ms for p in points],
                "-o",
                color=color,
                label=f"{name} p50",
            )
            ax.plot(
                tails,
                [getattr(p, name).p99_ms for p in points],
                "--x",
                color=color,
                label=f"{name} p99",
            )
        ax.set_xscale("symlog", linthresh=100)
        ax.set_xlabel("vectors in the uncompacted tail")
        ax.set_ylabel("ms per query")
        ax.set_title(f"Query latency ({kind})", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "fresh.png")


_RUN_SERIES = (
    ("run_mean_seconds", "mean run, default policy", "tab:blue"),
    ("warm_seconds", "warm run (live copy)", "tab:green"),
    ("every_run_seconds", "publish every run (ratio 0)", "tab:red"),
    ("cold_seconds", "cold start (empty cache)", "tab:orange"),
    ("checkpoint_run_seconds", "compact --checkpoint (child, empty cache)", "tab:purple"),
    ("raw_chroma_seconds", "raw chromadb, same records into the checkpoint", "tab:gray"),
)


def _checkpoints(results: Results, out: Path) -> Path | None:
    c = results.checkpoints
    if c is None or not c.points:
        return None
    points = sorted(c.points, key=lambda p: p.snapshot_mb)
    size = [p.snapshot_mb for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, label, color in _RUN_SERIES:
        left.plot(size, [getattr(p, name) for p in points], "-o", color=color, label=label)
    left.set_xlabel("checkpoint MB")
    left.set_ylabel("seconds per run")
    left.set_title(
        f"A run of {c.new_entries} entries x {c.new_vectors} vectors ({c.dim}-d)", fontsize=10
    )
    right.plot(
        size,
        [p.checkpoint_run_rss_mb for p in points],
        "-o",
        color="tab:purple",
        label="compact --checkpoint",
    )
    right.plot(
        size,
        [p.raw_chroma_rss_mb for p in points],
        "-o",
        color="tab:gray",
        label="raw chromadb: one run's upsert into the checkpoint",
    )
    right.legend(fontsize=8)
    right.set_xlabel("checkpoint MB")
    right.set_ylabel("peak RSS MB")
    right.set_ylim(bottom=0)
    right.set_title("Peak RSS of compact --checkpoint (empty cache)", fontsize=10)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    return _save(fig, out / "checkpoints.png")


def _freshness(results: Results, out: Path) -> Path | None:
    f = results.freshness
    if f is None or not f.samples:
        return None
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for name, attr, color in (
        ("snapshot reader", "snapshot_visible", "tab:blue"),
        ("fresh reader", "fresh_visible", "tab:orange"),
    ):
        points = [(s.submitted, getattr(s, attr) - s.resolved) for s in f.samples]
        seen = [(x, y * 1000) for x, y in points if y is not None]
        ax.scatter([x for x, _ in seen], [y for _, y in seen], s=8, color=color, label=name)
    for run in f.run_points:
        ax.axvspan(run.started, run.started + run.seconds, color="tab:gray", alpha=0.08)
        if run.checkpoint:
            ax.axvline(run.started + run.seconds, color="tab:red", alpha=0.4, lw=1)
    ax.axhline(f.snapshot_visibility.p99_ms, color="tab:blue", ls="--", lw=1, label="snapshot p99")
    ax.set_xlabel("seconds (when the receipt was submitted); shaded: runs, red: checkpoints")
    ax.set_ylabel("ms from append to visible")
    ax.set_title(
        f"Freshness at {f.load:.0%} of the drain rate ({f.offered_vectors_per_s:,.0f} vectors/s):"
        f" p99 {f.snapshot_visibility.p99_ms:,.0f} ms = {f.p99_vs_run:.2f} x the mean run",
        fontsize=10,
    )
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "freshness.png")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_plots(results: Results, out: Path) -> list[Path]:
    """Every plot the run has data for; returns their paths."""
    plots = (_append, _compaction, _incremental, _codec, _fresh, _checkpoints, _freshness)
    made = [plot(results, out) for plot in plots]
    return [p for p in made if p is not None]
