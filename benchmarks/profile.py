"""``python -m benchmarks.profile``: where the follower's CPU goes beyond Chroma's.

Runs the overlapped pipeline (``benchmarks.pipeline``: producers and
``compact --follow`` in a child process) with the child profiled
(``benchmarks.profiling``), then raw chromadb upserting the same records in
this process, and attributes the follower's CPU per vector:

- Chroma's native threads (its runtime: HNSW inserts, SQLite), the
  follower's against raw chromadb's;
- Chroma's ``add`` in the calling thread (its Python validation and the
  bindings' call), against raw chromadb's upserts;
- deltalog's own work: the main thread's CPU split in the proportions of
  py-spy's samples of it (by the innermost frame of a known module), and
  timed calls in its worker threads: batching records for Chroma, the
  existence check before an ``add``, counts;
- what is left in worker threads (archives and uploads of checkpoints,
  thread hand-offs).

Prints the table and writes ``profile.json`` (and the child's samples) under
``--out``. Needs py-spy for the main thread's split (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import anyio

from benchmarks.harness import Endpoint, raw_chroma_upsert
from benchmarks.pipeline import OverlapFigures, run_pipeline
from benchmarks.profiling import ENV, ThreadCpu
from benchmarks.settings import sizes_for
from benchmarks.tables import table
from benchmarks.workload import ReceiptData, receipts

__all__ = ["main"]

NATIVE = ("tokio-rt-worker", "sqlx-sqlite-wor")
"""Chroma's own threads (by name)."""
MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "entry decode + verify (checksums, msgspec, validation)",
        (
            "deltalog/codec.py",
            "deltalog/validate.py",
            "deltalog/entry.py",
            "deltalog/signing.py",
            "msgspec",
            "zlib",
        ),
    ),
    ("fold", ("deltalog/fold.py",)),
    (
        "publish: archive + zstd + upload (main thread)",
        (
            "compactor/publish.py",
            "deltalog/snapshot/archive.py",
            "deltalog/storage/transfer.py",
            "tarfile.py",
            "zstandard",
            "_hashlib",
            "hashlib",
        ),
    ),
    (
        "requests: S3 reads, lease, commit (aiobotocore, botocore, aiohttp)",
        (
            "aiobotocore",
            "botocore",
            "aiohttp",
            "yarl",
            "multidict",
            "urllib",
            "ssl",
            "socket",
            "email",
            "http/",
            "deltalog/storage/",
            "deltalog/read.py",
            "json",
            "dateutil",
            "datetime",
            "xml",
            "base64",
            "hmac",
            "_strptime",
            "uuid",
            "re/",
            "sre_",
            "_sre",
            "isoparse",
        ),
    ),
    ("heartbeat, replay, runner, follow (compactor/*)", ("compactor/", "deltalog/log.py")),
    (
        "event loop and thread hand-offs (asyncio, anyio, threading)",
        (
            "asyncio",
            "anyio",
            "threading.py",
            "concurrent/futures",
            "selectors.py",
            "sniffio",
            "contextvars",
            "_contextvars",
            "select.",
            "queue.py",
        ),
    ),
    ("Chroma sink calls from the loop (deltalog/snapshot)", ("deltalog/snapshot/",)),
)


_POLLS = "follow: polls between runs (head, state)"
OWNERS = (
    ("startup: S3 and DynamoDB clients (service models, connectors)", "DeltaLog.connect"),
    ("startup: S3 and DynamoDB clients (service models, connectors)", "_create_connector"),
    ("heartbeat (lease renewals)", "LeaseKeeper.heartbeat"),
    ("publish: archive + zstd + upload (main thread)", "compactor/publish.py"),
    ("progress reports", "compaction_progress"),
    (_POLLS, "_Watch.step"),
)
"""Buckets decided by a frame anywhere in the stack (what a request was made for)."""
_IDLE = ("epoll", "select (", "poll (", "wait (", "sleep", "acquire (", "_wait_for_tstate_lock")


def _bucket(stack: str) -> str | None:
    """The bucket of one sampled stack of the main thread (innermost known frame), or None
    when the thread was waiting."""
    frames = [f for f in stack.split(";")[1:] if f]
    if frames and any(k in frames[-1] for k in _IDLE):
        return None
    for name, marker in OWNERS:
        if marker in stack and (name != _POLLS or "run_once" not in stack):
            return name
    for frame in reversed(frames):
        for name, keys in MODULES:
            if any(k in frame for k in keys):
                return name
    return "other (main thread)"


def main_thread_buckets(path: Path, seconds: float) -> dict[str, float]:
    """The main thread's CPU ``seconds`` split in the proportions of py-spy's busy samples."""
    counts: dict[str, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if "MainThread" not in stack.split(";", 1)[0]:
                continue
            name = _bucket(stack)
            if name is not None:
                counts[name] = counts.get(name, 0) + int(n)
    busy = sum(counts.values())
    if not busy:
        return {"main thread (py-spy not installed: not split)": seconds}
    return {name: seconds * n / busy for name, n in counts.items()}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 3) for k, v in after.items()}


