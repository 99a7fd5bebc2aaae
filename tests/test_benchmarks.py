"""The benchmark suite runs end to end in its smallest mode and reports every figure.

No thresholds on speed: CI machines vary. What is checked is the contract
of ``python -m benchmarks``: the results JSON (machine, parameters, date,
every ratio as a positive float, the offline embedders' texts/s, CPU-seconds
per vector of every stage, the compression table) and the plots.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RATIO_KEYS = {
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
}
PLOTS = (
    "append.png",
    "compaction.png",
    "incremental.png",
    "codec.png",
    "fresh.png",
    "checkpoints.png",
    "freshness.png",
)
STAGES = {"encode", "append", "s3_standin", "read", "fold", "apply", "publish"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_run_reports_every_ratio_and_plot(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    results = json.loads((tmp_path / "results.json").read_text())
    ratios = results["ratios"]
    assert set(ratios) == RATIO_KEYS
    for key, value in ratios.items():
        assert isinstance(value, float), (key, value)
        assert math.isfinite(value) and value > 0, (key, value)
    assert results["mode"] == "smoke"
    assert results["date"]
    assert results["machine"]["cores"] >= 1
    assert results["machine"]["python"]
    assert "chromadb" in results["machine"]["packages"]
    assert results["parameters"]["concurrency"]

    embed = results["results"]["embed"]
    rows = {row["embedder"].split(":")[0]: row for row in embed["rows"]}
    assert set(rows) == {"hashing-v1", "wordllama"}
    for row in rows.values():
        assert row["texts"] == embed["texts"] > 0
        assert isinstance(row["texts_per_s"], float) and row["texts_per_s"] > 0, row
    assert rows["wordllama"]["load_seconds"] > 0
    for row in rows.values():
        assert set(row["quality"]) == {"lines", "line_inputs", "words"}
        assert all(0.0 <= q <= 1.0 for q in row["quality"].values()), row
    assert embed["wordllama_vs_hashing"] > 0
    assert "wordllama" in results["machine"]["packages"]

    per_stage = results["results"]["cpu_seconds_per_vector"]
    assert set(per_stage) == STAGES
    assert all(isinstance(v, float) and v >= 0 for v in per_stage.values()), per_stage
    # append is its stage's CPU minus encode's, measured apart: at smoke sizes (3 receipts)
    # the difference is within the meters' noise and may round to 0. The others are direct.
    assert all(v > 0 for stage, v in per_stage.items() if stage != "append"), per_stage
    compression = [row["compression"] for row in results["results"]["compression"]]
    assert compression[0] == "none" and len(compression) >= 2, compression
    assert all(row["archive_mb"] > 0 for row in results["results"]["compression"])
    checkpoints = results["results"]["checkpoints"]["points"]
    assert checkpoints[-1]["vectors"] == 10 * checkpoints[0]["vectors"]
    assert all(run["written"] > 0 for run in checkpoints[-1]["runs"] if run["checkpoint"])

    _check_ratios_follow_figures(ratios, results["results"])

    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name
    assert "Ratios" in done.stdout


def _check_ratios_follow_figures(ratios: dict[str, float], figures: dict[str, Any]) -> None:
    """The new ratios are what their figures say: a wrong reduction fails here."""
    points = sorted(figures["checkpoints"]["points"], key=lambda p: p["vectors"])
    small, large = points[0], points[-1]
    written = sum(run["written"] for run in large["runs"])
    applied = sum(run["entry_bytes"] for run in large["runs"])
    assert ratios["publish_bytes_per_entry_byte"] == pytest.approx(written / applied, rel=0.01)
    mean_large = statistics.mean(run["seconds"] for run in large["runs"])
    mean_small = statistics.mean(run["seconds"] for run in small["runs"])
    assert ratios["run_growth_with_publish"] == pytest.approx(mean_large / mean_small, rel=0.01)
    rss = large["checkpoint_run_rss_mb"] / small["checkpoint_run_rss_mb"]
    assert ratios["rss_growth"] == pytest.approx(rss, rel=0.01)
    cold = large["cold_seconds"] / large["warm_seconds"]
    assert ratios["cold_start_vs_warm"] == pytest.approx(cold, rel=0.01)
    assert [large["runs"][-1]["working_copy"], large["cold_seconds"] > 0] == ["warm", True]
    pipeline = figures["pipeline"]
    e2e = pipeline["raw_chroma_seconds"] / pipeline["seconds"]
    assert ratios["end_to_end_vs_raw_chroma"] == pytest.approx(e2e, rel=0.01)
    shards = figures["shards"]
    one, ten = sorted(shards["growth"], key=lambda p: p["shards"])
    assert (one["shards"], ten["shards"], ten["vectors"]) == (1, 10, 10 * one["vectors"])
    run_growth = ten["run_mean_seconds"] / one["run_mean_seconds"]
    assert ratios["sharded_run_growth"] == pytest.approx(run_growth, rel=0.01)
    rss = ten["checkpoint_run_rss_mb"] / one["checkpoint_run_rss_mb"]
    assert ratios["sharded_rss_growth"] == pytest.approx(rss, rel=0.01)
    single, sharded = sorted(shards["layouts"], key=lambda p: p["shards"])
    assert single["vectors"] == sharded["vectors"] and sharded["shards"] > 1
    cpu = sharded["cpu_us_per_vector"] / single["cpu_us_per_vector"]
    assert ratios["shard_apply_cpu"] == pytest.approx(cpu, rel=0.01)
    p50 = sharded["query"]["p50_ms"] / single["query"]["p50_ms"]
    assert ratios["fanout_query_vs_single"] == pytest.approx(p50, rel=0.01)
    assert all(0 < p["recall_at_10"] <= 1 for p in shards["layouts"])
    speedup = single["rebuild_seconds"] / sharded["rebuild_seconds"]
    assert ratios["parallel_rebuild_speedup"] == pytest.approx(speedup, rel=0.01)
    fresh = figures["freshness"]
    seen = [s["snapshot_visible"] - s["resolved"] for s in fresh["samples"]]
    assert len(seen) == fresh["receipts"] > 0 and all(x > 0 for x in seen), "every receipt seen"
    runs = [r["seconds"] for r in fresh["run_points"]]
    assert fresh["run_mean_seconds"] == pytest.approx(statistics.mean(runs), rel=0.01)
    p99 = fresh["snapshot_visibility"]["p99_ms"] / 1000 / fresh["run_mean_seconds"]
    assert ratios["freshness_p99_vs_run"] == pytest.approx(p99, rel=0.01)
    rows = figures["recall"]["rows"]
    ours = [r for r in rows if r["system"] in ("deltalog", "deltalog incremental")]
    assert ratios["recall_lowest"] == min(min(r["typed"], r["near"]) for r in ours)
    raw = [r for r in rows if r["system"] == "raw chromadb"]
    assert ratios["raw_chroma_recall_lowest"] == min(min(r["typed"], r["near"]) for r in raw)
