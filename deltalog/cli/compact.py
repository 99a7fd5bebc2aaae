"""The compactor's commands: ``compact``, ``rebuild``, ``verify``, ``export``, ``quarantine``.

Exit
status: 0 done (applied, nothing to do, verified equal), 1 an error, 3 the
lease is busy (``rebuild --publish``: still busy after ``--wait``), 4
``verify`` found differences (or an index recall below ``--min-recall``).
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from compactor.checkpoint import (
    DEFAULT_MAX_TAIL_BYTES,
    DEFAULT_MAX_TAIL_ENTRIES,
    DEFAULT_RATIO,
    MIN_AUTO_TAIL_ENTRIES,
    parse_entry_cap,
)
from compactor.cut import export_cut
from compactor.exporter import PrometheusExporter
from compactor.follow import follow_log
from compactor.metrics import failure_figures, lag_figures, run_figures
from compactor.publish import DEFAULT_COMPRESSION
from compactor.replay import Limits, Progress
from compactor.runner import (
    DEFAULT_LEASE_WAIT,
    CompactionResult,
    Compactor,
    ExportResult,
    RebuildResult,
)
from compactor.shards import DEFAULT_RETIRE_GRACE, ShardedCompactor, ShardOutcome
from compactor.verify import DEFAULT_INDEX_QUERIES, DEFAULT_MIN_RECALL, VerifyResult
from deltalog.cli.options import add_location_flags, add_output_flags, argument, config_from
from deltalog.cli.process import (
    EXIT_BUSY,
    EXIT_DIFFERENT,
    EXIT_USAGE,
    exit_on_signal,
    first_deltalog_error,
    interruptible,
    stop_on_signal,
)
from deltalog.cli.progress import ProgressDisplay, compaction_progress, shards_progress
from deltalog.config import LogConfig, parse_size
from deltalog.errors import InvalidInput, LeaseBusy
from deltalog.log import DeltaLog
from deltalog.shards import current_shards, read_states
from deltalog.snapshot.archive import DEFAULT_ZSTD_LEVEL
from deltalog.storage.table import LogState

__all__ = ["register"]


def compactor_options(
    args: argparse.Namespace, progress: Callable[[Progress], None] | None
) -> dict[str, Any]:
    """The ``Compactor`` options the flags give."""
    return {
        "cache_dir": args.cache_dir,
        "lease_ttl": args.lease_ttl,
        "grace": args.grace,
        "limits": Limits(args.max_entries, args.max_bytes, args.max_seconds),
        "retain": args.retain,
        "orphan_grace": args.orphan_grace,
        "compression": args.compression,
        "compression_level": args.compression_level,
        "checkpoint_ratio": args.checkpoint_ratio,
        "max_tail_entries": args.max_tail_entries,
        "max_tail_bytes": args.max_tail_bytes or None,
        "progress": progress,
    }


def compactor_config(args: argparse.Namespace, log: str | None = None) -> LogConfig:
    config = config_from(args, log)
    if args.part_size is not None:
        config = replace(config, part_size=args.part_size)
    return config


def _compactor(
    args: argparse.Namespace,
    log: str | None = None,
    *,
    progress: Callable[[Progress], None] | None = None,
) -> Compactor:
    return Compactor(compactor_config(args, log), **compactor_options(args, progress))


def _sharded(
    args: argparse.Namespace,
    log: str | None = None,
    *,
    progress: Callable[[Progress], None] | None = None,
) -> ShardedCompactor:
    """Every shard of the log (one ``Compactor`` for a log without shards), or ``--shard``."""
    shard = getattr(args, "shard", None)
    return ShardedCompactor(
        compactor_config(args, log),
        shards=None if shard is None else [shard],
        concurrency=getattr(args, "concurrency", None),
        retire_grace=getattr(args, "retire_grace", DEFAULT_RETIRE_GRACE),
        **compactor_options(args, progress),
    )


async def _head(args: argparse.Namespace) -> int | None:
    """The log's head, for the progress bar's total (None when quiet: not worth a request)."""
    if args.quiet:
        return None
    async with DeltaLog.open(config_from(args)) as log:
        return await log.head()


def _display(args: argparse.Namespace, label: str) -> ProgressDisplay:
    return ProgressDisplay(label, unit="seqs", quiet=args.quiet)


def _print_result(result: CompactionResult, as_json: bool) -> None:
    print(json.dumps(asdict(result), sort_keys=True) if as_json else result.summary(), flush=True)


async def cmd_compact(args: argparse.Namespace) -> int:
    if args.follow and args.checkpoint:
        raise InvalidInput(
            "--checkpoint publishes in one run; with --follow use --checkpoint-ratio 0 to "
            "publish in every run"
        )
    if args.metrics_port is not None and not args.follow:
        print("deltalog compact: --metrics-port needs --follow", file=sys.stderr)
        return EXIT_USAGE
    if args.follow:
        try:
            return await _follow(args)
        except ExceptionGroup as group:
            # A log's task stopped the daemon (a setup error): report it as
            # any command does, not as a task group's traceback.
            error = first_deltalog_error(group)
            if error is None:
                raise
            raise error from group
    head = await _head(args)
    started = time.time()
    with _display(args, config_from(args).log) as display:

        async def run() -> list[ShardOutcome]:
            async with _sharded(args, progress=shards_progress(display, head)) as sharded:
                return await sharded.run_each(checkpoint=args.checkpoint)

        outcomes = await interruptible(run)
    if isinstance(outcomes, signal.Signals):
        await _report_interrupted(args, started, display.completed)
        return exit_on_signal(outcomes)
    for outcome in outcomes:
        if outcome.result is not None:
            _print_result(outcome.result, args.json)
    failed = [o.error for o in outcomes if o.error is not None]
    for failure in failed[1:]:
        print(f"deltalog: {type(failure).__name__}: {failure}", file=sys.stderr)
    if failed:
        raise failed[0]
    busy = any(o.result is not None and o.result.status == "busy" for o in outcomes)
    return EXIT_BUSY if busy else 0


async def _positions(args: argparse.Namespace) -> tuple[int, list[tuple[str, LogState]]]:
    """The log's head, and the committed state of each shard the command works on (the
    log's own state for a log without shards), named as results name them."""
    async with DeltaLog.open(config_from(args)) as log:
        shards = current_shards(await log.table.read_layout(log.keys.log_id))
        chosen = getattr(args, "shard", None)
        if chosen is not None and shards != [None]:
            shards = [s for s in shards if s is not None and s.index == chosen]
        states = await read_states(log.table, log.keys, shards)
        head = await log.head()
    name = config_from(args).log
    named = [(name if s is None else f"{name} shard {s.index}") for s in shards]
    return head, list(zip(named, states, strict=True))