async def _raw(flow: list[ReceiptData]) -> dict[str, float]:
    """Raw chromadb's CPU by thread kind, upserting ``flow`` in this process."""
    meter = ThreadCpu().start()  # sampled meanwhile: Chroma's SQLite thread ends with its client
    before = meter.by_kind()
    await raw_chroma_upsert(flow)
    meter.stop()
    return _delta(meter.by_kind(), before)


async def _run(receipts_count: int, out: Path, seed: int) -> dict[str, Any]:
    sizes = replace(sizes_for("quick"), pipeline_receipts=receipts_count)
    flow = receipts(receipts_count, seed=seed + 40, dim=sizes.dim)
    child_dir = out / "child"
    os.environ[ENV] = str(child_dir)
    try:
        async with Endpoint(low_ms=sizes.proxy_low_ms, high_ms=sizes.proxy_high_ms) as env:
            await raw_chroma_upsert(flow[:2])  # Chroma's lazy imports, outside the figures
            figures = await run_pipeline(env, sizes, flow)
            raw = await _raw(flow)
    finally:
        os.environ.pop(ENV, None)
    child = json.loads((child_dir / "profile.json").read_text())
    main_cpu = child["threads"].get("main", 0.0)
    buckets = main_thread_buckets(child_dir / "py-spy.txt", main_cpu)
    return _attribution(figures, child, buckets, raw)


def _attribution(
    figures: OverlapFigures,
    child: dict[str, Any],
    main_buckets: dict[str, float],
    raw: dict[str, float],
) -> dict[str, Any]:
    vectors = figures.vectors
    threads: dict[str, float] = child["threads"]
    calls: dict[str, float] = child["calls"]
    per = 1e6 / vectors
    native = sum(threads.get(k, 0.0) for k in NATIVE)
    raw_native = sum(raw.get(k, 0.0) for k in NATIVE)
    raw_calling = sum(v for k, v in raw.items() if k not in NATIVE and k != "thread-cpu")
    workers = sum(v for k, v in threads.items() if k not in (*NATIVE, "main", "thread-cpu"))
    chroma_add = calls.get("chroma add", 0.0)
    whole_add = calls.get("sink._add (chroma add included)", 0.0)
    existence = calls.get("existence check + delete", 0.0)
    counts = calls.get("counts", 0.0)
    rows: list[tuple[str, float, float | None]] = [
        ("Chroma: native threads (HNSW, SQLite)", native, raw_native),
        ("Chroma: add in the calling thread (validation, bindings)", chroma_add, raw_calling),
        (
            "ours: batching records for Chroma (ids, rows, documents, metadata)",
            whole_add - chroma_add,
            None,
        ),
        ("ours: existence check before add (get) + delete of existing ids", existence, None),
        ("ours: counts after the replay (the checkpoint's sidecar)", counts, None),
        (
            "worker threads, the rest (checkpoint archive + zstd, open/close, hand-offs)",
            workers - whole_add - existence - counts,
            None,
        ),
    ]
    rows += [
        (f"main thread: {k}", v, None) for k, v in main_buckets.items() if not k.startswith("(")
    ]
    total = sum(v for _, v, _r in rows)
    out_rows = [
        {
            "part": name,
            "cpu_us_per_vector": round(value * per, 1),
            "raw_chroma_us_per_vector": None if raw_value is None else round(raw_value * per, 1),
        }
        for name, value, raw_value in rows
    ]
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "pipeline": asdict(figures),
        "follower_threads": threads,
        "raw_chroma_threads": raw,
        "rows": out_rows,
        "follower_us_per_vector": round(total * per, 1),
        "follower_process_us_per_vector": round(child["process_cpu_seconds"] * per, 1),
        "raw_chroma_us_per_vector": round((raw_native + raw_calling) * per, 1),
    }


def render(report: dict[str, Any]) -> str:
    rows = [
        [
            r["part"],
            f"{r['cpu_us_per_vector']:,.1f}",
            ""
            if r["raw_chroma_us_per_vector"] is None
            else f"{r['raw_chroma_us_per_vector']:,.1f}",
        ]
        for r in report["rows"]
    ]
    rows.append(
        [
            "total",
            f"{report['follower_us_per_vector']:,.1f}",
            f"{report['raw_chroma_us_per_vector']:,.1f}",
        ]
    )
    p = report["pipeline"]
    title = (
        f"Follower CPU per vector: {p['receipts']} receipts ({p['vectors']:,} vectors), "
        f"{p['runs']} runs, {p['checkpoints']} checkpoints; load average {report['load_average']}"
    )
    lines = table(title, ["part", "follower us/vector", "raw chromadb us/vector"], rows)
    lines.append(
        f"(the follower's process CPU: {report['follower_process_us_per_vector']:,.1f}; "
        f"end_to_end_vs_raw_chroma {p['vs_raw_chroma']:.2f})"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("--receipts", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile"))
    parser.add_argument("--seed", type=int, default=20240501)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = anyio.run(_run, args.receipts, args.out, args.seed)
    (args.out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    (args.out / "profile.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
