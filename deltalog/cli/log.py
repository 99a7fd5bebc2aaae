"""The log's own commands: ``init``, ``status``, ``logs``, ``policy``."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import asdict
from typing import Any

from deltalog.cli.options import add_location_flags, add_output_flags, argument, config_from
from deltalog.cli.output import print_fields, print_table
from deltalog.config import LogConfig
from deltalog.errors import ConfigurationError, IdentityMismatch
from deltalog.keys import root_prefix
from deltalog.log import DeltaLog, LogStatus, ShardStatus, log_names
from deltalog.shards import current_shards, init_layout, parse_shard_count, read_states
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.identity import bind_log
from deltalog.storage.policy import render
from deltalog.storage.s3 import S3Store
from deltalog.storage.table import LogState, held_until, wall_time

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
        print("conditional writes: honoured (If-None-Match probe refused with 412)", flush=True)
        added = await store.ensure_abort_rule(root_prefix(config.root))
    finally:
        await store.aclose()
    print(f"lifecycle: incomplete multipart uploads aborted after 1 day ({added})", flush=True)
    table = await DynamoTable.connect(config)
    try:
        table_created = await table.ensure_table()
        print(f"table {config.table}: {'created' if table_created else 'exists'}", flush=True)
    finally:
        await table.aclose()
    async with DeltaLog.open(config) as log:
        identity = await log.table.read_identity(log.keys.log_id)
        print(f"log {config.log}: {identity}")
        if args.shards is not None:  # through the bound table: the layout item is the log's
            outcome = await init_layout(log.table, config.keys, args.shards, now=time.time())
            print(_LAYOUT_OUTCOMES[outcome].format(log=config.log, shards=args.shards))
    return 0


_LAYOUT_OUTCOMES = {
    "one index": "log {log}: one index (no shards)",
    "created": "log {log}: {shards} shards (layout generation 1)",
    "exists": "log {log}: {shards} shards (layout exists)",
}


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
        if not status.head and not status.entries and status.state.snapshot_key is None:
            raise ConfigurationError(await _no_such_log(log))
    if args.json:
        print(json.dumps(status_record(status), indent=2, sort_keys=True))
    else:
        print_fields(status_rows(status))
        if status.layout.sharded or status.pending:
            print_table(
                _SHARD_COLUMNS,
                [_shard_row(row, status.head) for row in [*status.shards, *status.pending]],
                right=("shard", "hwm", "lag", "tail"),
            )
    return 0


async def _no_such_log(log: DeltaLog) -> str:
    """What to say about a log nothing was ever appended to: where, and what is there."""
    config = log.config
    names = await log_names(log.store, config.root)
    there = f"the logs there: {', '.join(names)}" if names else "there are no logs there yet"
    root = f", root {config.root!r}" if config.root else ""
    return (
        f"no log {config.log!r} in bucket {config.bucket!r}{root} (table {config.table!r}): "
        f"nothing was ever appended to it; {there} (`deltalog logs` lists them)"
    )


async def cmd_logs(args: argparse.Namespace) -> int:
    """``deltalog logs``: the logs under the bucket and root, with head, hwm and lag."""
    config = config_from(args)
    rows: list[dict[str, Any]] = []
    async with DeltaLog.open(config, read_only=True) as opened:
        for name in await log_names(opened.store, config.root):
            keys = config.with_log(name).keys
            try:  # the table's items of that name must be this bucket's and root's
                await bind_log(opened.store, opened.table, keys, record=False)
            except IdentityMismatch as exc:
                print(f"deltalog: {name}: skipped: {exc.message}", file=sys.stderr)
                continue
            head = await opened.table.read_head(keys.log_id)
            layout = await opened.table.read_layout(keys.log_id)
            states = await read_states(opened.table, keys, current_shards(layout))
            if head or any(state.snapshot_key is not None for state in states):
                rows.append(_log_record(config.with_log(name), head, states))
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    elif not rows:
        root = f" under root {config.root!r}" if config.root else ""
        print(f"no logs in bucket {config.bucket!r}{root}")
    else:
        print_table(
            ["log", "head", "hwm", "lag", "checkpoint", "tail", "lease", "last run"],
            [_log_row(row) for row in rows],
            right=["head", "hwm", "lag"],
        )
    return 0


def _log_record(config: LogConfig, head: int, states: list[LogState]) -> dict[str, Any]:
    """A log's row: for a sharded log (``states``: one per shard) the lagging shard's hwm,
    checkpoint, lease and last run (as ``status``), the bytes and tails summed."""
    state = min(states, key=lambda s: s.hwm)
    return {
        "log": config.log,
        "head": head,
        "hwm": state.hwm,
        "lag": max(0, head - state.hwm),
        "shards": len(states),
        "snapshot_key": state.snapshot_key,
        "snapshot_hwm": state.checkpoint_hwm if state.snapshot_key else 0,
        "snapshot_bytes": sum(s.snapshot_size for s in states),
        "tail_entries": sum(s.tail_entries for s in states),
        "tail_bytes": sum(s.tail_bytes for s in states),
        "owner": state.owner if state.owner and state.expires_at > time.time() else None,
        "last_run": json.loads(state.last_run) if state.last_run else None,
    }


def _log_row(record: dict[str, Any]) -> list[object]:
    checkpoint = (
        f"seq {record['snapshot_hwm']} ({record['snapshot_bytes']:,} bytes)"
        if record["snapshot_key"]
        else "none"
    )
    tail = f"{record['tail_entries']} entries" if record["tail_entries"] else "empty"
    run = record["last_run"]
    last = f"{wall_time(float(run.get('at', 0)))}: {_run_words(run)}" if run else "never"
    return [
        record["log"],
        record["head"],
        record["hwm"],
        record["lag"],
        checkpoint,
        tail,
        f"held by {record['owner']}" if record["owner"] else "free",
        last,
    ]


def status_record(status: LogStatus) -> dict[str, Any]:
    """What ``status --json`` prints."""
    record = {**asdict(status), "lag": status.lag}
    record["quarantined"] = {str(k): v for k, v in status.quarantined.items()}
    record["last_run"] = json.loads(status.state.last_run) if status.state.last_run else None
    record["shards"] = [_shard_record(row, status.head) for row in status.shards]
    record["pending"] = [_shard_record(row, status.head) for row in status.pending]
    layout = status.layout
    record["layout"] = {
        "shards": layout.shards,
        "generation": layout.generation,
        "pending_shards": layout.pending_shards,
        "pending_generation": layout.pending_generation,
        "floor": layout.floor,
        "retiring": [asdict(r) for r in layout.retiring],
    }
    return record


def _shard_record(row: ShardStatus, head: int) -> dict[str, Any]:
    """One shard in ``status --json``'s ``shards`` (and ``pending``) list."""
    state = row.state
    return {
        "shard": row.shard,
        "generation": row.generation,
        "hwm": row.hwm,
        "lag": max(0, head - row.hwm),
        "snapshot_hwm": row.snapshot_hwm,
        "snapshot_bytes": row.snapshot_bytes,
        "snapshot_key": state.snapshot_key,
        "tail_entries": row.tail_entries,
        "tail_bytes": row.tail_bytes,
        "owner": state.owner,
        "token": state.token,
        "expires_at": state.expires_at,
        "retired_by": state.retired_by,
        "last_run": json.loads(state.last_run) if state.last_run else None,
    }


