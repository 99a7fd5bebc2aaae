"""``deltalog mirror``: keep a Chroma server equal to the fold of the log.

Exit status: 0 caught up (``--once``) or stopped by a signal, 1 an error
(an unreachable server, a collection of another dimension, a server ahead of
the mirror, a lost lease), 3 another mirror holds the target's lease.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio

from compactor.mirror import Mirror, MirrorResult, MirrorStatistics
from deltalog.cli.options import add_location_flags, add_output_flags, config_from
from deltalog.cli.process import EXIT_BUSY, stop_on_signal
from deltalog.cli.progress import ProgressDisplay
from deltalog.errors import LeaseBusy
from deltalog.snapshot.server import DEFAULT_REQUEST_TIMEOUT, ChromaTarget

__all__ = ["register"]

_BOOTSTRAP = "mirror bootstrap"
_FOLLOW = "mirror"


def _mirror(args: argparse.Namespace, display: ProgressDisplay | None) -> Mirror:
    target = ChromaTarget(args.chroma_url, tenant=args.tenant, database=args.database)
    return Mirror(
        config_from(args),
        target,
        cache_dir=args.cache_dir,
        lease_ttl=args.lease_ttl,
        chunk_entries=args.batch_entries,
        chunk_vectors=args.batch_vectors,
        progress=_progress(display) if display is not None else None,
        request_timeout=args.request_timeout,
    )


def _progress(display: ProgressDisplay) -> Any:
    """Records copied while a bootstrap runs, then seqs applied (and the lag behind the head)."""
    base = [0, 0]  # entries and vectors counted before this stage

    def report(stats: MirrorStatistics) -> None:
        if stats.bootstrap_total:
            if display.label != _BOOTSTRAP:
                display.stage(_BOOTSTRAP, unit="records", total=stats.bootstrap_total)
            display.update(stats.bootstrap_copied)
            return
        if display.label != _FOLLOW:
            display.stage(_FOLLOW, unit="seqs")
            base[:] = [stats.entries, stats.vectors_upserted]
        done = stats.entries - base[0]
        display.update(
            done, total=done + stats.lag, lag=stats.lag, vectors=stats.vectors_upserted - base[1]
        )

    return report


def _print(result: MirrorResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**asdict(result), "lag": result.lag}, sort_keys=True), flush=True)
    else:
        print(result.summary(), flush=True)


async def cmd_mirror(args: argparse.Namespace) -> int:
    with ProgressDisplay(_FOLLOW, unit="seqs", quiet=args.quiet) as display:
        async with _mirror(args, display) as mirror:
            if args.once:
                result = await mirror.run_once()
                code = EXIT_BUSY if result.status == "busy" else 0
            else:
                code = await _follow(args, mirror)
    if args.once:
        _print(result, args.json)
    return code


async def _follow(args: argparse.Namespace, mirror: Mirror) -> int:
    async with anyio.create_task_group() as tg:
        await tg.start(stop_on_signal, tg.cancel_scope)
        print(
            f"mirroring {mirror.config.log} into {mirror.target.id}; SIGINT or SIGTERM stops",
            file=sys.stderr,
            flush=True,
        )
        try:
            await mirror.follow(
                poll_min=args.poll_min,
                poll_max=args.poll_max,
                on_result=lambda r: _print(r, args.json),
                on_error=lambda exc: print(f"{type(exc).__name__}: {exc}", file=sys.stderr),
            )
        except LeaseBusy as exc:
            print(f"deltalog: LeaseBusy: {exc}", file=sys.stderr)
            return EXIT_BUSY
    stats = mirror.statistics()
    print(
        f"stopped at position {stats.position} (lag {stats.lag}); lease released",
        file=sys.stderr,
    )
    return 0


def register(commands: Any) -> None:
    """Add ``mirror`` to the ``deltalog`` parser."""
    mirror = commands.add_parser("mirror", help="keep a Chroma server equal to the log's fold")
    add_location_flags(mirror)
    group = mirror.add_argument_group("the Chroma server")
    group.add_argument(
        "--chroma-url",
        required=True,
        help="http://HOST:PORT (self-hosted) or https://HOST; with CHROMA_API_KEY set, "
        "chromadb's CloudClient is used",
    )
    group.add_argument("--tenant", default="default_tenant")
    group.add_argument("--database", default="default_database")
    mirror.add_argument("--once", action="store_true", help="catch up to the head, then exit")
    mirror.add_argument(
        "--cache-dir", type=Path, default=Path(".deltalog/cache"), help="local snapshot cache"
    )
    mirror.add_argument("--lease-ttl", type=float, default=30.0, help="lease time to live (s)")
    mirror.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT,
        help="most seconds a request to the server may take (each phase); a mirror that "
        "takes over a lease its holder did not release waits the ttl plus this first",
    )
    mirror.add_argument("--poll-min", type=float, default=0.5, help="fastest poll (s)")
    mirror.add_argument("--poll-max", type=float, default=10.0, help="slowest poll (s)")
    mirror.add_argument(
        "--batch-entries", type=int, default=2_000, help="most entries in one batch"
    )
    mirror.add_argument(
        "--batch-vectors", type=int, default=10_000, help="a batch ends past this many vectors"
    )
    add_output_flags(mirror)
    mirror.set_defaults(run=cmd_mirror)
