"""The compactor's figures: one definition for CloudWatch and Prometheus."""

from __future__ import annotations

import urllib.request
from dataclasses import replace

from compactor.exporter import PrometheusExporter
from compactor.metrics import (
    BUSY_RUNS,
    BYTES_PUBLISHED,
    CHECKPOINT_BYTES,
    ENTRIES_APPLIED,
    FIGURES,
    LAG,
    LOST_LEASES,
    POISON_ENTRIES,
    TAIL_BYTES,
    failure_figures,
    lag_figures,
    run_figures,
)
from compactor.runner import CompactionResult
from deltalog.errors import CorruptEntry, LeaseLost, Unavailable, UntrustedEntry

APPLIED = CompactionResult(
    "applied",
    "r",
    3,
    7,
    entries_applied=4,
    vectors_upserted=9,
    snapshot_key="k",
    snapshot_size=512,
    checkpoint="ratio",
)


def test_every_run_reports_every_run_figure() -> None:
    applied = run_figures(APPLIED)
    assert applied[ENTRIES_APPLIED] == 4 and applied[BYTES_PUBLISHED] == 512
    assert applied[BUSY_RUNS] == 0
    tail_only = run_figures(replace(APPLIED, checkpoint=""))  # committed hwm, uploaded nothing
    assert tail_only[ENTRIES_APPLIED] == 4 and tail_only[BYTES_PUBLISHED] == 0
    requested = run_figures(replace(APPLIED, status="checkpointed", entries_applied=0))
    assert requested[BYTES_PUBLISHED] == 512
    busy = run_figures(CompactionResult("busy", "r", 3, 3, stopped="held"))
    assert busy[BUSY_RUNS] == 1 and busy[BYTES_PUBLISHED] == 0
    assert set(applied) == set(FIGURES) - {LAG}
    # The committed state's size, after any run that read it (a busy one did not).
    assert set(busy) == set(applied) - {CHECKPOINT_BYTES, TAIL_BYTES}
    assert (applied[CHECKPOINT_BYTES], applied[TAIL_BYTES]) == (
        APPLIED.snapshot_size,
        APPLIED.tail_bytes,
    )


def test_failures_name_lost_leases_and_poison_entries() -> None:
    assert failure_figures(LeaseLost("gone")) == {LOST_LEASES: 1, POISON_ENTRIES: 0}
    assert failure_figures(UntrustedEntry("forged", seq=3)) == {LOST_LEASES: 0, POISON_ENTRIES: 1}
    assert failure_figures(CorruptEntry("bad", seq=3))[POISON_ENTRIES] == 1
    assert failure_figures(Unavailable("down")) == {LOST_LEASES: 0, POISON_ENTRIES: 0}
    assert lag_figures(10, 4) == {LAG: 6} and lag_figures(4, 4) == {LAG: 0}


def test_the_exporter_serves_the_figures_per_log() -> None:
    with PrometheusExporter() as exporter:
        exporter.track("quiet")
        exporter.record("r", run_figures(APPLIED))
        exporter.record("r", run_figures(APPLIED))
        exporter.record("r", lag_figures(9, 7))
        port = exporter.serve(0, "127.0.0.1")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    assert 'deltalog_entries_applied_total{log="r"} 8.0' in text
    assert 'deltalog_lag_entries{log="r"} 2.0' in text
    assert 'deltalog_entries_applied_total{log="quiet"} 0.0' in text
    assert 'deltalog_run_seconds_count{log="r"} 2.0' in text
