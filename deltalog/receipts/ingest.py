"""Receipts into the log: embed, then append one delta per receipt.

- ``ReceiptProducer`` embeds a receipt's words (with their neighbours) and
  lines (with the lines above and below) in one embedder call and submits
  **one delta** holding the upserts of both collections (``words`` and
  ``lines``) through the log's group-commit producer: a receipt is in the
  log whole or not at all. It also appends label updates, merchant updates
  and receipt deletions.
- The delta's **idempotency key** is derived from the receipt's ids and a
  hash of its content and of the embedder: adding the same receipt again
  (a rerun after a crash) returns the original seq and writes nothing. Such
  a duplicate is found before embedding when the key's entry is already
  durable, so a rerun does not pay for embeddings twice. When another
  producer is appending the same receipt at the same moment (``Conflict``),
  the add waits and retries, and then finds the duplicate; when the key was
  left at an unwritten seq by a producer that was stopped (a rerun after
  Ctrl-C), it retries until the claim is older than the grace period
  (``LogConfig.grace``), when the append seals that seq and writes it.
- ``ingest_file`` streams a JSONL file through a ``ReceiptProducer`` with
  bounded concurrency, reports progress to a callback and returns an
  ``IngestSummary``.

A consequence of idempotency keys: a receipt that was deleted is not added
back by ingesting the same content again; change it, or use another log.
"""

from __future__ import annotations

import hashlib
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from types import TracebackType

import anyio
import numpy as np
import numpy.typing as npt
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from deltalog.append import Repeat
from deltalog.codec import decode_entry
from deltalog.entry import Batch, Delete, Delta, MetadataPatch, Op, UpdateMetadata, Upsert
from deltalog.errors import (
    Closed,
    Conflict,
    CorruptEntry,
    DataError,
    DeltalogError,
    DimensionMismatch,
    InvalidInput,
)
from deltalog.log import DeltaLog
from deltalog.producer import Producer
from deltalog.receipts.embed import Embedder
from deltalog.receipts.model import (
    InvalidReceipt,
    LabelStatus,
    OnError,
    Receipt,
    encode_receipt,
    label_key,
    line_records,
    read_jsonl,
    receipt_ids,
    validate_receipt,
    word_record_id,
    word_records,
)
from deltalog.storage.table import Claim

__all__ = [
    "Added",
    "IngestSummary",
    "LabelUpdate",
    "ReceiptProducer",
    "ReceiptProducerStatistics",
    "ingest_file",
    "receipt_key",
    "receipt_subject",
    "IngestProgress",
]

_CLAIM_BATCH = 100
_CONFLICT_ATTEMPTS = 6
_CONFLICT_SLACK = 5.0
"""Seconds past the grace a receipt whose key is held in flight keeps being retried."""
WORDS = "words"
LINES = "lines"
_MAX_ERRORS_KEPT = 100


def receipt_subject(receipt: Receipt) -> str:
    """Which receipt this is, whatever its content: ``receipt:{image_id}:{receipt_id:05d}``."""
    return f"receipt:{receipt.image_id}:{receipt.receipt_id:05d}"


def receipt_key(receipt: Receipt, embedder: Embedder) -> str:
    """The idempotency key of a receipt's upsert: its ids and a content hash."""
    digest = hashlib.sha256()
    digest.update(f"{embedder.name}\0{embedder.dim}\0".encode())
    digest.update(encode_receipt(receipt))
    return f"{receipt_subject(receipt)}:{digest.hexdigest()[:32]}"


@dataclass(frozen=True, slots=True)
class Added:
    """The outcome of adding one receipt."""

    seq: int
    vectors: int
    duplicate: bool
    """True when the log already held it: nothing was embedded or written."""


