"""The README's main command: the whole story on an embedded endpoint.

1. start moto's S3 + DynamoDB server on loopback (unless ``AWS_ENDPOINT_URL``
   points elsewhere) and create the bucket and table;
2. generate synthetic receipts and ingest them with concurrent producers
   (one delta per receipt, group commit, idempotency keys);
3. compact, ingest more, compact again: the second run applies only what
   is new;
4. rebuild from seq 1 and verify it equals the incremental snapshot;
5. label updates, a merchant update, a receipt deletion and a new receipt,
   not compacted yet: fresh reads see them, snapshot reads do not;
6. the queries people run, then a last compaction and a summary table.

The embedder is ``--embedder`` (README "Embedders"): by default OpenAI's when
``OPENAI_API_KEY`` is set, else the offline WordLlama model. The query step
searches by meaning with a few typed texts whose neighbours are other
spellings and other words for the same field (``_SEARCHES``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from compactor import CompactionResult, Compactor
from deltalog.cli.options import add_embedder_flags, add_output_flags
from deltalog.cli.output import print_fields
from deltalog.cli.progress import ProgressDisplay, compaction_progress
from deltalog.cli.receipts import describe_embedder, ingest_display, print_results, show_ingest
from deltalog.config import LogConfig
from deltalog.errors import DataError
from deltalog.log import DeltaLog
from deltalog.reader import Reader
from deltalog.receipts.embed import Embedder, make_embedder
from deltalog.receipts.generate import generate_receipts
from deltalog.receipts.ingest import IngestSummary, LabelUpdate, ReceiptProducer, ingest_file
from deltalog.receipts.model import Receipt, write_jsonl
from deltalog.storage.create import ensure_storage
from deltalog.storage.endpoint import FAKE_CREDENTIALS, EmbeddedEndpoint

__all__ = ["register"]


@dataclass
class _Tally:
    ingests: list[IngestSummary] = field(default_factory=list)
    compactions: list[CompactionResult] = field(default_factory=list)
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)


def _step(tally: _Tally, title: str) -> None:
    tally.steps += 1
    elapsed = time.perf_counter() - tally.started
    print(f"\n[{tally.steps}] {title}  (t={elapsed:.1f}s)", flush=True)


@contextmanager
def _endpoint() -> Iterator[str]:
    with ExitStack() as stack:
        url = os.environ.get("AWS_ENDPOINT_URL")
        if not url:
            url = stack.enter_context(EmbeddedEndpoint()).url
            for name, value in FAKE_CREDENTIALS.items():
                os.environ.setdefault(name, value)
        yield url


async def _ingest(tally: _Tally, log: DeltaLog, setup: _Setup, name: str, total: int) -> None:
    with ingest_display(total, quiet=setup.quiet) as display:
        summary = await ingest_file(
            setup.work / name,
            log,
            setup.embedder,
            concurrency=setup.concurrency,
            progress=lambda p: show_ingest(display, p),
        )
    tally.ingests.append(summary)
    print(
        f"    {summary.receipts} receipts, {summary.vectors:,} vectors in {summary.seconds:.1f}s "
        f"({summary.receipts_per_second:,.0f} receipts/s, {summary.vectors_per_second:,.0f} "
        f"vectors/s) as {summary.deltas_written} deltas in {summary.entries_written} entries"
    )


async def _compact(
    tally: _Tally, compactor: Compactor, log: DeltaLog, quiet: bool
) -> CompactionResult:
    with ProgressDisplay("compact", unit="seqs", quiet=quiet) as display:
        compactor.progress = compaction_progress(display, await log.head())
        result = await compactor.run_once()
    tally.compactions.append(result)
    print(f"    {result.summary()}")
    return result


async def _changes(
    log: DeltaLog, embedder: Embedder, receipts: list[Receipt], late: Receipt
) -> None:
    target, doomed = receipts[0], receipts[1]
    totals = [
        LabelUpdate(
            r.image_id, r.receipt_id, w.line_id, w.word_id, add=["GRAND_TOTAL"], status="validated"
        )
        for r in receipts[:5]
        for w in r.words
        if w.text.upper() == "TOTAL"
    ]
    async with ReceiptProducer(log, embedder) as producer:
        if totals:
            await producer.update_labels(totals)
        await producer.set_merchant(target, "Corner Market")
        await producer.delete_receipt(doomed)
        added = await producer.add(late)
    print(
        f"    labelled {len(totals)} TOTAL words GRAND_TOTAL, renamed receipt "
        f"{_name(target)}'s merchant to 'Corner Market', deleted receipt {_name(doomed)}, "
        f"added receipt {_name(late)} ({added.vectors} vectors) at seq {added.seq}"
    )


async def _fresh_vs_snapshot(
    config: LogConfig, cache: Path, receipts: list[Receipt], late: Receipt
) -> None:
    doomed = receipts[1]
    async with (
        Reader.open(config, consistency="snapshot", cache_dir=cache) as snapshot,
        Reader.open(config, consistency="fresh", cache_dir=cache) as fresh,
    ):
        for name, reader in (("snapshot", snapshot), ("fresh   ", fresh)):
            new = await reader.get(
                collection="words",
                where={"receipt_id": late.receipt_id, "image_id": str(late.image_id)},
            )
            gone = await reader.get(
                collection="words",
                where={"receipt_id": doomed.receipt_id, "image_id": str(doomed.image_id)},
            )
            renamed = await reader.get(collection="lines", where={"merchant_name": "Corner Market"})
            print(
                f"    {name} read: new receipt {len(new['ids'])} words, deleted receipt "
                f"{len(gone['ids'])} words, 'Corner Market' lines {len(renamed['ids'])}"
            )
        stats = fresh.statistics()
        print(
            f"    the fresh reader folded {stats.tail_entries} tail entries after hwm {stats.hwm}"
        )


_SEARCHES = (
    ("words", "walmart", "a spelling as a person types it; receipts print WAL*MART"),
    ("lines", "fruit", "other words for the same field: no item line says 'fruit'"),
    ("lines", "credit card payment", "payment lines name the card, never 'credit card'"),
)
"""The demo's searches: the text typed, and what a semantic neighbour shows there."""