async def _report_interrupted(args: argparse.Namespace, started: float, passed: int) -> None:
    """What an interrupted run did and did not do, read back from the committed state of
    each shard it ran (its last run, recorded when the stopped run released the lease)."""
    head, positions = await _positions(args)
    for name, state in positions:
        hwm = state.hwm
        run = json.loads(state.last_run) if state.last_run else {}
        ours = run.get("status") == "interrupted" and float(run.get("at", 0)) >= started
        hwm_before = int(run["hwm_before"]) if ours else hwm
        if hwm > hwm_before:
            done = f"hwm {hwm_before} -> {hwm} was committed before it stopped"
        else:
            done = f"nothing was committed (hwm stays {hwm}"
            applied = passed if len(positions) == 1 else 0
            done += f"; the {applied} seqs it had applied were discarded)" if applied else ")"
        left = (
            f"{head - hwm} seqs up to the head {head} are not applied"
            if head > hwm
            else "none left"
        )
        print(
            f"{name}: compact interrupted: {done}; {left}. Run the same command again: it "
            "starts from the committed state, so nothing is applied twice",
            file=sys.stderr,
        )


async def _follow(args: argparse.Namespace) -> int:
    names = [n for item in (args.logs or [args.log]) for n in (item or "").split(",") if n] or [
        None
    ]
    logs = [_sharded(args, name) for name in names]
    async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
        await tg.start(stop_on_signal, tg.cancel_scope)
        for sharded in logs:
            await stack.enter_async_context(sharded)
        exporter = _exporter(args, logs, stack)
        print(
            f"following {', '.join(_following(s) for s in logs)}; SIGINT or SIGTERM stops",
            file=sys.stderr,
            flush=True,
        )
        for sharded in logs:
            tg.start_soon(
                functools.partial(
                    follow_log,
                    sharded,
                    poll_min=args.poll_min,
                    poll_max=args.poll_max,
                    on_result=lambda r: _on_result(r, args.json, exporter),
                    on_error=lambda c, exc: _on_error(c, exc, exporter),
                    on_lag=(
                        (
                            lambda c, head, hwm: exporter.record(
                                c.config.log, lag_figures(head, hwm), _index(c)
                            )
                        )
                        if exporter is not None
                        else None
                    ),
                )
            )
    print("stopped; leases released", file=sys.stderr)
    return 0