@dataclass(frozen=True, slots=True)
class LabelUpdate:
    """A change of one word's labels: ``add`` sets ``label_X: true``, ``remove`` drops it."""

    image_id: uuid.UUID | str
    receipt_id: int
    line_id: int
    word_id: int
    add: Sequence[str] = ()
    remove: Sequence[str] = ()
    status: LabelStatus | None = None

    def patch(self) -> MetadataPatch:
        patch: MetadataPatch = {label_key(label): True for label in self.add}
        patch.update({label_key(label): None for label in self.remove})
        if self.status is not None:
            patch["label_status"] = self.status
        if not patch:
            raise InvalidInput(f"label update of {self.record_id()} changes nothing")
        return patch

    def record_id(self) -> str:
        return word_record_id(self.image_id, self.receipt_id, self.line_id, self.word_id)


_CLAIM_READ_WINDOW = 0.002
"""How long the first of concurrent lookups waits for others to join its read."""


@dataclass(slots=True)
class _ClaimRead:
    keys: list[str] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)
    claims: dict[str, Claim] = field(default_factory=dict)
    error: DeltalogError | None = None


class _DurableKeys:
    """Which idempotency keys already have a durable entry: read-only, batched.

    Concurrent lookups share one claims read (up to the table's batch
    size); each entry is fetched at most once to compare its ``entry_id``
    with the claim's. When in doubt (no claim, entry not written yet,
    sealed, undecodable) the answer is None and the append protocol decides.
    """

    def __init__(self, log: DeltaLog) -> None:
        self._log = log
        self._read: _ClaimRead | None = None
        self._entry_ids: dict[int, str] = {}
        self._fetching: dict[int, anyio.Event] = {}

    async def seq_of(self, key: str) -> int | None:
        claim = await self._claim(key)
        if claim is None:
            return None
        entry_id = await self._entry_id(claim.seq)
        return claim.seq if entry_id == claim.entry_id else None

    async def _claim(self, key: str) -> Claim | None:
        read = self._read
        if read is not None and len(read.keys) < _CLAIM_BATCH:
            read.keys.append(key)
            await read.done.wait()
        else:
            read = self._read = _ClaimRead([key])
            try:
                await anyio.sleep(_CLAIM_READ_WINDOW)
                if self._read is read:
                    self._read = None  # later lookups start the next read
                log_id = self._log.keys.log_id
                read.claims = await self._log.table.get_claims(log_id, read.keys)
            except DeltalogError as exc:
                read.error = exc
            finally:
                if self._read is read:
                    self._read = None
                read.done.set()
        if read.error is not None:
            raise read.error
        return read.claims.get(key)

    async def _entry_id(self, seq: int) -> str | None:
        while seq in self._fetching:
            await self._fetching[seq].wait()
        if seq in self._entry_ids:
            return self._entry_ids[seq]
        done = self._fetching[seq] = anyio.Event()
        try:
            entry_id = await self._fetch_entry_id(seq)
        finally:
            del self._fetching[seq]
            done.set()
        if entry_id is not None:  # entries are immutable once written
            self._entry_ids[seq] = entry_id
        return entry_id

    async def _fetch_entry_id(self, seq: int) -> str | None:
        key = self._log.keys.entry(seq)
        stored = await self._log.store.get(key)
        if stored is None:
            return None
        try:
            entry = decode_entry(stored.data, seq=seq, key=key)
        except CorruptEntry:
            return None  # the append protocol reads it again and reports it
        return entry.entry_id if isinstance(entry, Batch) else None


@dataclass(frozen=True, slots=True)
class ReceiptProducerStatistics:
    receipts_added: int
    duplicates_skipped: int
    vectors_written: int
    deltas_written: int
    """Receipt upserts, label and merchant updates, deletions acknowledged."""
    entries_written: int
    """Log entries the group-commit producer wrote (several deltas each)."""
    embed_seconds: float


