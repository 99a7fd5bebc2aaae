"""The compactor's commands: ``compact``, ``rebuild``, ``verify``, ``export``, ``quarantine``.

Exit
status: 0 done (applied, nothing to do, verified equal), 1 an error, 3 the
lease is busy (``rebuild --publish``: still busy after ``--wait``), 4
``verify`` found differences (or an index recall below ``--min-recall``).
"""

from __future__ import annotations

import argparse
import json
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
from compactor.exporter import PrometheusExporter
from compactor.follow import follow
from compactor.metrics import failure_figures, lag_figures, run_figures
from compactor.publish import DEFAULT_COMPRESSION
from compactor.replay import Limits, Progress
from compactor.runner import DEFAULT_LEASE_WAIT, CompactionResult, Compactor
from compactor.verify import DEFAULT_INDEX_QUERIES, DEFAULT_MIN_RECALL, VerifyResult
from deltalog.cli.options import add_location_flags, add_output_flags, argument, config_from
from deltalog.cli.process import EXIT_BUSY, EXIT_DIFFERENT, first_deltalog_error, stop_on_signal
from deltalog.cli.progress import ProgressDisplay, compaction_progress
from deltalog.config import parse_size
from deltalog.errors import InvalidInput, LeaseBusy
from deltalog.log import DeltaLog
from deltalog.snapshot.archive import DEFAULT_ZSTD_LEVEL

__all__ = ["register"]
EXIT_USAGE = 2


def _compactor(
    args: argparse.Namespace,
    log: str | None = None,
    *,
    progress: Callable[[Progress], None] | None = None,
) -> Compactor:
    config = config_from(args, log)
    if args.part_size is not None:
        config = replace(config, part_size=args.part_size)
    return Compactor(
        config,
        cache_dir=args.cache_dir,
        lease_ttl=args.lease_ttl,
        grace=args.grace,
        limits=Limits(args.max_entries, args.max_bytes, args.max_seconds),
        retain=args.retain,
        orphan_grace=args.orphan_grace,
        compression=args.compression,
        compression_level=args.compression_level,
        checkpoint_ratio=args.checkpoint_ratio,
        max_tail_entries=args.max_tail_entries,
        max_tail_bytes=args.max_tail_bytes or None,
        progress=progress,
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
    with _display(args, config_from(args).log) as display:
        async with _compactor(args, progress=compaction_progress(display, head)) as compactor:
            result = await compactor.run_once(checkpoint=args.checkpoint)
    _print_result(result, args.json)
    return EXIT_BUSY if result.status == "busy" else 0


async def _follow(args: argparse.Namespace) -> int:
    names = [n for item in (args.logs or [args.log]) for n in (item or "").split(",") if n] or [
        None
    ]
    compactors = [_compactor(args, name) for name in names]
    async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
        await tg.start(stop_on_signal, tg.cancel_scope)
        for compactor in compactors:
            await stack.enter_async_context(compactor)
        exporter = _exporter(args, [c.config.log for c in compactors], stack)
        logs = ", ".join(c.config.log for c in compactors)
        print(f"following {logs}; SIGINT or SIGTERM stops", file=sys.stderr, flush=True)
        await follow(
            compactors,
            poll_min=args.poll_min,
            poll_max=args.poll_max,
            on_result=lambda r: _on_result(r, args.json, exporter),
            on_error=lambda name, exc: _on_error(name, exc, exporter),
            on_lag=(
                (lambda name, head, hwm: exporter.record(name, lag_figures(head, hwm)))
                if exporter is not None
                else None
            ),
        )
    print("stopped; leases released", file=sys.stderr)
    return 0


def _exporter(
    args: argparse.Namespace, logs: list[str], stack: AsyncExitStack
) -> PrometheusExporter | None:
    """With ``--metrics-port``: serve the compactor's figures for Prometheus."""
    if args.metrics_port is None:
        return None
    exporter = stack.enter_context(PrometheusExporter())
    for log in logs:
        exporter.track(log)
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
        exporter.record(result.log, run_figures(result))


def _on_error(name: str, exc: Exception, exporter: PrometheusExporter | None) -> None:
    print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    if exporter is not None:
        exporter.record(name, failure_figures(exc))


async def cmd_rebuild(args: argparse.Namespace) -> int:
    head = args.to_seq or await _head(args)
    with _display(args, "rebuild") as display:
        async with _compactor(args, progress=compaction_progress(display, head)) as compactor:
            try:
                result = await compactor.rebuild(
                    args.to_seq, publish=args.publish, force=args.force, wait=args.wait
                )
            except LeaseBusy as exc:
                print(f"deltalog: {type(exc).__name__}: {exc}", file=sys.stderr)
                return EXIT_BUSY
    if args.json:
        print(json.dumps(asdict(result), sort_keys=True))
    else:
        what = "published as the committed snapshot" if result.published else "not published"
        print(
            f"{result.log}: rebuilt to seq {result.hwm} from {result.entries} entries, "
            f"{result.vectors_upserted} vectors in {result.seconds:.1f}s; snapshot "
            f"{result.snapshot_key} ({result.snapshot_size} bytes), {what}"
        )
    return 0


async def cmd_verify(args: argparse.Namespace) -> int:
    async with _compactor(args) as compactor:
        result = await compactor.verify(
            index_queries=args.index_queries, min_recall=args.min_recall
        )
    if args.json:
        index = result.index
        extra = {"index_recall": index.lowest if index else None}
        print(json.dumps({**asdict(result), **extra, "ok": result.ok}, sort_keys=True))
    else:
        for line in result.differences:
            print(line)
        more = result.difference_count - len(result.differences)
        if more > 0:
            print(f"... and {more} more differences")
        verdict = "equal" if result.ok else f"{result.difference_count} differences"
        print(f"verify at hwm {result.hwm}: {result.records} records, {verdict}")
        print(_index_line(result))
    return 0 if result.ok else EXIT_DIFFERENT


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
    async with _compactor(args) as compactor:
        result = await compactor.export(args.out)
    if args.json:
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
        state = await log.table.read_state(log.keys.log_id)
        if args.seq <= state.hwm:
            raise InvalidInput(
                f"seq {args.seq} is at or below the committed hwm {state.hwm}: already applied",
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


def _add_compactor_flags(parser: argparse.ArgumentParser) -> None:
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


def register(commands: Any) -> None:
    """Add ``compact``, ``rebuild``, ``verify`` and ``quarantine`` to the ``deltalog`` parser."""
    compact = commands.add_parser("compact", help="apply new entries to the snapshot (one run)")
    _add_compactor_flags(compact)
    compact.add_argument("--follow", action="store_true", help="keep compacting as entries arrive")
    compact.add_argument(
        "--checkpoint",
        action="store_true",
        help="publish a checkpoint in this run, whatever the policy says",
    )
    compact.add_argument(
        "--logs", action="append", help="with --follow: logs to follow (repeat or comma-separate)"
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
    _add_compactor_flags(rebuild)
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
    rebuild.set_defaults(run=cmd_rebuild)

    verify = commands.add_parser("verify", help="compare a rebuild with the committed snapshot")
    _add_compactor_flags(verify)
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
    _add_compactor_flags(export)
    export.add_argument("--out", type=Path, required=True, help="a new (or empty) directory")
    export.set_defaults(run=cmd_export)

    quarantine = commands.add_parser("quarantine", help="let compaction pass a poison entry")
    add_location_flags(quarantine)
    quarantine.add_argument("--seq", type=int, required=True)
    quarantine.add_argument("--reason", required=True)
    quarantine.set_defaults(run=cmd_quarantine)
