"""``deltalog reshard --shards M``: split (or merge) a log's indexes, a rebuild from the log.

Prints one line per build round (the new shards' hwms against the old
generation's cut) unless quiet, then the result. Running it again after it
was stopped (or killed) finishes the same reshard.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from compactor.reshard import DEFAULT_BUILD_SECONDS, DEFAULT_LAG, BuildRound, reshard
from deltalog.cli.compact import add_compactor_flags, compactor_config, compactor_options
from deltalog.cli.options import argument
from deltalog.shards import parse_shard_count

__all__ = ["register"]


async def cmd_reshard(args: argparse.Namespace) -> int:
    def report(round_: BuildRound) -> None:
        if not args.quiet:
            print(
                f"build: new shards at hwm {min(round_.hwms)}-{max(round_.hwms)}, "
                f"the current generation's cut {round_.cut}",
                file=sys.stderr,
                flush=True,
            )

    result = await reshard(
        compactor_config(args),
        args.shards,
        lag=args.lag,
        build_seconds=args.build_seconds,
        on_round=report,
        concurrency=args.concurrency,
        **compactor_options(args, None),
    )
    if args.json:
        print(json.dumps(asdict(result), sort_keys=True))
    elif not result.switched:
        print(
            f"{result.log}: already {result.shards_after} shards (generation "
            f"{result.generation_after}): nothing to do"
        )
    else:
        print(
            f"{result.log}: resharded from {result.shards_before} to {result.shards_after} "
            f"shards (generation {result.generation_before} -> {result.generation_after}) in "
            f"{result.rounds} build rounds, {result.seconds:.1f}s; reads are at seq "
            f"{result.floor} or later; the old checkpoints retire after --retire-grace"
        )
    return 0


def register(commands: Any) -> None:
    """Add ``reshard`` to the ``deltalog`` parser."""
    parser = commands.add_parser(
        "reshard", help="change a log's shard count: rebuild a new layout from the log"
    )
    add_compactor_flags(parser)
    parser.add_argument(
        "--shards",
        type=argument(parse_shard_count),
        required=True,
        metavar="M",
        help="the new shard count",
    )
    parser.add_argument(
        "--concurrency", type=int, metavar="N", help="build at most N shards at once (default all)"
    )
    parser.add_argument(
        "--lag",
        type=int,
        default=DEFAULT_LAG,
        metavar="SEQS",
        help=f"switch once every new shard is this close to the old cut (default {DEFAULT_LAG})",
    )
    parser.add_argument(
        "--build-seconds",
        type=float,
        default=DEFAULT_BUILD_SECONDS,
        metavar="S",
        help="commit the new shards' progress at least this often "
        f"(default {DEFAULT_BUILD_SECONDS:g})",
    )
    parser.set_defaults(run=cmd_reshard)