class ReceiptProducer:
    """Appends receipts and their changes to a log. Use ``async with``.

    At most ``concurrency`` receipts are embedded at once and at most
    ``max_pending`` are between the start of ``add`` and their durable
    write, which lets group commit gather many receipts per entry.
    """

    def __init__(
        self,
        log: DeltaLog,
        embedder: Embedder,
        *,
        concurrency: int = 8,
        max_pending: int = 64,
        linger_ms: float = 20.0,
    ) -> None:
        if concurrency < 1 or max_pending < 1:
            raise InvalidInput("concurrency and max_pending must be at least 1")
        self.log = log
        self.embedder = embedder
        self.concurrency = concurrency
        self.max_pending = max_pending
        self.linger_ms = linger_ms
        self._producer: Producer | None = None
        self._stack = AsyncExitStack()
        self._embedding = anyio.Semaphore(concurrency)
        self._pending = anyio.Semaphore(max_pending)
        self._in_progress: dict[str, anyio.Event] = {}
        self._durable = _DurableKeys(log)
        self._closed = False
        self._added = self._duplicates = self._vectors = self._deltas = 0
        self._embed_seconds = 0.0

    async def __aenter__(self) -> ReceiptProducer:
        if self._producer is not None or self._closed:
            raise Closed("a receipt producer can be entered once")
        await self._check_dims()
        producer = self.log.producer(linger_ms=self.linger_ms, max_pending=self.max_pending)
        self._producer = await self._stack.enter_async_context(producer)
        return self

    async def _check_dims(self) -> None:
        """Refuse at once an embedder whose dimension the log's collections do not hold.

        The log checks every delta anyway; this names the embedder, and no
        receipt is embedded for nothing.
        """
        known = await self.log.table.read_dims(self.log.keys.log_id)
        for collection in (WORDS, LINES):
            dim = known.get(collection, self.embedder.dim)
            if dim != self.embedder.dim:
                raise DimensionMismatch(
                    collection,
                    known=dim,
                    got=self.embedder.dim,
                    source=f"the embedder {self.embedder.name}",
                    log=self.log.config.log,
                )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._closed = True
        return await self._stack.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        """Flush what was submitted and stop taking receipts."""
        await self.__aexit__(None, None, None)

    def _submitter(self) -> Producer:
        if self._closed or self._producer is None:
            raise Closed("the receipt producer is closed (or was never entered)")
        return self._producer

    # -- receipts ----------------------------------------------------------------

    async def add(self, receipt: Receipt) -> Added:
        """Embed and append one receipt as one delta; return where it is."""
        self._submitter()
        validate_receipt(receipt)
        key = receipt_key(receipt, self.embedder)
        while key in self._in_progress:  # the same receipt twice at once: wait for the first
            await self._in_progress[key].wait()
        event = self._in_progress[key] = anyio.Event()
        try:
            async with self._pending:
                return await self._add(receipt, key)
        finally:
            del self._in_progress[key]
            event.set()

    async def _add(self, receipt: Receipt, key: str) -> Added:
        seq = await self._durable.seq_of(key)
        if seq is not None:
            return self._duplicate(seq)
        words, lines = word_records(receipt), line_records(receipt)
        vectors = await self._embed(words.inputs + lines.inputs)
        split = len(words.ids)
        name = self.embedder.name
        ops: list[Op] = [
            Upsert(WORDS, words.ids, vectors[:split], words.documents, words.metadatas, name),
            Upsert(LINES, lines.ids, vectors[split:], lines.documents, lines.metadatas, name),
        ]
        seq, duplicate = await self._submit_receipt(ops, key)
        if duplicate:
            return self._duplicate(seq)
        self._added += 1
        self._deltas += 1
        self._vectors += len(vectors)
        return Added(seq, len(vectors), duplicate=False)

    async def _submit_receipt(self, ops: list[Op], key: str) -> tuple[int, bool]:
        """The seq, and whether another producer wrote the receipt meanwhile.

        A key held at a seq not written yet is retried for as long as the
        grace period: another producer's write lands meanwhile (a repeat),
        or its producer was stopped and the claim ages past the grace, and
        then the append seals that seq and writes the receipt.
        """
        attempt = 0
        deadline = anyio.current_time() + self.log.config.grace + _CONFLICT_SLACK
        while True:
            try:
                seq = await self._submitter().submit(Delta(ops=ops, idempotency_key=key))
            except Conflict:
                # Another producer holds the key with an entry not written yet.
                attempt += 1
                if attempt >= _CONFLICT_ATTEMPTS and anyio.current_time() >= deadline:
                    raise
            else:  # a Repeat if another producer's entry holding the key landed meanwhile
                return seq, isinstance(seq, Repeat)
            await anyio.sleep(min(2.0, 0.05 * 2**attempt))
            durable = await self._durable.seq_of(key)
            if durable is not None:
                return durable, True

    def _duplicate(self, seq: int) -> Added:
        self._duplicates += 1
        return Added(seq, 0, duplicate=True)

    async def _embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        async with self._embedding:
            started = time.perf_counter()
            vectors = await self.embedder.embed(texts)
            self._embed_seconds += time.perf_counter() - started
        if vectors.shape != (len(texts), self.embedder.dim):
            raise DataError(
                f"embedder {self.embedder.name} returned shape {vectors.shape} "
                f"for {len(texts)} texts of dimension {self.embedder.dim}"
            )
        return vectors

    async def add_many(self, receipts: Iterable[Receipt]) -> list[Added]:
        """Add receipts concurrently (up to ``max_pending`` at once), in any order."""
        batch = list(receipts)
        results: list[Added | None] = [None] * len(batch)
        limit = anyio.Semaphore(self.max_pending)

        async def one(i: int, receipt: Receipt) -> None:
            try:
                results[i] = await self.add(receipt)
            finally:
                limit.release()

        async with anyio.create_task_group() as tg:
            for i, receipt in enumerate(batch):
                await limit.acquire()
                tg.start_soon(one, i, receipt)
        return [r for r in results if r is not None]

    # -- changes -------------------------------------------------------------------

    async def update_labels(
        self, updates: Sequence[LabelUpdate], *, idempotency_key: str | None = None
    ) -> int:
        """Merge label changes into word metadata (no re-embedding); one delta."""
        if not updates:
            raise InvalidInput("no label updates given")
        op = UpdateMetadata(WORDS, [u.record_id() for u in updates], [u.patch() for u in updates])
        return await self._submit([op], idempotency_key)

    async def set_merchant(
        self, receipt: Receipt, merchant_name: str, *, idempotency_key: str | None = None
    ) -> int:
        """Set ``merchant_name`` on every word and line of a receipt; one delta."""
        words, lines = receipt_ids(receipt)
        patch: MetadataPatch = {"merchant_name": merchant_name}
        ops: list[UpdateMetadata] = [
            UpdateMetadata(WORDS, words, [dict(patch) for _ in words]),
            UpdateMetadata(LINES, lines, [dict(patch) for _ in lines]),
        ]
        return await self._submit(ops, idempotency_key)

    async def delete_receipt(self, receipt: Receipt, *, idempotency_key: str | None = None) -> int:
        """Delete every word and line of a receipt; one delta."""
        words, lines = receipt_ids(receipt)
        return await self._submit([Delete(WORDS, words), Delete(LINES, lines)], idempotency_key)

    async def _submit(
        self, ops: Sequence[UpdateMetadata | Delete], idempotency_key: str | None
    ) -> int:
        seq = await self._submitter().submit(Delta(ops=list(ops), idempotency_key=idempotency_key))
        self._deltas += 1
        return seq

    def statistics(self) -> ReceiptProducerStatistics:
        entries = self._producer.statistics().entries_written if self._producer else 0
        return ReceiptProducerStatistics(
            receipts_added=self._added,
            duplicates_skipped=self._duplicates,
            vectors_written=self._vectors,
            deltas_written=self._deltas,
            entries_written=entries,
            embed_seconds=self._embed_seconds,
        )


