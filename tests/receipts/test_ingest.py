"""Receipts into the log: one delta per receipt, idempotent reruns, bad lines, changes.

Runs against moto's S3 + DynamoDB server (the ``log`` fixture: a fresh log
per test) with a small hashing embedder; the invalid-key case uses the real
OpenAI client against the local OpenAI-compatible server.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import anyio
import msgspec
import numpy as np
import numpy.typing as npt
import pytest

from deltalog import DeltaLog, LogConfig
from deltalog.cli import main
from deltalog.codec import Frame, batch_body, encode_delta
from deltalog.entry import Delete, Delta, UpdateMetadata, Upsert
from deltalog.errors import ConfigurationError, DimensionMismatch, InvalidInput, Unavailable
from deltalog.receipts import ingest as ingest_module
from deltalog.receipts.embed import HashingEmbedder, OpenAIEmbedder
from deltalog.receipts.generate import generate_receipts
from deltalog.receipts.ingest import (
    Added,
    LabelUpdate,
    ReceiptProducer,
    ingest_file,
    receipt_key,
)
from deltalog.receipts.model import (
    InvalidReceipt,
    Receipt,
    encode_receipt,
    line_records,
    receipt_ids,
    word_records,
    write_jsonl,
)
from deltalog.storage.faults import Request
from deltalog.storage.store import MemoryStore, StoredObject
from deltalog.storage.table import Claim, MemoryTable
from tests.http_stubs import closed_port
from tests.openai_server import API_KEY, OpenAIServer

DIM = 16


@pytest.fixture
def embedder() -> HashingEmbedder:
    return HashingEmbedder(DIM)


@pytest.fixture(scope="module")
def receipts() -> list[Receipt]:
    return list(generate_receipts(8, seed=21))


async def deltas(log: DeltaLog) -> list[tuple[int, Delta]]:
    return [(seq, d) async for seq, entry in log.read() for d in entry.deltas]


async def upserted_receipts(log: DeltaLog) -> set[str]:
    """``image/receipt`` of every receipt upserted in the log."""
    found = set()
    for _, delta in await deltas(log):
        for op in delta.ops:
            if isinstance(op, Upsert) and op.collection == "lines" and op.metadatas:
                meta = op.metadatas[0]
                found.add(f"{meta['image_id']}/{meta['receipt_id']}")
    return found


def key_of(receipt: Receipt) -> str:
    return f"{receipt.image_id}/{receipt.receipt_id}"


def jsonl(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# -- ReceiptProducer -------------------------------------------------------------


async def test_one_receipt_is_one_delta_as_documented(
    log: DeltaLog, embedder: HashingEmbedder, receipts: list[Receipt]
) -> None:
    receipt = receipts[0]
    async with ReceiptProducer(log, embedder) as producer:
        added = await producer.add(receipt)
    words, lines = word_records(receipt), line_records(receipt)
    assert not added.duplicate and added.vectors == len(words.ids) + len(lines.ids)
    ((seq, delta),) = await deltas(log)
    assert seq == added.seq
    assert delta.idempotency_key == receipt_key(receipt, embedder)
    word_op, line_op = delta.ops
    assert isinstance(word_op, Upsert) and isinstance(line_op, Upsert)
    assert (word_op.collection, line_op.collection) == ("words", "lines")
    for op, records in ((word_op, words), (line_op, lines)):
        assert op.ids == records.ids
        assert op.documents == records.documents
        assert op.metadatas == records.metadatas
        assert np.array_equal(op.embeddings, embedder.embed_sync(records.inputs))
    first_word = receipt.words[0]
    assert word_op.ids[0] == (
        f"IMAGE#{receipt.image_id}#RECEIPT#{receipt.receipt_id:05d}"
        f"#LINE#{first_word.line_id:05d}#WORD#{first_word.word_id:05d}"
    )
    assert line_op.ids[0] == f"IMAGE#{receipt.image_id}#RECEIPT#{receipt.receipt_id:05d}#LINE#00000"


async def test_receipt_without_words_is_refused(
    log: DeltaLog, embedder: HashingEmbedder, receipts: list[Receipt]
) -> None:
    empty = msgspec.structs.replace(receipts[0], words=[])
    async with ReceiptProducer(log, embedder) as producer:
        with pytest.raises(InvalidReceipt, match="has no words"):
            await producer.add(empty)
    assert await log.head() == 0


async def test_adding_again_writes_nothing_and_embeds_nothing(
    log: DeltaLog, embedder: HashingEmbedder, receipts: list[Receipt]
) -> None:
    async with ReceiptProducer(log, embedder) as producer:
        first = await producer.add_many(receipts[:3])
        head = await log.head()
        texts = embedder.statistics().texts
        again = await producer.add_many([receipts[1], receipts[1], receipts[0]])
        stats = producer.statistics()
    assert all(a.duplicate for a in again)
    assert {a.seq for a in again} <= {a.seq for a in first}
    assert await log.head() == head
    assert embedder.statistics().texts == texts
    assert (stats.receipts_added, stats.duplicates_skipped) == (3, 3)


async def test_two_producers_adding_the_same_receipts_write_each_once(
    log: DeltaLog, embedder: HashingEmbedder, receipts: list[Receipt]
) -> None:
    results: list[list[Added]] = [[], []]

    async def produce(i: int) -> None:
        async with ReceiptProducer(log, embedder, linger_ms=30) as producer:
            results[i] = await producer.add_many(receipts[:4])

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce, 0)
        tg.start_soon(produce, 1)
    # Each receipt is written once, and both producers are told where. (Which
    # one learns it was a duplicate depends on where the race is decided:
    # before embedding, or in the append protocol.)
    assert [a.seq for a in results[0]] == [a.seq for a in results[1]]
    written = await deltas(log)
    assert len(written) == 4
    assert await upserted_receipts(log) == {key_of(r) for r in receipts[:4]}


class _OtherProcess:
    """Another process that claimed a receipt's key at ``seq`` and writes its entry on cue."""

    def __init__(self, log: DeltaLog, key: str, seq: int) -> None:
        self.log, self.key, self.seq = log, key, seq
        self.written = False

    async def claim(self) -> None:
        await self.log.table.claim_keys(self.log.keys.log_id, [Claim(self.key, self.seq, "other")])

    async def finish(self) -> None:
        delta = Delta(ops=[Delete("words", ["x"])], idempotency_key=self.key)
        body = batch_body("other", [encode_delta(delta)], created_at=0.0)
        assert await self.log.store.put_if_absent(
            self.log.keys.entry(self.seq), Frame(body).at(self.seq)
        )
        self.written = True