async def _queries(
    config: LogConfig, cache: Path, embedder: Embedder, receipts: list[Receipt]
) -> None:
    """Searches by meaning, then the queries people run (RECEIPTS.md) by metadata."""
    source = receipts[2]
    print(f"    searches embedded with {describe_embedder(embedder)}")
    async with Reader.open(config, consistency="fresh", cache_dir=cache) as reader:
        for collection, text, why in _SEARCHES:
            near = await reader.query(
                collection=collection, query_embeddings=await embedder.embed([text]), n_results=5
            )
            print(f"    {collection} like {text!r}: {why}")
            print_results(near, ids=False)
        words = await reader.get(
            collection="words",
            where={"image_id": str(source.image_id), "receipt_id": source.receipt_id},
        )
        print(f"    all words of receipt {_name(source)}: {len(words['ids'])}")
        totals = await reader.get(collection="lines", where={"section_label": "TOTAL_LINE"})
        print(f"    lines labelled TOTAL_LINE: {len(totals['ids'])}")
        labelled = await reader.get(collection="words", where={"label_GRAND_TOTAL": True})
        print(f"    words validated as GRAND_TOTAL: {len(labelled['ids'])}")


def _name(receipt: Receipt) -> str:
    return f"{str(receipt.image_id)[:8]}/{receipt.receipt_id}"


@dataclass(frozen=True)
class _Setup:
    config: LogConfig
    work: Path
    embedder: Embedder
    concurrency: int
    quiet: bool
    first: list[Receipt]
    second: list[Receipt]
    late: Receipt


async def cmd_demo(args: argparse.Namespace) -> int:
    tally = _Tally()
    work = Path(tempfile.mkdtemp(prefix="deltalog-demo-"))
    embedder = make_embedder(args.embedder, dim=args.dim)
    try:
        with _endpoint() as endpoint:
            config = LogConfig(
                bucket="deltalog-demo", table="deltalog-demo", log="receipts", endpoint_url=endpoint
            )
            _step(tally, f"S3 + DynamoDB endpoint at {endpoint}; bucket and table created")
            await ensure_storage(config)
            receipts = list(generate_receipts(args.receipts + args.more + 1, seed=args.seed))
            setup = _Setup(
                config,
                work,
                embedder,
                args.concurrency,
                args.quiet,
                receipts[: args.receipts],
                receipts[args.receipts : -1],
                receipts[-1],
            )
            write_jsonl(work / "first.jsonl", setup.first)
            write_jsonl(work / "second.jsonl", setup.second)
            kept = "kept: --keep" if args.keep else "removed at the end; --keep keeps it"
            print(f"    embedder {describe_embedder(embedder)}")
            print(f"    receipts and caches in {work} ({kept})")
            await _story(tally, setup)
    finally:
        await embedder.aclose()
        if not args.keep:
            await anyio.to_thread.run_sync(shutil.rmtree, work, True)
    return 0