# -- files ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IngestSummary:
    """What one ``ingest_file`` run did."""

    receipts: int
    """Receipts read and accepted: written now or already in the log."""
    vectors: int
    """Vectors written by this run."""
    deltas_written: int
    entries_written: int
    duplicates_skipped: int
    errors: int
    """Lines skipped (``on_error="skip"``) or the one that stopped the run."""
    seconds: float
    error_messages: list[str] = field(default_factory=list)
    """The first 100 errors, each naming its line."""

    @property
    def receipts_per_second(self) -> float:
        return self.receipts / self.seconds if self.seconds > 0 else 0.0

    @property
    def vectors_per_second(self) -> float:
        return self.vectors / self.seconds if self.seconds > 0 else 0.0

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("lines read", f"{self.receipts + self.errors:,}"),
            ("receipts", f"{self.receipts:,}"),
            ("vectors written", f"{self.vectors:,}"),
            ("deltas written", f"{self.deltas_written:,}"),
            ("entries written", f"{self.entries_written:,}"),
            ("duplicates skipped", f"{self.duplicates_skipped:,}"),
            ("errors", f"{self.errors:,}"),
            ("seconds", f"{self.seconds:.2f}"),
            ("receipts/s", f"{self.receipts_per_second:,.1f}"),
            ("vectors/s", f"{self.vectors_per_second:,.0f}"),
        ]


