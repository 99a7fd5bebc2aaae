"""``python -m benchmarks [--quick | --smoke] [--out DIR]``: run every benchmark, report."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import anyio

from benchmarks.append import run_append
from benchmarks.baseline import run_baseline
from benchmarks.checkpoints import CheckpointFigures, run_checkpoints
from benchmarks.codec import run_codec
from benchmarks.compaction import run_compaction
from benchmarks.compression import run_compression
from benchmarks.embed import run_embed
from benchmarks.fresh import run_fresh
from benchmarks.freshness import run_freshness
from benchmarks.harness import Endpoint, load_average, machine_info, progress
from benchmarks.incremental import run_incremental
from benchmarks.pipeline import run_pipeline
from benchmarks.plots import write_plots
from benchmarks.recall import run_recall
from benchmarks.report import Results, render_table, write_json
from benchmarks.settings import Mode, Sizes, sizes_for
from benchmarks.shards import run_shards
from benchmarks.stages import run_stages
from benchmarks.workload import ReceiptData, receipts
from deltalog.keys import LogKeys
from deltalog.storage.store import ObjectStore

__all__ = ["BENCHMARKS", "main"]

BENCHMARKS = (
    "codec",
    "embed",
    "recall",
    "append",
    "compaction",
    "incremental",
    "fresh",
    "baseline",
    "checkpoints",
    "compression",
    "stages",
    "pipeline",
    "shards",
    "freshness",
    "proxy",
)
"""In the order they run; ``proxy`` is append and compaction through the latency proxy;
``compression`` measures the largest checkpoint ``checkpoints`` builds, so it needs it."""
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
T = TypeVar("T")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="deltalog's throughput as ratios to raw S3, raw chromadb and the old pipeline",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes: under 5 min on 2 cores")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, for CI: under 90 s")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="default: benchmarks/results/"
    )
    parser.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all)",
    )
    parser.add_argument("--seed", type=int, default=20240501)
    return parser


class _Runner:
    def __init__(self, results: Results, wanted: set[str]) -> None:
        self.results = results
        self.wanted = wanted

    async def step(self, name: str, call: Callable[[], Awaitable[T]]) -> T | None:
        if name not in self.wanted:
            return None
        progress(f"--- {name}")
        started = time.perf_counter()
        value = await call()
        self.results.timings[name] = time.perf_counter() - started
        return value


async def _run(sizes: Sizes, wanted: set[str], seed: int, results: Results) -> None:
    runner = _Runner(results, wanted)
    pool = receipts(32 if sizes.mode != "smoke" else 4, seed=seed, dim=sizes.dim)
    compaction = receipts(sizes.compaction_receipts, seed=seed + 10, dim=sizes.dim)
    if "codec" in wanted:
        started = time.perf_counter()
        results.codec = run_codec(sizes, pool[: sizes.codec_receipts])
        results.timings["codec"] = time.perf_counter() - started
    if "embed" in wanted:
        started = time.perf_counter()
        texts = receipts(sizes.embed_receipts, seed=seed + 30, dim=sizes.dim)
        results.embed = run_embed(sizes, texts, seed=seed + 30)
        results.timings["embed"] = time.perf_counter() - started
    results.recall = await runner.step("recall", lambda: run_recall(sizes, seed=seed))
    async with Endpoint(low_ms=sizes.proxy_low_ms, high_ms=sizes.proxy_high_ms) as env:
        results.append = (
            await runner.step("append", lambda: run_append(env, sizes, pool, proxied=False)) or []
        )
        results.compaction = await runner.step(
            "compaction", lambda: run_compaction(env, sizes, compaction, proxied=False)
        )
        results.incremental = (
            await runner.step("incremental", lambda: run_incremental(env, sizes)) or []
        )
        results.fresh = await runner.step("fresh", lambda: run_fresh(env, sizes, seed)) or []
        e2e = receipts(sizes.baseline_receipts, seed=seed + 20, dim=sizes.dim)
        results.e2e = await runner.step("baseline", lambda: run_baseline(env, sizes, e2e))
        results.checkpoints = await runner.step(
            "checkpoints", lambda: _checkpoints(env, sizes, wanted, results)
        )
        results.stages = await runner.step(
            "stages", lambda: run_stages(env, sizes, e2e[: sizes.stage_receipts])
        )
        flow = receipts(sizes.pipeline_receipts, seed=seed + 40, dim=sizes.dim)
        results.pipeline = await runner.step("pipeline", lambda: run_pipeline(env, sizes, flow))
        results.shards = await runner.step("shards", lambda: run_shards(env, sizes, seed + 50))
        results.freshness = await runner.step("freshness", lambda: run_freshness(env, sizes, seed))
        await runner.step("proxy", lambda: _through_proxy(env, sizes, pool, compaction, results))


async def _checkpoints(
    env: Endpoint, sizes: Sizes, wanted: set[str], results: Results
) -> CheckpointFigures:
    """The checkpoint benchmark; the compression table on its largest checkpoint if wanted."""

    async def compression(store: ObjectStore, keys: LogKeys, directory: Path) -> None:
        started = time.perf_counter()
        results.compression = await run_compression(
            store, keys, directory, sizes.compression_levels
        )
        results.timings["compression"] = time.perf_counter() - started

    on_largest = compression if "compression" in wanted else None
    return await run_checkpoints(env, sizes, on_largest=on_largest)


async def _through_proxy(
    env: Endpoint,
    sizes: Sizes,
    pool: list[ReceiptData],
    compaction: list[ReceiptData],
    results: Results,
) -> None:
    """Append and compaction again, every request delayed 20-100 ms."""
    results.append += await run_append(env, sizes, pool, proxied=True)
    raw = results.compaction.raw_chroma if results.compaction else []
    subset = compaction[: sizes.proxy_compaction_receipts]
    results.compaction_proxy = await run_compaction(env, sizes, subset, proxied=True, raw=raw)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    mode: Mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = sizes_for(mode)
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = wanted - set(BENCHMARKS)
    if unknown:
        _parser().error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    if "compression" in wanted and "checkpoints" not in wanted:
        _parser().error(
            "compression measures the checkpoints benchmark's snapshot: add checkpoints"
        )
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    results = Results(
        mode=mode,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=machine_info(),
        parameters={**dataclasses.asdict(sizes), "seed": args.seed, "only": sorted(wanted)},
    )
    anyio.run(_run, sizes, wanted, args.seed, results)
    results.seconds = time.perf_counter() - started
    results.machine["load_average_at_end"] = load_average()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    write_json(results, out / "results.json")
    (out / f"results-{stamp}.json").write_bytes((out / "results.json").read_bytes())
    plots = write_plots(results, out)
    table = render_table(results)
    (out / "results.txt").write_text(table)
    print(table)
    print(f"results: {out / 'results.json'}; plots: {', '.join(p.name for p in plots)}")
    return 0