class _StoreThatFinishesOnAMiss(MemoryStore):
    """The other process writes its entry right after our producer finds it missing twice.

    The first miss is the add's look for a duplicate (before embedding), the second the
    append's check of the key's claim, which answers ``Conflict``: the add must retry.
    """

    other: _OtherProcess | None = None
    misses = 0

    async def get(self, key: str) -> StoredObject | None:
        found = await super().get(key)
        other = self.other
        if found is None and other and not other.written and key == other.log.keys.entry(other.seq):
            self.misses += 1
            if self.misses == 2:
                await other.finish()
        return found


@pytest.fixture
async def hooked_log() -> AsyncIterator[DeltaLog]:
    config = LogConfig(bucket="memory", table="memory", log="mem")
    store = _StoreThatFinishesOnAMiss()
    async with DeltaLog.open(config, store=store, table=MemoryTable()) as opened:
        yield opened


async def test_a_receipt_another_process_is_writing_is_waited_for(
    hooked_log: DeltaLog, embedder: HashingEmbedder, receipts: list[Receipt]
) -> None:
    """The key is claimed by an entry not written yet: the add gets a conflict, retries, sees it."""
    receipt, log = receipts[0], hooked_log
    seq = await log.table.reserve(log.keys.log_id)
    other = _OtherProcess(log, receipt_key(receipt, embedder), seq)
    await other.claim()
    assert isinstance(log.store, _StoreThatFinishesOnAMiss)
    log.store.other = other
    async with ReceiptProducer(log, embedder) as producer:
        added = await producer.add(receipt)
    assert other.written and log.store.misses == 2
    assert (added.seq, added.duplicate, added.vectors) == (seq, True, 0)
    assert producer.statistics().receipts_added == 0
    assert await log.head() == seq