@dataclass(frozen=True, slots=True)
class IngestProgress:
    """Where an ``ingest_file`` run is: passed to its ``progress`` callback."""

    receipts: int
    """Receipts accepted so far (written, or already in the log)."""
    vectors: int
    duplicates: int
    errors: int
    seconds: float


class _Tally:
    """The running counts of one run, reported to its ``progress`` callback."""

    def __init__(self, report: Callable[[IngestProgress], None] | None) -> None:
        self.report = report
        self.started = time.perf_counter()
        self.receipts = self.vectors = self.duplicates = self.errors = 0

    def update(self) -> None:
        if self.report is not None:
            self.report(
                IngestProgress(
                    self.receipts,
                    self.vectors,
                    self.duplicates,
                    self.errors,
                    time.perf_counter() - self.started,
                )
            )


@dataclass
class _Run:
    """The shared state of one ``ingest_file`` run."""

    path: Path
    on_error: OnError
    progress: _Tally
    on_skip: Callable[[InvalidReceipt], None] | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    errors: list[InvalidReceipt] = field(default_factory=list)
    error_count: int = 0
    stop: InvalidReceipt | None = None
    """The error that stopped the run (``on_error="stop"``)."""
    fatal: DeltalogError | None = None
    """An error that is not the input's fault: the run was cancelled."""

    def reject(self, error: InvalidReceipt) -> None:
        self.error_count += 1
        self.progress.errors += 1
        if len(self.errors) < _MAX_ERRORS_KEPT:
            self.errors.append(error)
        if self.on_error == "stop":
            if self.stop is None or (error.line or 0) < (self.stop.line or 0):
                self.stop = error
        elif self.on_skip is not None:
            self.on_skip(error)
        self.progress.update()

    def fail(self, error: DeltalogError) -> None:
        if self.fatal is None:
            self.fatal = error
        self.scope.cancel()

    def wanted(self, line: int) -> bool:
        """False for lines at or after the one that stopped the run."""
        return self.fatal is None and (self.stop is None or line < (self.stop.line or 0))


