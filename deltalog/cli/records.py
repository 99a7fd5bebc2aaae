"""Records by id from the shell: ``get`` and ``delete``.

``deltalog get --collection C --ids a,b [--consistency snapshot|fresh]``
reads records as ``Reader.get`` does: ``snapshot`` (the default) answers
from the committed state, ``fresh`` also folds in the entries not compacted
yet, so the two differ until the next compaction. ``deltalog delete
--collection C --ids a,b`` appends one delta deleting those ids and prints
its seq: a fresh read sees it at once, a snapshot read once it is compacted.
A collection the log does not hold is refused with the list of those it
does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deltalog.cli.options import add_location_flags, add_output_flags, config_from
from deltalog.cli.output import print_table
from deltalog.cli.receipts import parse_where
from deltalog.entry import Delete, Delta
from deltalog.errors import InvalidInput
from deltalog.log import DeltaLog
from deltalog.reader import GetResult, Reader, collections_named

__all__ = ["register"]


def _ids(values: list[str] | None) -> list[str]:
    return [i for item in values or [] for i in item.split(",") if i]


async def _check_collection(log: DeltaLog, collection: str) -> None:
    """Refuse a collection the log has never written vectors to, naming those it has."""
    dims = await log.table.read_dims(log.keys.log_id)
    if collection not in dims:
        raise InvalidInput(
            f"log {log.config.log!r} has no collection {collection!r}; {collections_named(dims)}",
            log=log.config.log,
        )


async def cmd_get(args: argparse.Namespace) -> int:
    ids = _ids(args.ids)
    where = parse_where(args.where, args.where_json)
    if not ids and where is None:
        raise InvalidInput("give the records to read: --ids a,b (or a filter: --where k=v)")
    config = config_from(args)
    async with DeltaLog.open(config, read_only=True) as log:
        await _check_collection(log, args.collection)
    async with Reader.open(
        config, consistency=args.consistency, cache_dir=Path(args.cache_dir)
    ) as reader:
        got = await reader.get(
            collection=args.collection, ids=ids or None, where=where, limit=args.limit
        )
        stats = reader.statistics()
    if args.json:
        print(json.dumps(got, indent=2))
        return 0
    at = (
        f"fresh read at seq {max(stats.tail_seq, stats.hwm)} (committed hwm {stats.hwm})"
        if args.consistency == "fresh"
        else f"snapshot read at the committed hwm {stats.hwm}"
    )
    _print_records(got, title=f"{args.collection}: {at}")
    missing = [i for i in ids if i not in set(got["ids"])]
    if missing:
        print(f"not found ({args.consistency} read): {', '.join(missing)}")
    return 0


def _print_records(got: GetResult, *, title: str) -> None:
    if not got["ids"]:
        print(f"{title}: no records")
        return
    rows: list[tuple[object, ...]] = [
        (id_, repr(document) if document is not None else "", _metadata(metadata))
        for id_, document, metadata in zip(
            got["ids"], got["documents"], got["metadatas"], strict=True
        )
    ]
    print_table(["id", "document", "metadata"], rows, title=title)


def _metadata(metadata: Any) -> str:
    return json.dumps(metadata, sort_keys=True) if metadata else ""


async def cmd_delete(args: argparse.Namespace) -> int:
    ids = _ids(args.ids)
    if not ids:
        raise InvalidInput("give the ids to delete: --ids a,b (repeat or comma-separate)")
    config = config_from(args)
    async with DeltaLog.open(config) as log:
        await _check_collection(log, args.collection)
        delta = Delta(
            ops=[Delete(collection=args.collection, ids=ids)],
            idempotency_key=args.idempotency_key,
        )
        seq = await log.append(delta)
    if args.json:
        record = {"log": config.log, "collection": args.collection, "ids": ids, "seq": seq}
        print(json.dumps(record))
        return 0
    print(
        f"{config.log}: delete of {len(ids)} ids from {args.collection!r} appended at seq {seq}: "
        "fresh reads see it now, snapshot reads once it is compacted (`deltalog compact`)"
    )
    return 0


def register(commands: Any) -> None:
    """Add ``get`` and ``delete`` to the ``deltalog`` parser."""
    get = commands.add_parser("get", help="read records by id (snapshot or fresh)")
    add_location_flags(get)
    get.add_argument("--collection", required=True, help="the collection, e.g. words")
    get.add_argument("--ids", action="append", help="ids to read (repeat or comma-separate)")
    get.add_argument("--where", action="append", help="metadata filter key=value (repeatable)")
    get.add_argument("--where-json", help="a Chroma where filter as JSON")
    get.add_argument("--limit", type=int, help="at most this many records")
    get.add_argument(
        "--consistency",
        choices=["snapshot", "fresh"],
        default="snapshot",
        help="snapshot: the committed state; fresh: also the entries not compacted yet",
    )
    get.add_argument("--cache-dir", default=".deltalog/cache", help="local snapshot cache")
    add_output_flags(get, quiet=False)
    get.set_defaults(run=cmd_get)

    delete = commands.add_parser("delete", help="append a delete of records by id")
    add_location_flags(delete)
    delete.add_argument("--collection", required=True, help="the collection, e.g. words")
    delete.add_argument(
        "--ids", action="append", required=True, help="ids to delete (repeat or comma-separate)"
    )
    delete.add_argument(
        "--idempotency-key", help="repeating the command with this key writes nothing twice"
    )
    add_output_flags(delete, quiet=False)
    delete.set_defaults(run=cmd_delete)
