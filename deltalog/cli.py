"""The ``deltalog`` command line.

Every command takes the log's location from flags or ``DELTALOG_*``
variables, and AWS settings (region, credentials, endpoints) from the
standard AWS variables and profiles. Exit status: 0 success, 1 a deltalog
error (the message says what to do), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict

import anyio

from deltalog.config import LogConfig
from deltalog.errors import DeltalogError

__all__ = ["main"]

Command = Callable[[argparse.Namespace], Awaitable[int]]


def config_from(args: argparse.Namespace, log: str | None = None) -> LogConfig:
    """The ``LogConfig`` named by the common flags and the environment."""
    return LogConfig.from_env(
        bucket=args.bucket,
        table=args.table,
        log=log or args.log,
        root=args.root,
        endpoint_url=args.endpoint_url,
        region=args.region,
        profile=args.profile,
    )


def add_location_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where the log lives")
    group.add_argument("--bucket", help="S3 bucket (DELTALOG_BUCKET)")
    group.add_argument("--table", help="DynamoDB table (DELTALOG_TABLE)")
    group.add_argument("--log", help="log name (DELTALOG_LOG, default 'default')")
    group.add_argument("--root", help="key prefix inside the bucket (DELTALOG_ROOT)")
    group.add_argument(
        "--endpoint-url", help="one endpoint for S3 and DynamoDB (else AWS_ENDPOINT_URL_*)"
    )
    group.add_argument("--region", help="AWS region (else AWS_REGION / AWS_DEFAULT_REGION)")
    group.add_argument("--profile", help="AWS profile (else AWS_PROFILE)")


async def cmd_init(args: argparse.Namespace) -> int:
    from deltalog.dynamo import DynamoTable
    from deltalog.s3 import S3Store

    config = config_from(args)
    store = await S3Store.connect(config)
    try:
        bucket_created = await store.ensure_bucket()
    finally:
        await store.aclose()
    table = await DynamoTable.connect(config)
    try:
        table_created = await table.ensure_table()
    finally:
        await table.aclose()
    print(f"bucket {config.bucket}: {'created' if bucket_created else 'exists'}")
    print(f"table {config.table}: {'created' if table_created else 'exists'}")
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    from deltalog.log import DeltaLog

    async with DeltaLog.open(config_from(args)) as log:
        status = await log.status()
    if args.json:
        print(json.dumps({**asdict(status), "lag": status.lag}, indent=2, sort_keys=True))
        return 0
    print(f"log        {status.log}")
    print(f"head       {status.head}")
    print(f"entries    {status.entries}")
    holes = ", ".join(map(str, status.holes)) or "none"
    print(f"holes      {status.hole_count} ({holes})")
    print(f"hwm        {status.hwm}")
    print(f"lag        {status.lag}")
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    from deltalog.demo import run_demo

    return await run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltalog", description="An event-sourced delta log on S3, folded into ChromaDB."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser("init", help="create the bucket and the table if missing")
    add_location_flags(init)
    init.set_defaults(run=cmd_init)

    status = commands.add_parser("status", help="head, entries, holes, hwm and lag of a log")
    add_location_flags(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=cmd_status)

    demo = commands.add_parser(
        "demo", help="run the whole story on an embedded S3/DynamoDB endpoint on loopback"
    )
    demo.add_argument("--deltas", type=int, default=4000, help="deltas to append")
    demo.add_argument("--producers", type=int, default=64, help="concurrent producer tasks")
    demo.add_argument("--dim", type=int, default=1536, help="embedding dimension")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Command = args.run
    try:
        code: int = anyio.run(run, args)
    except DeltalogError as exc:
        print(f"deltalog: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
