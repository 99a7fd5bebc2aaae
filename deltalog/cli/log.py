"""The log's own commands: ``init``, ``status``, ``policy``."""

from __future__ import annotations

import argparse
import json
import time
import uuid
from dataclasses import asdict
from typing import Any

from deltalog.cli.options import add_location_flags, add_output_flags, config_from
from deltalog.cli.output import print_fields
from deltalog.config import LogConfig
from deltalog.errors import ConfigurationError, IdentityMismatch
from deltalog.log import DeltaLog, LogStatus
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.policy import render
from deltalog.storage.s3 import S3Store

__all__ = ["register"]


async def cmd_init(args: argparse.Namespace) -> int:
    """Create the bucket and the table if missing; record the log's identity.

    A log of that name the table holds for another bucket or root is
    refused first (``IdentityMismatch``), before anything is created.
    """
    config = config_from(args)
    await _refuse_another_identity(config)
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
    async with DeltaLog.open(config) as log:
        identity = await log.table.read_identity(log.keys.log_id)
    print(f"log {config.log}: {identity}")
    return 0


async def _refuse_another_identity(config: LogConfig) -> None:
    """Raise ``IdentityMismatch`` if the table holds the log for another bucket or root.

    Checked as a reader would, before anything is created; a missing table or
    bucket is what init is for.
    """
    try:
        async with DeltaLog.open(config, read_only=True):
            pass
    except IdentityMismatch:
        raise
    except ConfigurationError:  # no table or bucket yet (created below), or no access
        return


async def cmd_policy(args: argparse.Namespace) -> int:
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
    async with DeltaLog.open(config_from(args), read_only=True) as log:
        status = await log.status()
    if args.json:
        print(json.dumps(status_record(status), indent=2, sort_keys=True))
    else:
        print_fields(status_rows(status))
    return 0


def status_record(status: LogStatus) -> dict[str, Any]:
    """What ``status --json`` prints."""
    record = {**asdict(status), "lag": status.lag}
    record["quarantined"] = {str(k): v for k, v in status.quarantined.items()}
    record["last_run"] = json.loads(status.state.last_run) if status.state.last_run else None
    return record


def status_rows(status: LogStatus) -> list[tuple[str, object]]:
    """What ``status`` prints: one row per figure."""
    state = status.state
    holes = ", ".join(map(str, status.holes)) or "none"
    snapshot = (
        f"{state.snapshot_key} ({status.snapshot_bytes:,} bytes), holds seq {status.snapshot_hwm}"
        if state.snapshot_key
        else "none"
    )
    tail = (
        f"{status.tail_entries} entries, {status.tail_bytes:,} bytes "
        f"(seqs {status.snapshot_hwm + 1}-{status.hwm}, applied, not in the checkpoint)"
        if status.tail_entries
        else "empty"
    )
    quarantined = ", ".join(f"{seq} ({why})" for seq, why in sorted(status.quarantined.items()))
    identity = status.identity or "not recorded yet (the first writer records it)"
    return [
        ("log", status.log),
        ("identity", identity),
        ("head", status.head),
        ("entries", status.entries),
        ("holes", f"{status.hole_count} ({holes})"),
        ("hwm", status.hwm),
        ("lag", status.lag),
        ("lease", _lease(status)),
        ("checkpoint", snapshot),
        ("tail", tail),
        ("quarantine", quarantined or "none"),
        ("last run", _last_run(state.last_run)),
    ]


def _lease(status: LogStatus) -> str:
    state = status.state
    if not state.owner:
        return f"free (token {state.token})"
    left = state.expires_at - time.time()
    when = f"expires in {left:.1f}s" if left > 0 else f"expired {-left:.1f}s ago: free to take"
    return f"held by {state.owner}, token {state.token}, {when}"


def _last_run(record: str) -> str:
    if not record:
        return "never"
    run = json.loads(record)
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(run.get("at", 0))))
    if run.get("status") == "error":
        return f"{at}: error: {run.get('error')}"
    return f"{at}: {run.get('status')}, hwm {run.get('hwm_before')} -> {run.get('hwm_after')}"


def register(commands: Any) -> None:
    """Add ``init``, ``policy`` and ``status`` to the ``deltalog`` parser."""
    init = commands.add_parser(
        "init", help="create the bucket and the table if missing; record the log's identity"
    )
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
    add_output_flags(status, quiet=False)
    status.set_defaults(run=cmd_status)