def _following(sharded: ShardedCompactor) -> str:
    """How the daemon names a log it follows: ``receipts`` or ``receipts (4 shards)``."""
    count = len(sharded.compactors)
    return (
        sharded.config.log
        if not sharded.layout.sharded
        else f"{sharded.config.log} ({count} shards)"
    )


def _index(compactor: Compactor) -> int | None:
    return None if compactor.shard is None else compactor.shard.index


def _exporter(
    args: argparse.Namespace, logs: list[ShardedCompactor], stack: AsyncExitStack
) -> PrometheusExporter | None:
    """With ``--metrics-port``: serve the compactor's figures for Prometheus."""
    if args.metrics_port is None:
        return None
    exporter = stack.enter_context(PrometheusExporter())
    for sharded in logs:
        for compactor in sharded.current:
            exporter.track(sharded.config.log, _index(compactor))
    try:
        port = exporter.serve(args.metrics_port, args.metrics_addr)
    except OSError as exc:
        raise InvalidInput(
            f"cannot serve metrics on {args.metrics_addr}:{args.metrics_port}: {exc}"
        ) from exc
    print(f"metrics on http://{args.metrics_addr}:{port}/metrics", file=sys.stderr, flush=True)
    return exporter


def _on_result(
    result: CompactionResult, as_json: bool, exporter: PrometheusExporter | None
) -> None:
    _print_result(result, as_json)
    if exporter is not None:
        exporter.record(result.log, run_figures(result), result.shard)


def _on_error(compactor: Compactor, exc: Exception, exporter: PrometheusExporter | None) -> None:
    name = compactor.config.log
    which = name if compactor.shard is None else f"{name} shard {compactor.shard.index}"
    print(f"{which}: {type(exc).__name__}: {exc}", file=sys.stderr)
    if exporter is not None:
        exporter.record(name, failure_figures(exc), _index(compactor))