async def test_a_receipt_a_stopped_producer_left_claimed_is_written_once_past_the_grace(
    config: LogConfig,
    embedder: HashingEmbedder,
    receipts: list[Receipt],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 19 item 3: a rerun at once keeps retrying until the claim is older than the
    grace, then the append seals the unwritten seq and writes the receipt."""
    monkeypatch.setattr(ingest_module, "_CONFLICT_ATTEMPTS", 1)  # only the grace keeps trying
    receipt = receipts[0]
    async with DeltaLog.open(dataclasses.replace(config, grace=0.5)) as log:
        seq = await log.table.reserve(log.keys.log_id)
        stopped = Claim(receipt_key(receipt, embedder), seq, "stopped", time.time())
        await log.table.claim_keys(log.keys.log_id, [stopped])
        async with ReceiptProducer(log, embedder) as producer:
            added = await producer.add(receipt)
        assert (added.seq, added.duplicate) == (seq + 1, False)
        entries = [entry async for _, entry in log.read()]
    assert [entry.is_seal for entry in entries] == [True, False]


class _EmbedderWhileAnotherFinishes(HashingEmbedder):
    """The other process's entry lands while our receipt is being embedded."""

    other: _OtherProcess | None = None

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if self.other is not None and not self.other.written:
            await self.other.finish()
        return await super().embed(texts)


async def test_a_receipt_another_process_wrote_meanwhile_counts_as_a_duplicate(
    memory_log: DeltaLog, receipts: list[Receipt]
) -> None:
    """Not in the log when the add looked, durable by the time it submits: a duplicate."""
    receipt, log = receipts[0], memory_log
    embedder = _EmbedderWhileAnotherFinishes(DIM)
    seq = await log.table.reserve(log.keys.log_id)
    embedder.other = other = _OtherProcess(log, receipt_key(receipt, embedder), seq)
    await other.claim()
    async with ReceiptProducer(log, embedder) as producer:
        added = await producer.add(receipt)
    assert other.written
    assert (added.seq, added.duplicate, added.vectors) == (seq, True, 0)
    stats = producer.statistics()
    assert (stats.receipts_added, stats.duplicates_skipped) == (0, 1)
    assert await log.head() == seq


async def test_changed_receipt_is_written_again(
    log: DeltaLog, embedder: HashingEmbedder, receipts: list[Receipt]
) -> None:
    renamed = msgspec.structs.replace(receipts[0], merchant_name="Costco Wholesale")
    async with ReceiptProducer(log, embedder) as producer:
        first = await producer.add(receipts[0])
        second = await producer.add(renamed)
    assert not second.duplicate and second.seq > first.seq


async def test_label_merchant_and_delete_deltas(
    log: DeltaLog, embedder: HashingEmbedder, receipts: list[Receipt]
) -> None:
    receipt = receipts[0]
    w0, w1 = receipt.words[0], receipt.words[1]
    async with ReceiptProducer(log, embedder) as producer:
        await producer.add(receipt)
        labels_seq = await producer.update_labels(
            [
                LabelUpdate(
                    receipt.image_id,
                    receipt.receipt_id,
                    w0.line_id,
                    w0.word_id,
                    add=["MERCHANT_NAME"],
                    status="validated",
                ),
                LabelUpdate(
                    str(receipt.image_id),
                    receipt.receipt_id,
                    w1.line_id,
                    w1.word_id,
                    remove=["TAX"],
                ),
            ]
        )
        merchant_seq = await producer.set_merchant(receipt, "Trader Joe's")
        delete_seq = await producer.delete_receipt(receipt)
        with pytest.raises(InvalidInput, match="changes nothing"):
            await producer.update_labels([LabelUpdate(receipt.image_id, 1, 0, 0)])
        assert producer.statistics().deltas_written == 4
    by_seq = dict(await deltas(log))
    word_ids, line_ids = receipt_ids(receipt)

    (labels,) = by_seq[labels_seq].ops
    assert isinstance(labels, UpdateMetadata) and labels.collection == "words"
    assert labels.ids == word_ids[:2]
    assert labels.metadatas == [
        {"label_MERCHANT_NAME": True, "label_status": "validated"},
        {"label_TAX": None},
    ]

    words_op, lines_op = by_seq[merchant_seq].ops
    assert isinstance(words_op, UpdateMetadata) and isinstance(lines_op, UpdateMetadata)
    assert (words_op.ids, lines_op.ids) == (word_ids, line_ids)
    assert {m["merchant_name"] for m in words_op.metadatas + lines_op.metadatas} == {"Trader Joe's"}

    deleted_words, deleted_lines = by_seq[delete_seq].ops
    assert isinstance(deleted_words, Delete) and isinstance(deleted_lines, Delete)
    assert (deleted_words.collection, deleted_words.ids) == ("words", word_ids)
    assert (deleted_lines.collection, deleted_lines.ids) == ("lines", line_ids)


# -- ingest_file -------------------------------------------------------------------


async def test_ingesting_a_file_twice_adds_nothing_the_second_time(
    log: DeltaLog, embedder: HashingEmbedder, receipts: list[Receipt], tmp_path: Path
) -> None:
    path = tmp_path / "receipts.jsonl"
    write_jsonl(path, receipts)
    started = time.perf_counter()
    first = await ingest_file(path, log, embedder, concurrency=4)
    seconds = time.perf_counter() - started
    print(f"ingested {len(receipts)} receipts in {seconds:.2f}s: {len(receipts) / seconds:.1f}/s")
    before = await log.status()
    vectors = sum(len(r.words) + len(r.lines) for r in receipts)
    assert (first.receipts, first.vectors, first.deltas_written) == (8, vectors, 8)
    assert (first.duplicates_skipped, first.errors) == (0, 0)
    assert first.entries_written == before.entries
    assert await upserted_receipts(log) == {key_of(r) for r in receipts}

    second = await ingest_file(path, log, embedder)
    after = await log.status()
    assert (second.receipts, second.duplicates_skipped) == (8, 8)
    assert (second.vectors, second.deltas_written, second.entries_written) == (0, 0, 0)
    assert (after.head, after.entries) == (before.head, before.entries)


async def test_the_same_receipt_twice_in_a_file_is_written_once(
    log: DeltaLog, embedder: HashingEmbedder, receipts: list[Receipt], tmp_path: Path
) -> None:
    line = encode_receipt(receipts[0])
    summary = await ingest_file(jsonl(tmp_path / "r.jsonl", line, line, line), log, embedder)
    assert (summary.receipts, summary.deltas_written, summary.duplicates_skipped) == (3, 1, 2)
    assert len(await deltas(log)) == 1


async def test_stop_at_a_malformed_line_writes_nothing_from_it_on(
    log: DeltaLog, embedder: HashingEmbedder, receipts: list[Receipt], tmp_path: Path
) -> None:
    good = [encode_receipt(r) for r in receipts[:4]]
    path = jsonl(tmp_path / "r.jsonl", good[0], good[1], b'{"image_id": "oops"', good[2], good[3])
    with pytest.raises(InvalidReceipt, match=r"r\.jsonl:3: not a valid receipt") as caught:
        await ingest_file(path, log, embedder, on_error="stop")
    assert caught.value.line == 3
    assert await upserted_receipts(log) == {key_of(r) for r in receipts[:2]}


async def test_skip_reports_bad_lines_and_ingests_the_rest(
    log: DeltaLog, embedder: HashingEmbedder, receipts: list[Receipt], tmp_path: Path
) -> None:
    good = [encode_receipt(r) for r in receipts[:3]]
    no_words = encode_receipt(msgspec.structs.replace(receipts[3], words=[]))
    path = jsonl(tmp_path / "r.jsonl", good[0], b"not json", good[1], no_words, good[2])
    summary = await ingest_file(path, log, embedder, on_error="skip")
    assert (summary.receipts, summary.errors) == (3, 2)
    assert [m.split(": ", 1)[0] for m in summary.error_messages] == [
        f"{path}:2",
        f"{path}:4",
    ]
    assert "has no words" in summary.error_messages[1]
    assert await upserted_receipts(log) == {key_of(r) for r in receipts[:3]}


async def test_a_receipt_the_log_refuses_stops_at_its_line(
    config: LogConfig, receipts: list[Receipt], tmp_path: Path
) -> None:
    small = dataclasses.replace(config, max_delta_bytes=4096)  # no receipt's delta fits
    path = jsonl(tmp_path / "b.jsonl", encode_receipt(receipts[1]))
    async with DeltaLog.open(small) as log:
        with pytest.raises(InvalidReceipt, match=r"b\.jsonl:1: .*over max_delta_bytes"):
            await ingest_file(path, log, HashingEmbedder(DIM))
        skipped = await ingest_file(path, log, HashingEmbedder(DIM), on_error="skip")
        assert (skipped.receipts, skipped.errors) == (0, 1)
        assert await log.head() == 0


async def test_an_embedder_of_another_dimension_is_refused_before_any_embedding(
    log: DeltaLog, receipts: list[Receipt], tmp_path: Path
) -> None:
    first = jsonl(tmp_path / "a.jsonl", encode_receipt(receipts[0]))
    await ingest_file(first, log, HashingEmbedder(DIM))
    other = jsonl(tmp_path / "b.jsonl", *(encode_receipt(r) for r in receipts[1:4]))
    for on_error in ("stop", "skip"):  # not a bad line: the run stops whatever on_error says
        embedder = HashingEmbedder(DIM * 2)
        with pytest.raises(DimensionMismatch) as refused:
            await ingest_file(other, log, embedder, on_error=on_error)
        assert (refused.value.known, refused.value.got) == (DIM, DIM * 2)
        assert "the embedder hashing-v1 has 32" in str(refused.value)
        assert embedder.statistics().texts == 0
    assert await upserted_receipts(log) == {key_of(receipts[0])}


async def test_missing_file_is_invalid_input(
    log: DeltaLog, embedder: HashingEmbedder, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="cannot read"):
        await ingest_file(tmp_path / "absent.jsonl", log, embedder)


@pytest.fixture(scope="module")
def openai_server() -> Iterator[OpenAIServer]:
    with OpenAIServer(dim=DIM) as server:
        yield server


async def test_invalid_api_key_stops_with_one_clear_error(
    log: DeltaLog, openai_server: OpenAIServer, receipts: list[Receipt], tmp_path: Path
) -> None:
    path = tmp_path / "r.jsonl"
    write_jsonl(path, receipts)
    embedder = OpenAIEmbedder(api_key="sk-wrong", base_url=openai_server.url, dimensions=DIM)
    try:
        with pytest.raises(ConfigurationError, match=r"^invalid OpenAI API key"):
            await ingest_file(path, log, embedder, on_error="skip", concurrency=4)
    finally:
        await embedder.aclose()
    assert await log.head() == 0


async def test_an_outage_stops_the_run_with_one_clear_error(
    log: DeltaLog, openai_server: OpenAIServer, receipts: list[Receipt], tmp_path: Path
) -> None:
    """The embedding service goes down after two requests: the run stops, even when skipping."""
    path = tmp_path / "r.jsonl"
    write_jsonl(path, receipts)
    embedder = OpenAIEmbedder(
        api_key=API_KEY, base_url=openai_server.url, dimensions=DIM, max_retries=1
    )
    skipped: list[InvalidReceipt] = []
    openai_server.outage_after = 2
    try:
        with pytest.raises(Unavailable) as raised:
            await ingest_file(path, log, embedder, on_error="skip", concurrency=1,
                              on_skip=skipped.append)  # fmt: skip
    finally:
        openai_server.outage_after = None
        await embedder.aclose()
    assert str(raised.value).startswith("OpenAI embeddings failed after retries (HTTP 503)")
    assert skipped == [], "an outage is not a bad line"
    written = await upserted_receipts(log)
    # Only two receipts were embedded: at most those are written (whether they are
    # depends on how far they got when the run stopped "at once"), each whole.
    assert len(written) <= 2 < len(receipts), "nothing embedded after the outage is written"
    by_key = {key_of(r): r for r in receipts}
    found = await deltas(log)
    assert len(found) == len(written), "one delta per receipt"
    for _, delta in found:  # each receipt whole
        words = next(op for op in delta.ops if op.collection == "words")
        assert isinstance(words, Upsert) and words.metadatas is not None
        first = words.metadatas[0]
        receipt = by_key[f"{first['image_id']}/{first['receipt_id']}"]
        assert len(words.ids) == len(receipt.words)


def test_an_unreachable_embedder_stops_the_command_with_one_line(
    config: LogConfig,
    receipts: list[Receipt],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "receipts.jsonl"
    write_jsonl(path, receipts[:3])
    nowhere = f"http://127.0.0.1:{closed_port()}/v1"
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", nowhere)
    where = ["--bucket", config.bucket, "--table", config.table, "--log", config.log]
    where += ["--endpoint-url", str(config.endpoint_url)]
    command = ["ingest", str(path), "--embedder", "openai", "--dim", str(DIM), "-q", *where]
    assert main(command) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"deltalog: Unavailable: cannot reach {nowhere}"), err
    assert err.count("\n") == 1, err


def test_ingest_command(
    config: LogConfig,
    receipts: list[Receipt],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "receipts.jsonl"
    write_jsonl(path, receipts[:3])
    where = ["--bucket", config.bucket, "--table", config.table, "--log", config.log]
    where += ["--endpoint-url", str(config.endpoint_url)]
    command = ["ingest", str(path), "--embedder", "hash", "--dim", str(DIM), *where]
    assert main(command) == 0
    first = capsys.readouterr()
    assert "hashing-v1 (16 dims)" in first.out
    assert re.search(r"deltas written\s+3\n", first.out), first.out
    assert re.search(r"^ingest: 3/3 lines .*, 3 receipts .*, \d+ vectors", first.err, re.M), (
        first.err
    )
    assert main(command) == 0
    assert re.search(r"duplicates skipped\s+3\n", capsys.readouterr().out)
    path.write_bytes(b"{oops\n")
    assert main(command) == 1
    assert f"InvalidReceipt: {path}:1: not a valid receipt" in capsys.readouterr().err


def test_progress_counts_lines_as_the_summary_does_and_quiet_keeps_the_reasons(
    config: LogConfig,
    receipts: list[Receipt],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Eight lines, two of them bad, skipped: the progress counts the 8 lines and says 6
    receipts, the summary says 8 lines read, 6 receipts, 2 errors. ``-q`` hides the
    progress, not the reasons the two lines were skipped."""
    good = [encode_receipt(r) for r in receipts[:6]]
    path = jsonl(tmp_path / "r.jsonl", *good[:3], b"not json", *good[3:], b"{}")
    where = ["--bucket", config.bucket, "--table", config.table, "--log", config.log]
    where += ["--endpoint-url", str(config.endpoint_url)]
    command = ["ingest", str(path), "--embedder", "hash", "--dim", str(DIM), "--on-error", "skip"]
    assert main([*command, *where]) == 0
    shown = capsys.readouterr()
    last = [line for line in shown.err.splitlines() if line.startswith("ingest: ")][-1]
    assert re.match(r"ingest: 8/8 lines \(.*\), 6 receipts \(", last), last
    assert re.search(r"errors\s+2\n", shown.out) and re.search(r"lines read\s+8\n", shown.out)
    assert re.search(r"^receipts\s+6$", shown.out, re.M), shown.out

    assert main([*command, "-q", *where]) == 0
    quiet = capsys.readouterr()
    skipped = quiet.err.splitlines()
    assert [line.split(": ", 2)[:2] for line in skipped] == [
        ["skipped", f"{path}:4"],
        ["skipped", f"{path}:8"],
    ], quiet.err
    assert "ingest: " not in quiet.err, "no progress with -q"
    assert re.search(r"duplicates skipped\s+6\n", quiet.out)


async def test_ctrl_c_says_what_is_in_the_log_what_is_not_and_exits_130(
    config: LogConfig, receipts: list[Receipt], tmp_path: Path
) -> None:
    """Three receipts are in the log; a second ingest of those three and three more gets
    SIGINT while its first write hangs (held at a proxy): the command says how many of the
    file's receipts are in the log (found there already, none written now), how many lines
    were not ingested, that a rerun resumes, and exits 130."""
    from tests.commands import cli_env
    from tests.compaction import held_once

    where = ["--bucket", config.bucket, "--table", config.table, "--log", config.log]
    ingest = [sys.executable, "-m", "deltalog", "ingest", "--embedder", "hash", "--dim", str(DIM)]
    first = tmp_path / "first.jsonl"
    write_jsonl(first, receipts[:3])
    done = await anyio.run_process(
        [*ingest, str(first), *where, "--endpoint-url", str(config.endpoint_url)],
        env=cli_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    path = tmp_path / "r.jsonl"
    write_jsonl(path, receipts[:6])

    def entry_write(request: Request) -> bool:
        return request.method == "PUT" and "/entries/" in request.path

    async with held_once(config, entry_write) as (url, reached, _go):
        argv = [*ingest, str(path), *where, "--endpoint-url", url]
        async with await anyio.open_process(argv, env=cli_env()) as process:
            with anyio.fail_after(60):
                while not reached.is_set():
                    assert process.returncode is None
                    await anyio.sleep(0.02)
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(60):
                code = await process.wait()
            assert process.stderr is not None
            err = (await process.stderr.receive(65536)).decode()
        async with DeltaLog.open(config) as log:
            written = await upserted_receipts(log)  # before the held write is let go
    assert code == 130, err
    assert "Traceback" not in err
    assert written == {key_of(r) for r in receipts[:3]}, "the held write did not land"
    found = re.search(
        r"ingest interrupted: (\d+) receipts are in the log \(0 written now, (\d+) were there "
        r"already\), 0 lines refused; (\d+) of the 6 lines not ingested",
        err,
    )
    assert found, err
    reported = int(found.group(1))
    assert int(found.group(2)) == reported <= 3, "those it found in the log"
    assert int(found.group(3)) == 6 - reported
    assert "Run the same command again to resume" in err
