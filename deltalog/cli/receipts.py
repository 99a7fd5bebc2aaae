"""The receipts commands: ``generate``, ``ingest``, ``query``.

``query --where key=value`` (repeatable; values typed: ``true``/``false``
are bools, numbers are numbers, anything else a string) or ``--where-json``
for Chroma's full filter syntax. The text is embedded with the configured
embedder, which must be the one the collection was written with (the
dimensions are checked).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

import anyio

from deltalog.cli.options import (
    add_embedder_flags,
    add_location_flags,
    add_output_flags,
    config_from,
)
from deltalog.cli.output import print_fields, print_table
from deltalog.cli.process import exit_on_signal, interruptible
from deltalog.cli.progress import ProgressDisplay
from deltalog.errors import DimensionMismatch, InvalidInput
from deltalog.log import DeltaLog
from deltalog.reader import QueryResult, Reader
from deltalog.receipts.embed import Embedder, make_embedder
from deltalog.receipts.generate import generate_receipts
from deltalog.receipts.ingest import IngestProgress, IngestSummary, ingest_file
from deltalog.receipts.model import write_jsonl

__all__ = [
    "describe_embedder",
    "ingest_display",
    "parse_where",
    "print_results",
    "register",
    "show_ingest",
]


async def cmd_generate(args: argparse.Namespace) -> int:
    """``deltalog generate --receipts N --out PATH [--seed S]``."""
    if args.receipts < 0:
        print("deltalog generate: --receipts must be >= 0", file=sys.stderr)
        return 2
    out = Path(args.out)
    receipts = generate_receipts(args.receipts, seed=args.seed)
    count = await anyio.to_thread.run_sync(write_jsonl, out, receipts)
    print(f"wrote {count} receipts to {out} (seed {args.seed})")
    return 0


async def cmd_ingest(args: argparse.Namespace) -> int:
    """``deltalog ingest receipts.jsonl [--on-error stop|skip] [--concurrency N] ...``."""
    embedder = make_embedder(args.embedder, dim=args.dim)
    seen: list[IngestProgress] = []
    try:
        async with DeltaLog.open(config_from(args)) as log:
            total = await anyio.to_thread.run_sync(_count_lines, Path(args.path))
            with ingest_display(total, quiet=args.quiet) as display:

                def progress(p: IngestProgress) -> None:
                    seen[:] = [p]
                    show_ingest(display, p)

                outcome = await interruptible(
                    lambda: ingest_file(
                        args.path,
                        log,
                        embedder,
                        on_error=args.on_error,
                        concurrency=args.concurrency,
                        progress=progress,
                        on_skip=lambda error: display.warn(f"skipped: {error}"),
                    )
                )
    finally:
        await embedder.aclose()
    if isinstance(outcome, signal.Signals):
        _report_interrupted(total, seen[0] if seen else None)
        return exit_on_signal(outcome)
    print(f"embedder {describe_embedder(embedder)}, log {log.config.log}")
    print_summary(outcome)
    return 0


def _report_interrupted(total: int | None, progress: IngestProgress | None) -> None:
    """What an interrupted ingest did and did not do, and that a rerun resumes."""
    receipts = progress.receipts if progress else 0
    errors = progress.errors if progress else 0
    duplicates = progress.duplicates if progress else 0
    left = "the rest"
    if total is not None:
        left = f"{total - receipts - errors:,} of the {total:,} lines"
    print(
        f"ingest interrupted: {receipts:,} receipts are in the log ({receipts - duplicates:,} "
        f"written now, {duplicates:,} were there already), {errors:,} lines refused; {left} "
        "not ingested (a receipt being written when it stopped is in the log whole or not at "
        "all). Run the same command again to resume: it skips what the log holds and "
        "writes nothing twice",
        file=sys.stderr,
    )


def ingest_display(total: int | None, *, quiet: bool = False) -> ProgressDisplay:
    """The progress display of an ingest of a file of ``total`` lines."""
    return ProgressDisplay("ingest", unit="lines", total=total, quiet=quiet)


def show_ingest(display: ProgressDisplay, progress: IngestProgress) -> None:
    """An ingest's progress: lines done (receipts and refused lines) against the file's."""
    display.update(
        progress.receipts + progress.errors,
        receipts=progress.receipts,
        vectors=progress.vectors,
        duplicates=progress.duplicates,
        errors=progress.errors,
    )


def print_summary(summary: IngestSummary) -> None:
    print_fields(summary.rows())


def _count_lines(path: Path) -> int | None:
    """Non-blank lines of a JSONL file: the ingest's total (None if unreadable: ingest says why)."""
    try:
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def _typed(text: str) -> str | int | float | bool:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def parse_where(pairs: list[str] | None, raw_json: str | None) -> dict[str, Any] | None:
    """The filter named by ``--where k=v`` flags and ``--where-json``."""
    where: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--where takes key=value, got {pair!r}")
        where[key] = _typed(value)
    if raw_json:
        try:
            extra = json.loads(raw_json)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"--where-json is not valid JSON: {exc}") from exc
        if not isinstance(extra, dict):
            raise InvalidInput("--where-json must be a JSON object")
        where.update(extra)
    return where or None


