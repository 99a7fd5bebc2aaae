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
import time
import uuid
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
        print(f"bucket {config.bucket}: {'created' if bucket_created else 'exists'}", flush=True)
        await store.check_conditional_writes(config.keys.probe(uuid.uuid4().hex))
    finally:
        await store.aclose()
    print("conditional writes: honoured (If-None-Match probe refused with 412)", flush=True)
    table = await DynamoTable.connect(config)
    try:
        table_created = await table.ensure_table()
    finally:
        await table.aclose()
    print(f"table {config.table}: {'created' if table_created else 'exists'}")
    return 0


async def cmd_policy(args: argparse.Namespace) -> int:
    from deltalog.policy import render

    config = config_from(args)
    document = render(
        args.role,
        bucket=config.bucket,
        table=config.table,
        log=config.log,
        root=config.root,
        account=args.account,
        region=config.region or "*",
        partition=args.partition,
        kms_key_arn=args.kms_key,
    )
    print(json.dumps(document, indent=2))
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    from deltalog.log import DeltaLog

    async with DeltaLog.open(config_from(args)) as log:
        status = await log.status()
    if args.json:
        record = {**asdict(status), "lag": status.lag}
        record["quarantined"] = {str(k): v for k, v in status.quarantined.items()}
        record["last_run"] = json.loads(status.state.last_run) if status.state.last_run else None
        print(json.dumps(record, indent=2, sort_keys=True))
        return 0
    print(f"log        {status.log}")
    print(f"head       {status.head}")
    print(f"entries    {status.entries}")
    holes = ", ".join(map(str, status.holes)) or "none"
    print(f"holes      {status.hole_count} ({holes})")
    print(f"hwm        {status.hwm}")
    print(f"lag        {status.lag}")
    state = status.state
    if state.owner:
        left = state.expires_at - time.time()
        when = f"expires in {left:.1f}s" if left > 0 else f"expired {-left:.1f}s ago: free to take"
        lease = f"held by {state.owner}, token {state.token}, {when}"
    else:
        lease = f"free (token {state.token})"
    print(f"lease      {lease}")
    snapshot = (
        f"{state.snapshot_key} ({state.snapshot_size:,} bytes)" if state.snapshot_key else "none"
    )
    print(f"snapshot   {snapshot}")
    quarantined = ", ".join(f"{seq} ({why})" for seq, why in sorted(status.quarantined.items()))
    print(f"quarantine {quarantined or 'none'}")
    print(f"last run   {_last_run(state.last_run)}")
    return 0


def _last_run(record: str) -> str:
    if not record:
        return "never"
    run = json.loads(record)
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(run.get("at", 0))))
    if run.get("status") == "error":
        return f"{at}: error: {run.get('error')}"
    return f"{at}: {run.get('status')}, hwm {run.get('hwm_before')} -> {run.get('hwm_after')}"


async def cmd_demo(args: argparse.Namespace) -> int:
    from deltalog.demo import run_demo

    return await run_demo(args)


async def cmd_generate(args: argparse.Namespace) -> int:
    from deltalog.generate import run_generate

    return await run_generate(args)


async def cmd_ingest(args: argparse.Namespace) -> int:
    from deltalog.ingest import run_ingest

    return await run_ingest(args)


async def cmd_soak(args: argparse.Namespace) -> int:
    from deltalog.soak import run_soak

    return await run_soak(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltalog", description="An event-sourced delta log on S3, folded into ChromaDB."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser("init", help="create the bucket and the table if missing")
    add_location_flags(init)
    init.set_defaults(run=cmd_init)

    policy = commands.add_parser("policy", help="print a least-privilege IAM policy as JSON")
    policy.add_argument(
        "--role", required=True, choices=["producer", "compactor", "reader", "bucket"]
    )
    add_location_flags(policy)
    policy.add_argument("--account", default="*", help="AWS account id of the table (default *)")
    policy.add_argument("--partition", default="aws", help="ARN partition (default aws)")
    policy.add_argument("--kms-key", help="ARN of the SSE-KMS key the log uses")
    policy.set_defaults(run=cmd_policy)

    status = commands.add_parser("status", help="head, entries, holes, hwm and lag of a log")
    add_location_flags(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=cmd_status)

    demo = commands.add_parser(
        "demo", help="run the whole story on an embedded S3/DynamoDB endpoint on loopback"
    )
    demo.add_argument("--receipts", type=int, default=120, help="receipts in the first batch")
    demo.add_argument("--more", type=int, default=60, help="receipts in the second batch")
    demo.add_argument("--concurrency", type=int, default=8, help="receipts embedded at once")
    demo.add_argument("--embedder", default="auto", help="auto (OpenAI if OPENAI_API_KEY), hash")
    demo.add_argument("--dim", type=int, help="embedding dimension")
    demo.add_argument("--seed", type=int, default=7, help="receipt generator seed")
    demo.set_defaults(run=cmd_demo)

    generate = commands.add_parser("generate", help="write synthetic receipts as JSONL")
    generate.add_argument("--receipts", type=int, required=True, help="how many receipts")
    generate.add_argument("--out", required=True, help="the JSONL file to write")
    generate.add_argument("--seed", type=int, default=0, help="same seed, same receipts")
    generate.set_defaults(run=cmd_generate)

    ingest = commands.add_parser(
        "ingest", help="embed receipts from a JSONL file and append them to a log"
    )
    ingest.add_argument("path", help="JSONL file, one receipt per line")
    ingest.add_argument(
        "--on-error",
        choices=["stop", "skip"],
        default="stop",
        help="at a bad line: stop before it (default) or skip it",
    )
    ingest.add_argument(
        "--concurrency", type=int, default=8, help="receipts embedded at once (default 8)"
    )
    ingest.add_argument(
        "--embedder",
        choices=["auto", "openai", "hash"],
        default="auto",
        help="auto (default): openai if OPENAI_API_KEY is set, else hash (offline)",
    )
    ingest.add_argument("--dim", type=int, help="vector dimension (hash; openai 'dimensions')")
    add_location_flags(ingest)
    ingest.set_defaults(run=cmd_ingest)

    from compactor.cli import register as register_compactor
    from deltalog.query import add_query_command

    add_query_command(commands)

    register_compactor(commands)

    soak = commands.add_parser(
        "soak", help="producers, a killed and paused compactor and network faults for N minutes"
    )
    soak.add_argument("--minutes", type=float, default=5.0, help="how long the chaos lasts")
    soak.add_argument("--seed", type=int, help="replay a run (default: random, printed)")
    soak.add_argument("--producers", type=int, default=8, help="producer tasks")
    soak.add_argument("--fault-rate", type=float, default=0.1, help="share of requests faulted")
    soak.add_argument("--ambiguous", type=float, default=0.5, help="share of faults ambiguous")
    soak.add_argument("--lease-ttl", type=float, default=3.0, help="the compactors' lease (s)")
    soak.add_argument("--endpoint-url", help="an S3 + DynamoDB endpoint (default: embedded)")
    soak.add_argument("--bucket", default="deltalog-soak", help="bucket (created if missing)")
    soak.add_argument("--table", default="deltalog-soak", help="table name prefix")
    soak.set_defaults(run=cmd_soak)
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
