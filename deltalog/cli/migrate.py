"""``deltalog import chroma`` and ``deltalog import pinecone``: migrate into the log.

``--dry-run`` reads the source and prints what would be written (nothing
is). ``--verify`` compacts the log up to what the import wrote, then
compares the committed state with the source. Exit status: 0 done, 1 an
error (nothing of the failing page written; run again to resume), 4
``--verify`` found differences.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio

from compactor.committed import committed_copy
from compactor.shards import ShardedCompactor
from deltalog.cli.options import add_location_flags, add_output_flags, config_from
from deltalog.cli.output import print_table
from deltalog.cli.process import EXIT_DIFFERENT
from deltalog.cli.progress import ProgressDisplay
from deltalog.errors import Conflict
from deltalog.log import DeltaLog
from deltalog.migrate.chroma import ChromaImporter, ChromaSource
from deltalog.migrate.pages import ImportPlan, ImportResult, Refused, SourceMap, refusal_counts
from deltalog.migrate.pinecone import NamespaceMap, PineconeImporter
from deltalog.snapshot.server import ChromaTarget

__all__ = ["register"]

_COMPACT_WAIT = 300.0
_LISTED = 50


def _print_plan(plan: ImportPlan, as_json: bool, refused: list[Refused] | None = None) -> None:
    counted = refusal_counts(refused or [])
    if as_json:
        body: dict[str, Any] = {"collections": [asdict(c) for c in plan.collections]}
        if refused is not None:
            body["refused"] = [str(r) for r in refused]
            body["refused_counts"] = [
                {"source": src, "reason": why, "records": n, "ids": ids}
                for src, why, n, ids in counted
            ]
        print(json.dumps(body, sort_keys=True))
        return
    print_table(
        ["source", "collection", "records", "dim", "bytes"],
        [(c.source, c.collection, c.records, c.dim or "-", c.bytes) for c in plan.collections],
        title="would write (dry run: nothing written)",
        right=["records", "dim", "bytes"],
    )
    if not counted:
        return
    print_table(
        ["source", "refused because", "records", "for example"],
        [(src, why, n, ", ".join(ids)) for src, why, n, ids in counted],
        title=f"refused: {len(refused or [])} records the log would not take (pages holding "
        "them are not written)",
        right=["records"],
    )
    for r in (refused or [])[:_LISTED]:
        print(f"refused: {r}")
    if len(refused or []) > _LISTED:
        more = len(refused or []) - _LISTED
        print(f"... and {more} more refused records (--json lists them all)")


def _print_result(result: ImportResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**asdict(result), "records_per_second": result.records_per_second}))
        return
    print(
        f"imported {result.records_written} records in {result.deltas_written} deltas "
        f"({result.deltas_skipped} already in the log) in {result.seconds:.1f}s "
        f"({result.records_per_second:,.0f} records/s); last seq {result.last_seq}"
    )


def _display(args: argparse.Namespace) -> tuple[ProgressDisplay, Any]:
    display = ProgressDisplay("import", unit="records", quiet=args.quiet)

    def report(result: ImportResult) -> None:
        display.update(
            result.records_written, total=result.plan.records, deltas=result.deltas_written
        )

    return display, report


async def _compact_to(args: argparse.Namespace, log: DeltaLog) -> None:
    """Compact until the committed hwm (every shard's) covers the log's head (waiting for
    a busy lease)."""
    target = await log.head()
    deadline = time.monotonic() + _COMPACT_WAIT
    async with ShardedCompactor(
        log.config, cache_dir=args.cache_dir, generations="current"
    ) as sharded:
        while min(state.hwm for state in await sharded.states()) < target:
            results = await sharded.run_once()
            if all(result.hwm_after >= target for result in results):
                return
            if time.monotonic() > deadline:
                summary = "; ".join(result.summary() for result in results)
                raise Conflict(
                    f"the log was not compacted to seq {target} within {_COMPACT_WAIT:.0f}s "
                    f"({summary}): run `deltalog compact`, then verify again",
                    log=log.config.log,
                )
            await anyio.sleep(1.0)


async def _import(args: argparse.Namespace, log: DeltaLog, run: Any) -> bool:
    """Run an import with progress and print its result; True when it is to be verified
    (the log is then compacted up to its head)."""
    display, report = _display(args)
    with display:
        result = await run(report)
    _print_result(result, args.json)
    if args.verify:
        await _compact_to(args, log)
    return bool(args.verify)


def _report_verify(
    seen: dict[str, tuple[int, int]],
    differences: list[str],
    as_json: bool,
    what: str,
    skipped: list[str] | None = None,
) -> int:
    skipped = [name for name in skipped or [] if name not in seen]
    if as_json:
        body = {"counts": seen, "differences": differences, "ok": not differences}
        print(json.dumps({**body, "skipped": skipped}))
        return 0 if not differences else EXIT_DIFFERENT
    if seen:
        print_table(
            [what, "source", "log"],
            [(name, a, b) for name, (a, b) in seen.items()],
            title="verify after compaction",
            right=["source", "log"],
        )
    for name in skipped:
        print(
            f"{name}: skipped: empty in the source (the log creates a collection with its "
            "first record), not compared"
        )
    for line in differences[:50]:
        print(line)
    if differences:
        print(f"verify: {len(differences)} differences")
    elif not seen:
        print("verify: nothing compared (every source collection is empty)")
    else:
        print(
            f"verify: equal ({len(seen)} collections"
            + (f"; {len(skipped)} empty ones skipped)" if skipped else ")")
        )
    return 0 if not differences else EXIT_DIFFERENT


async def cmd_import_chroma(args: argparse.Namespace) -> int:
    source = ChromaSource(
        path=args.path,
        target=ChromaTarget(args.url, tenant=args.tenant, database=args.database)
        if args.url
        else None,
    )
    maps = [
        SourceMap.parse(text, flag="--collections")
        for item in args.collections or []
        for text in item.split(",")
        if text
    ]
    maps += [SourceMap.parse(text) for text in args.collection or []]
    async with (
        DeltaLog.open(config_from(args)) as log,
        await ChromaImporter.open(log, source, collections=maps, batch=args.batch) as imp,
    ):
        if args.dry_run:
            plan, refused = await imp.plan()
            _print_plan(plan, args.json, refused)
            _print_skipped(imp.skipped, args.json)
            return 0
        if not await _import(args, log, imp.run):
            _print_skipped(imp.skipped, args.json)
            return 0
        async with committed_copy(log, args.cache_dir) as committed:
            seen, differences = await imp.verify(committed)
        return _report_verify(seen, differences, args.json, "collection", imp.skipped)


def _print_skipped(skipped: list[str], as_json: bool) -> None:
    if skipped and not as_json:
        print(
            f"skipped, empty in the source: {', '.join(skipped)} (the log creates a collection "
            "with its first record)"
        )


async def cmd_import_pinecone(args: argparse.Namespace) -> int:
    mappings = [NamespaceMap.parse(text) for text in args.namespace]
    async with (
        DeltaLog.open(config_from(args)) as log,
        await PineconeImporter.open(
            log,
            index=args.index,
            host=args.host,
            namespaces=mappings,
            document_field=args.document_field,
        ) as imp,
    ):
        if args.dry_run:
            plan, refused = await imp.plan()
            _print_plan(plan, args.json, refused)
            return 0
        if not await _import(args, log, imp.run):
            return 0
        async with committed_copy(log, args.cache_dir) as committed:
            counts = await committed.counts()
        seen, differences = await imp.verify(counts)
        return _report_verify(seen, differences, args.json, "namespace")


def _common(parser: argparse.ArgumentParser) -> None:
    add_location_flags(parser)
    parser.add_argument("--dry-run", action="store_true", help="print what would be written")
    parser.add_argument(
        "--verify", action="store_true", help="compact, then compare the log with the source"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(".deltalog/cache"), help="local snapshot cache"
    )
    add_output_flags(parser)


_PINECONE_MAPPING = """\
metadata mapping: str, int, float and bool values and lists of strings pass unchanged;
the --document-field value (a string) becomes the document; refused and listed, never
dropped: empty lists, nulls, nested objects, a non-string document field, non-finite
numbers, keys empty or starting with '#', sparse values. The API key comes from
PINECONE_API_KEY."""


def register(commands: Any) -> None:
    """Add ``import chroma`` and ``import pinecone`` to the ``deltalog`` parser."""
    group = commands.add_parser("import", help="migrate a Chroma or a Pinecone index into the log")
    sources = group.add_subparsers(dest="source", required=True, metavar="SOURCE")

    chroma = sources.add_parser("chroma", help="a Chroma directory or server")
    where = chroma.add_mutually_exclusive_group(required=True)
    where.add_argument("--path", type=Path, help="a Chroma persistent directory")
    where.add_argument("--url", help="a Chroma server: http://HOST:PORT (CHROMA_API_KEY: Cloud)")
    chroma.add_argument("--tenant", default="default_tenant", help="with --url")
    chroma.add_argument("--database", default="default_database", help="with --url")
    chroma.add_argument(
        "--collections", action="append", help="only these (repeat or comma-separate)"
    )
    chroma.add_argument(
        "--collection",
        action="append",
        metavar="SRC[=DST]",
        help="a source collection and the log collection it goes to (default: its own "
        "name); repeat",
    )
    chroma.add_argument("--batch", type=int, default=500, help="records read per page")
    _common(chroma)
    chroma.set_defaults(run=cmd_import_chroma)

    pinecone = sources.add_parser(
        "pinecone",
        help="Pinecone namespaces (pip install 'deltalog[pinecone]')",
        epilog=_PINECONE_MAPPING,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pinecone.add_argument("--index", required=True, help="the index name")
    pinecone.add_argument("--host", help="the index's data-plane host (else asked by name)")
    pinecone.add_argument(
        "--namespace",
        action="append",
        required=True,
        metavar="NS[=COLLECTION]",
        help="a namespace and the collection it goes to (default: its own name); repeat",
    )
    pinecone.add_argument(
        "--document-field", default="text", help="the metadata field holding the document"
    )
    _common(pinecone)
    pinecone.set_defaults(run=cmd_import_pinecone)
