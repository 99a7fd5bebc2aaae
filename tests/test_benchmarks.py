"""The benchmark suite runs end to end in its smallest mode and reports every figure.

No thresholds on speed: CI machines vary. What is checked is the contract
of ``python -m benchmarks``: the results JSON (machine, parameters, date,
the six ratios as floats, the offline embedders' texts/s) and the plots.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RATIO_KEYS = {
    "append_mb_vs_raw_put",
    "group_commit_gain",
    "compaction_vs_raw_chroma",
    "rebuild_vs_raw_chroma",
    "incremental_growth",
    "speedup_vs_baseline",
}
PLOTS = ("append.png", "compaction.png", "incremental.png", "codec.png", "fresh.png")
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

    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name
    assert "Ratios" in done.stdout