async def _story(tally: _Tally, setup: _Setup) -> None:
    config, work, embedder = setup.config, setup.work, setup.embedder
    quiet = setup.quiet
    async with (
        DeltaLog.open(config) as log,
        Compactor(config, cache_dir=work / "cache", grace=5) as compactor,
    ):
        _step(tally, f"ingest {len(setup.first)} receipts with concurrent producers")
        await _ingest(tally, log, setup, "first.jsonl", len(setup.first))
        _step(tally, "compact")
        await _compact(tally, compactor, log, quiet)
        _step(tally, f"ingest {len(setup.second)} more receipts, compact again: only what is new")
        await _ingest(tally, log, setup, "second.jsonl", len(setup.second))
        await _compact(tally, compactor, log, quiet)
        _step(tally, "ingest the first file again: idempotency keys write nothing twice")
        await _ingest(tally, log, setup, "first.jsonl", len(setup.first))
        _step(tally, "rebuild from seq 1 and verify against the incremental snapshot")
        await _rebuild_and_verify(compactor)
        _step(tally, "label updates, a merchant update, a deletion, a new receipt (not compacted)")
        await _changes(log, embedder, setup.first, setup.late)
        _step(tally, "fresh reads see the tail; snapshot reads do not")
        await _fresh_vs_snapshot(config, work / "reader", setup.first, setup.late)
        _step(tally, "queries")
        await _queries(config, work / "reader", embedder, setup.first)
        lag_before = (await log.status()).lag
        _step(tally, "compact the tail")
        await _compact(tally, compactor, log, quiet)
        status = await log.status()
    _summary(tally, status.head, lag_before, status.lag, status.state.snapshot_size)


async def _rebuild_and_verify(compactor: Compactor) -> None:
    rebuilt = await compactor.rebuild()
    verified = await compactor.verify()
    print(
        f"    rebuilt to seq {rebuilt.hwm}: {rebuilt.vectors_upserted:,} vectors "
        f"in {rebuilt.seconds:.1f}s"
    )
    verdict = "equal" if verified.ok else f"{verified.difference_count} differences"
    print(f"    verify: {verified.records:,} records, {verdict}")
    if not verified.ok:
        raise DataError("verify found differences: " + "; ".join(verified.differences[:5]))


def _summary(tally: _Tally, head: int, lag_before: int, lag_after: int, snapshot_size: int) -> None:
    ingest_s = sum(i.seconds for i in tally.ingests[:2])
    receipts = sum(i.receipts for i in tally.ingests[:2])
    vectors = sum(i.vectors for i in tally.ingests[:2])
    applied = [c for c in tally.compactions if c.status == "applied"]
    compact_s = sum(c.seconds for c in applied)
    upserted = sum(c.vectors_upserted for c in applied)
    rows = [
        ("receipts ingested", f"{receipts:,}"),
        ("vectors written", f"{vectors:,}"),
        ("log entries (head)", f"{head:,}"),
        (
            "ingest throughput",
            f"{receipts / ingest_s:,.1f} receipts/s, {vectors / ingest_s:,.0f} vectors/s",
        ),
        ("compaction runs", " + ".join(map(_run_cost, applied))),
        ("compaction throughput", f"{upserted / max(compact_s, 1e-9):,.0f} vectors/s"),
        ("lag before / after the last run", f"{lag_before} / {lag_after} entries"),
        ("checkpoint size", f"{snapshot_size / 2**20:,.1f} MiB"),
        (
            "rerun of the first file",
            f"{tally.ingests[2].duplicates_skipped} duplicates skipped, "
            f"{tally.ingests[2].vectors} vectors written",
        ),
        ("total time", f"{time.perf_counter() - tally.started:.1f}s"),
    ]
    print()
    print_fields(rows, title="summary")


def _run_cost(run: CompactionResult) -> str:
    """What a run applied and what it uploaded: a checkpoint, or nothing (a committed tail)."""
    if run.checkpoint:
        uploaded = f"checkpoint: {run.snapshot_size / 2**20:,.1f} MiB uploaded"
    else:
        uploaded = f"tail of {run.tail_entries}: nothing uploaded"
    return f"{run.entries_applied} entries ({uploaded})"


def register(commands: Any) -> None:
    """Add ``demo`` to the ``deltalog`` parser."""
    demo = commands.add_parser(
        "demo", help="run the whole story on an embedded S3/DynamoDB endpoint on loopback"
    )
    demo.add_argument("--receipts", type=int, default=120, help="receipts in the first batch")
    demo.add_argument("--more", type=int, default=60, help="receipts in the second batch")
    demo.add_argument("--concurrency", type=int, default=8, help="receipts embedded at once")
    add_embedder_flags(demo)
    demo.add_argument("--seed", type=int, default=7, help="receipt generator seed")
    demo.add_argument(
        "--keep", action="store_true", help="keep the demo's receipts and caches (a temp dir)"
    )
    add_output_flags(demo, json=False)
    demo.set_defaults(run=cmd_demo)