async def cmd_rebuild(args: argparse.Namespace) -> int:
    head = args.to_seq or await _head(args)
    with _display(args, "rebuild") as display:

        async def run() -> list[RebuildResult]:
            async with _sharded(args, progress=shards_progress(display, head)) as sharded:
                return await sharded.rebuild(
                    args.to_seq, publish=args.publish, force=args.force, wait=args.wait
                )

        try:
            results = await interruptible(run)
        except LeaseBusy as exc:
            print(f"deltalog: {type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_BUSY
    if isinstance(results, signal.Signals):
        what = (
            "the committed state changed only if its commit landed before the stop "
            "(`deltalog status` says)"
            if args.publish
            else "nothing was published"
        )
        print(
            f"{config_from(args).log}: rebuild interrupted: an upload in progress was aborted; "
            f"{what}. Run it again to rebuild",
            file=sys.stderr,
        )
        return exit_on_signal(results)
    for result in results:
        if args.json:
            print(json.dumps(asdict(result), sort_keys=True))
            continue
        what = "published as the committed snapshot" if result.published else "not published"
        print(
            f"{result.name}: rebuilt to seq {result.hwm} from {result.entries} entries, "
            f"{result.vectors_upserted} vectors in {result.seconds:.1f}s; snapshot "
            f"{result.snapshot_key} ({result.snapshot_size} bytes), {what}"
        )
    return 0


async def cmd_verify(args: argparse.Namespace) -> int:
    _, positions = await _positions(args)
    hwm = max(state.hwm for _, state in positions)
    with ProgressDisplay("verify: committed copy", unit="seqs", quiet=args.quiet) as display:
        progress = (
            _verify_progress(display, hwm) if len(positions) == 1 else shards_progress(display)
        )
        async with _sharded(args, progress=progress) as sharded:
            results = await sharded.verify(
                index_queries=args.index_queries, min_recall=args.min_recall
            )
    for result in results:
        if args.json:
            index = result.index
            extra = {"index_recall": index.lowest if index else None}
            print(json.dumps({**asdict(result), **extra, "ok": result.ok}, sort_keys=True))
            continue
        for line in result.differences:
            print(line)
        more = result.difference_count - len(result.differences)
        if more > 0:
            print(f"... and {more} more differences")
        verdict = "equal" if result.ok else f"{result.difference_count} differences"
        which = "" if result.shard is None else f" of shard {result.shard}"
        print(f"verify{which} at hwm {result.hwm}: {result.records} records, {verdict}")
        print(_index_line(result))
    return 0 if all(result.ok for result in results) else EXIT_DIFFERENT


def _verify_progress(display: ProgressDisplay, hwm: int) -> Callable[[Progress], None]:
    """Verify's steps: the committed copy (no count), the rebuild (seqs), then the
    comparison of the records and the index check."""
    rebuild = compaction_progress(display, hwm)

    def report(progress: Progress) -> None:
        if display.label != "verify: rebuild":
            display.stage("verify: rebuild", unit="seqs", total=hwm)
        rebuild(progress)
        if progress.seq >= hwm:
            display.stage("verify: compare and check the index", unit="records")

    return report


def _index_line(result: VerifyResult) -> str:
    index = result.index
    if index is None:
        return "index check skipped (--index-queries 0)"
    if index.lowest is None:
        return "index check: no records to query"
    return (
        f"index recall@10 {index.lowest:.4f} over {index.queries} sampled queries "
        f"(threshold {index.min_recall}): {'ok' if index.ok else 'BELOW'}"
    )


def _fraction(text: str) -> float:
    value = float(text) if text.replace(".", "", 1).isdigit() else -1.0
    if not 0.0 <= value <= 1.0:
        raise InvalidInput(f"expected a number from 0 to 1, not {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise InvalidInput(f"expected a whole number of at least 0, not {text!r}")
    return int(text)


async def cmd_export(args: argparse.Namespace) -> int:
    with ProgressDisplay("export", unit="records", quiet=args.quiet) as display:
        async with _sharded(args) as sharded:
            if not sharded.layout.sharded and not args.per_shard:
                return _print_export(await sharded.current[0].export(args.out), args.json)
            result = await export_cut(
                sharded,
                args.out,
                per_shard=args.per_shard,
                progress=lambda done, total: display.update(done, total=total),
            )
    if args.json:
        print(json.dumps(asdict(result), sort_keys=True, default=str))
    else:
        records = sum(result.counts.values())
        layout = "one directory per shard" if result.per_shard else "one Chroma directory"
        print(
            f"{result.log}: exported {result.shards} shards at seq {result.hwm} (the greatest "
            f"committed shard hwm) to {result.path}, {layout}: {records} records"
        )
    return 0


def _print_export(result: ExportResult, as_json: bool) -> int:
    if as_json:
        print(json.dumps(asdict(result), sort_keys=True, default=str))
    else:
        records = sum(result.counts.values())
        print(
            f"{result.log}: exported hwm {result.hwm} to {result.path}: checkpoint at seq "
            f"{result.snapshot_hwm} plus {result.tail_entries} tail entries, {records} records"
        )
    return 0


async def cmd_quarantine(args: argparse.Namespace) -> int:
    from deltalog.codec import Frame, seal_body
    from deltalog.entry import Seal

    config = config_from(args)
    if not args.reason.strip():
        raise InvalidInput("--reason must say why the entry is quarantined")
    async with DeltaLog.open(config) as log:
        layout = await log.table.read_layout(log.keys.log_id)
        shards = await read_states(log.table, log.keys, current_shards(layout))
        hwm = min(state.hwm for state in shards)
        if args.seq <= hwm:
            raise InvalidInput(
                f"seq {args.seq} is at or below the committed hwm {hwm}: already applied",
                log=config.log,
            )
        if args.seq > await log.head():
            raise InvalidInput(f"seq {args.seq} was never reserved", log=config.log)
        await log.table.quarantine(log.keys.log_id, args.seq, args.reason, now=time.time())
        seal = Seal(
            sealed_by="quarantine", reason=args.reason, kind="quarantine", sealed_at=time.time()
        )
        filled = await log.store.put_if_absent(
            log.keys.entry(args.seq), Frame(seal_body(seal)).at(args.seq, signer=config.signer)
        )
    what = "was missing: sealed" if filled else "kept in the log, compaction passes it as a seal"
    print(f"{config.log}: seq {args.seq} quarantined ({what})")
    return 0


def add_compactor_flags(parser: argparse.ArgumentParser) -> None:
    add_location_flags(parser)
    group = parser.add_argument_group("compaction")
    group.add_argument(
        "--cache-dir", type=Path, default=Path(".deltalog/cache"), help="local snapshot cache"
    )
    group.add_argument("--lease-ttl", type=float, default=30.0, help="lease time to live (s)")
    group.add_argument("--grace", type=float, default=60.0, help="seal holes older than this (s)")
    group.add_argument("--max-entries", type=int, help="stop a run after this many entries")
    group.add_argument("--max-bytes", type=int, help="stop a run after reading this many bytes")
    group.add_argument("--max-seconds", type=float, help="stop reading after this many seconds")
    group.add_argument("--retain", type=int, default=3, help="committed snapshots to keep")
    group.add_argument(
        "--orphan-grace",
        type=float,
        default=3600.0,
        help="delete snapshots no commit references once this old (s)",
    )
    group.add_argument(
        "--compression",
        choices=["none", "zstd"],
        default=DEFAULT_COMPRESSION,
        help=f"snapshot archives (default {DEFAULT_COMPRESSION})",
    )
    group.add_argument(
        "--compression-level",
        type=int,
        default=DEFAULT_ZSTD_LEVEL,
        help=f"zstd level, 1-22 (default {DEFAULT_ZSTD_LEVEL})",
    )
    group.add_argument(
        "--part-size",
        type=argument(parse_size),
        help="archive transfers in parts of this size, e.g. 16MiB (default 8MiB)",
    )
    checkpoints = parser.add_argument_group("checkpoints (when a run publishes a snapshot)")
    checkpoints.add_argument(
        "--checkpoint-ratio",
        type=float,
        default=DEFAULT_RATIO,
        help="publish once the committed tail's bytes reach this share of the checkpoint's "
        f"(default {DEFAULT_RATIO}; 0 publishes every run)",
    )
    checkpoints.add_argument(
        "--max-tail-entries",
        type=argument(parse_entry_cap),
        default=DEFAULT_MAX_TAIL_ENTRIES,
        help="publish once the tail holds this many seqs (default auto: one per 64 KiB of "
        f"checkpoint, at least {MIN_AUTO_TAIL_ENTRIES:,}; 0: no cap)",
    )
    checkpoints.add_argument(
        "--max-tail-bytes",
        type=argument(parse_size),
        default=DEFAULT_MAX_TAIL_BYTES,
        help="publish once the tail's entries reach this size (default 256MiB; 0: no cap)",
    )
    add_output_flags(parser)


def _add_shard_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shard",
        type=int,
        metavar="I",
        help="only shard I of a sharded log (default: every shard, concurrently)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="at most N shards at once (default: all of them)",
    )


def register(commands: Any) -> None:
    """Add ``compact``, ``rebuild``, ``verify`` and ``quarantine`` to the ``deltalog`` parser."""
    compact = commands.add_parser("compact", help="apply new entries to the snapshot (one run)")
    add_compactor_flags(compact)
    compact.add_argument("--follow", action="store_true", help="keep compacting as entries arrive")
    compact.add_argument(
        "--checkpoint",
        action="store_true",
        help="publish a checkpoint in this run, whatever the policy says",
    )
    compact.add_argument(
        "--logs", action="append", help="with --follow: logs to follow (repeat or comma-separate)"
    )
    _add_shard_flag(compact)
    compact.add_argument(
        "--retire-grace",
        type=float,
        default=DEFAULT_RETIRE_GRACE,
        metavar="SECONDS",
        help="delete a replaced generation's checkpoints this long after a reshard "
        f"(default {DEFAULT_RETIRE_GRACE:g})",
    )
    compact.add_argument("--poll-min", type=float, default=0.5, help="fastest poll (s)")
    compact.add_argument("--poll-max", type=float, default=10.0, help="slowest poll (s)")
    compact.add_argument(
        "--metrics-port",
        type=int,
        help="with --follow: serve Prometheus metrics on this port (0 picks a free one)",
    )
    compact.add_argument(
        "--metrics-addr", default="0.0.0.0", help="the address the metrics server binds"
    )
    compact.set_defaults(run=cmd_compact)

    rebuild = commands.add_parser("rebuild", help="replay the log from seq 1 into a new snapshot")
    add_compactor_flags(rebuild)
    rebuild.add_argument("--to-seq", type=int, help="stop at this seq")
    rebuild.add_argument("--publish", action="store_true", help="make it the committed snapshot")
    rebuild.add_argument("--force", action="store_true", help="allow publishing a lower hwm")
    rebuild.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_LEASE_WAIT,
        metavar="SECONDS",
        help="with --publish: wait this long for a busy lease before exiting 3 "
        f"(default {DEFAULT_LEASE_WAIT:g})",
    )
    _add_shard_flag(rebuild)
    rebuild.set_defaults(run=cmd_rebuild)

    verify = commands.add_parser("verify", help="compare a rebuild with the committed snapshot")
    add_compactor_flags(verify)
    _add_shard_flag(verify)
    verify.add_argument(
        "--index-queries",
        type=argument(_count),
        default=DEFAULT_INDEX_QUERIES,
        help="sampled queries per collection for the index check, against brute force "
        f"(default {DEFAULT_INDEX_QUERIES}; 0 skips the check)",
    )
    verify.add_argument(
        "--min-recall",
        type=argument(_fraction),
        default=DEFAULT_MIN_RECALL,
        help=f"fail when the index's recall@10 is below this (default {DEFAULT_MIN_RECALL})",
    )
    verify.set_defaults(run=cmd_verify)

    export = commands.add_parser(
        "export", help="write a plain Chroma directory at the committed hwm"
    )
    add_compactor_flags(export)
    export.add_argument("--out", type=Path, required=True, help="a new (or empty) directory")
    export.add_argument(
        "--per-shard",
        action="store_true",
        help="a sharded log: one directory per shard (shard-0, ...), nothing re-inserted",
    )
    _add_shard_flag(export)
    export.set_defaults(run=cmd_export)

    quarantine = commands.add_parser("quarantine", help="let compaction pass a poison entry")
    add_location_flags(quarantine)
    quarantine.add_argument("--seq", type=int, required=True)
    quarantine.add_argument("--reason", required=True)
    quarantine.set_defaults(run=cmd_quarantine)