def print_results(result: QueryResult, *, title: str | None = None, ids: bool = True) -> None:
    """The first query's results as a table: rank, distance, document, merchant (, id)."""
    found, distances = result["ids"][0], result["distances"][0]
    documents, metadatas = result["documents"][0], result["metadatas"][0]
    if not found:
        print("no results")
        return
    rows: list[tuple[object, ...]] = [
        (rank, f"{distance:.4f}", repr(document), (metadata or {}).get("merchant_name", ""), id_)
        for rank, (id_, distance, document, metadata) in enumerate(
            zip(found, distances, documents, metadatas, strict=True), start=1
        )
    ]
    columns = ["#", "distance", "document", "merchant", "id"]
    if not ids:
        columns, rows = columns[:-1], [row[:-1] for row in rows]
    print_table(columns, rows, title=title, right=["#", "distance"])


def describe_embedder(embedder: Embedder) -> str:
    """Which embedder this is, in words: its name, dimension and kind."""
    kind = {
        "wordllama": "WordLlama, a static embedding model shipped in its wheel, offline",
        "openai": "the OpenAI embeddings API",
        "hashing-v1": "feature hashing: spelling, not meaning",
    }.get(embedder.name.split(":")[0], "a custom embedder")
    return f"{embedder.name} ({embedder.dim} dims): {kind}"


async def cmd_query(args: argparse.Namespace) -> int:
    where = parse_where(args.where, args.where_json)
    embedder = make_embedder(args.embedder, dim=args.dim)
    try:
        vectors = await embedder.embed([args.text])
        async with Reader.open(
            config_from(args), consistency=args.consistency, cache_dir=Path(args.cache_dir)
        ) as reader:
            result = await reader.query(
                collection=args.collection, query_embeddings=vectors, n_results=args.k, where=where
            )
    except DimensionMismatch as exc:
        raise DimensionMismatch(
            exc.collection,
            known=exc.known,
            got=exc.got,
            source=f"the query, embedded with {embedder.name},",
            log=exc.log,
        ) from exc
    finally:
        await embedder.aclose()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        title = f"{args.collection} like {args.text!r}, embedded with {describe_embedder(embedder)}"
        print_results(result, title=title)
    return 0


def register(commands: Any) -> None:
    """Add ``generate``, ``ingest`` and ``query`` to the ``deltalog`` parser."""
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
    add_embedder_flags(ingest)
    add_location_flags(ingest)
    add_output_flags(ingest, json=False)
    ingest.set_defaults(run=cmd_ingest)

    query = commands.add_parser("query", help="embed a text and search a collection")
    add_location_flags(query)
    query.add_argument("--collection", required=True, help="words or lines")
    query.add_argument("--text", required=True, help="the text to embed and search for")
    query.add_argument("-k", type=int, default=10, help="results to return")
    query.add_argument("--where", action="append", help="metadata filter key=value (repeatable)")
    query.add_argument("--where-json", help="a Chroma where filter as JSON")
    query.add_argument("--consistency", choices=["snapshot", "fresh"], default="snapshot")
    add_embedder_flags(query)
    query.add_argument("--cache-dir", default=".deltalog/cache", help="local snapshot cache")
    add_output_flags(query, quiet=False)
    query.set_defaults(run=cmd_query)