_SHARD_COLUMNS = ("shard", "hwm", "lag", "checkpoint", "tail", "lease")


def _shard_row(row: ShardStatus, head: int) -> tuple[object, ...]:
    """One shard in ``status``'s table."""
    name = f"{row.shard} (g{row.generation})"
    checkpoint = (
        f"seq {row.snapshot_hwm}, {row.snapshot_bytes:,} bytes"
        if row.state.snapshot_key
        else "none"
    )
    tail = f"{row.tail_entries} ({row.tail_bytes:,} bytes)"
    lag = max(0, head - row.hwm)
    return name, row.hwm, lag, checkpoint, tail, _lease_of(row.state)


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
    sharded = [("layout", _layout(status))] if status.layout.sharded or status.pending else []
    identity = status.identity or "not recorded yet (the first writer records it)"
    return [
        ("log", status.log),
        ("identity", identity),
        ("head", status.head),
        ("entries", status.entries),
        ("holes", f"{status.hole_count} ({holes})"),
        *sharded,
        ("hwm", status.hwm),
        ("lag", status.lag),
        ("lease", _lease_of(status.state)),
        ("checkpoint", snapshot),
        ("tail", tail),
        ("quarantine", quarantined or "none"),
        ("last run", _last_run(state.last_run)),
    ]


def _layout(status: LogStatus) -> str:
    layout = status.layout
    text = f"{layout.shards} shards (generation {layout.generation}); hwm is the lagging shard's"
    if layout.pending_generation:
        text += (
            f"; resharding to {layout.pending_shards} shards (generation "
            f"{layout.pending_generation})"
        )
    return text


def _lease_of(state: LogState) -> str:
    if state.retired_by:
        return f"retired by generation {state.retired_by}"
    if not state.owner:
        return f"free (token {state.token})"
    now = time.time()
    if state.expires_at <= now:
        return (
            f"held by {state.owner}, token {state.token}, expired at "
            f"{wall_time(state.expires_at)} ({now - state.expires_at:.1f} s ago): free to take"
        )
    return f"{held_until(state.owner, state.expires_at, now)}, token {state.token}"


def _last_run(record: str) -> str:
    if not record:
        return "never"
    run = json.loads(record)
    return f"{wall_time(float(run.get('at', 0)))}: {_run_words(run)}"


def _run_words(run: dict[str, Any]) -> str:
    """A last-run record in words: what it did to the hwm, or why it stopped."""
    status = run.get("status")
    if status == "error":
        return f"error: {run.get('error')}"
    before, after = run.get("hwm_before"), run.get("hwm_after")
    if status == "interrupted":
        if after is not None and after != before:
            return f"interrupted after committing hwm {before} -> {after}"
        return f"interrupted at hwm {before}: nothing committed"
    if before is None:  # a record from before runs recorded their hwm
        return str(status or "unknown")
    return f"{status}, hwm {before} -> {after}"


def register(commands: Any) -> None:
    """Add ``init``, ``policy`` and ``status`` to the ``deltalog`` parser."""
    init = commands.add_parser(
        "init", help="create the bucket and the table if missing; record the log's identity"
    )
    add_location_flags(init)
    init.add_argument(
        "--shards",
        type=argument(parse_shard_count),
        metavar="N",
        help="record the log's shard count: N indexes compacted in parallel (default: one "
        "index, no layout); change it later with `deltalog reshard`",
    )
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

    logs = commands.add_parser(
        "logs", help="the logs in a bucket (under --root): head, hwm, lag, checkpoint"
    )
    add_location_flags(logs)
    add_output_flags(logs, quiet=False)
    logs.set_defaults(run=cmd_logs)