async def ingest_file(
    path: str | Path,
    log: DeltaLog,
    embedder: Embedder,
    *,
    on_error: OnError = "stop",
    concurrency: int = 8,
    max_pending: int = 64,
    linger_ms: float = 20.0,
    progress: Callable[[IngestProgress], None] | None = None,
    on_skip: Callable[[InvalidReceipt], None] | None = None,
) -> IngestSummary:
    """Ingest a JSONL file of receipts; see the module docstring.

    ``on_error="stop"``: the first bad line stops the run and its
    ``InvalidReceipt`` (naming the line) is raised once the receipts before
    it are written. A malformed line stops the reading: nothing at or after
    it is written. A receipt the log or the embedder refuses stops new work;
    receipts already being embedded finish (each whole, as one delta).
    ``on_error="skip"``: bad lines are reported and counted. Errors that are
    not the input's fault (configuration, availability) always stop the run
    at once and are raised as they are.

    ``progress`` is called after every receipt and error with the counts so
    far; ``on_skip`` with each line skipped (``on_error="skip"``).
    """
    if on_error not in ("stop", "skip"):
        raise InvalidInput(f"on_error must be 'stop' or 'skip', not {on_error!r}")
    run = _Run(Path(path), on_error, _Tally(progress), on_skip)
    async with ReceiptProducer(
        log, embedder, concurrency=concurrency, max_pending=max_pending, linger_ms=linger_ms
    ) as producer:
        send, receive = anyio.create_memory_object_stream[tuple[int, Receipt]](max_pending)
        with run.scope:
            async with anyio.create_task_group() as tg, receive:
                tg.start_soon(_read, run, send)
                for _ in range(max_pending):
                    tg.start_soon(_work, run, producer, receive.clone())
    if run.fatal is not None:
        raise run.fatal
    if run.stop is not None:
        raise run.stop
    stats = producer.statistics()
    return IngestSummary(
        receipts=stats.receipts_added + stats.duplicates_skipped,
        vectors=stats.vectors_written,
        deltas_written=stats.deltas_written,
        entries_written=stats.entries_written,
        duplicates_skipped=stats.duplicates_skipped,
        errors=run.error_count,
        seconds=time.perf_counter() - run.progress.started,
        error_messages=[str(e) for e in run.errors],
    )


_CHUNK = 64


def _take(
    items: Iterator[tuple[int, Receipt]],
) -> tuple[list[tuple[int, Receipt]], InvalidReceipt | None]:
    """The next few items, and the error that ended them early (``on_error="stop"``)."""
    chunk: list[tuple[int, Receipt]] = []
    try:
        for item in islice(items, _CHUNK):
            chunk.append(item)
    except InvalidReceipt as exc:
        return chunk, exc
    return chunk, None


async def _read(run: _Run, send: MemoryObjectSendStream[tuple[int, Receipt]]) -> None:
    """Feed ``(line, receipt)`` to the workers; parse in a worker thread."""
    skipped: list[InvalidReceipt] = []
    items = read_jsonl(run.path, on_error=run.on_error, skipped=skipped)
    async with send:
        try:
            while run.wanted(sys.maxsize):
                chunk, error = await anyio.to_thread.run_sync(_take, items)
                for rejected in skipped:
                    run.reject(rejected)
                skipped.clear()
                for line, receipt in chunk:
                    if not run.wanted(line):
                        break
                    await send.send((line, receipt))
                if error is not None:
                    run.reject(error)
                if error is not None or not chunk:
                    break
        except OSError as exc:
            run.fail(InvalidInput(f"cannot read {run.path}: {exc}"))
        finally:
            await anyio.to_thread.run_sync(items.close)


async def _work(
    run: _Run,
    producer: ReceiptProducer,
    receive: MemoryObjectReceiveStream[tuple[int, Receipt]],
) -> None:
    async with receive:
        async for line, receipt in receive:
            if not run.wanted(line):
                continue  # drain: nothing at or after a stop is written
            try:
                added = await producer.add(receipt)
            except DimensionMismatch as exc:  # the embedder's fault, not the line's
                run.fail(exc)
                return
            except InvalidInput as exc:
                reason = exc.reason if isinstance(exc, InvalidReceipt) else str(exc)
                error = InvalidReceipt(reason, path=str(run.path), line=line)
                error.__cause__ = exc
                run.reject(error)
                continue
            except DeltalogError as exc:
                run.fail(exc)
                return
            run.progress.receipts += 1
            run.progress.vectors += added.vectors
            run.progress.duplicates += added.duplicate
            run.progress.update()
