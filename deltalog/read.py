"""Reading a log in seq order.

``LogReader`` lists the entry keys after a seq (one ``ListObjectsV2`` with
``StartAfter``), fetches them in windows of ``prefetch`` concurrent
requests, verifies and decodes each one, and yields ``(seq, entry)`` in seq
order. It stops at the first missing seq and records why in ``end``: a
**hole** is a missing seq at or below the counter (reserved, not written);
past the counter the log simply ends. Telling the two apart costs one read
of the counter; a caller that does not need it (a fresh reader, which reads
whatever is there) passes ``classify_end=False`` and ``end`` stays None.

A corrupt entry raises ``CorruptEntry`` when its turn comes, after every
entry before it has been yielded; so does a **malformed** one (it decodes,
but breaks a rule its deltas met at append time: ``validate_entry``), so
nothing of it is ever folded; given ``dims`` (the log's schema), so does an
entry whose vectors have another dimension than their collection's; with a
``verifier`` (trusted signing keys), so does an unsigned or badly signed one
(``UntrustedEntry``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass

import anyio

from deltalog.codec import decode_entry
from deltalog.entry import Entry
from deltalog.errors import CorruptEntry, DataError, DeltalogError, ValidationError
from deltalog.keys import LogKeys
from deltalog.signing import Verifier
from deltalog.storage.store import ObjectInfo, ObjectStore
from deltalog.storage.table import Table
from deltalog.validate import validate_entry

__all__ = ["LogReader", "ReadEnd", "list_entries"]


@dataclass(frozen=True, slots=True)
class ReadEnd:
    """Where and why a read stopped."""

    seq: int
    """The first seq that was not yielded."""
    head: int
    """The counter (the last reserved seq) when the read stopped."""
    reason: str
    """``hole``, ``end`` (past the counter) or ``limit`` (``to_seq`` reached)."""
    next_entry: ObjectInfo | None = None
    """The first entry listed after a hole: its age bounds the hole's age."""

    @property
    def is_hole(self) -> bool:
        return self.reason == "hole"


async def list_entries(
    store: ObjectStore, keys: LogKeys, after: int
) -> AsyncIterator[tuple[int, ObjectInfo]]:
    """``(seq, info)`` of every entry after ``after``, in seq order."""
    start = keys.entry(after) if after > 0 else ""
    async for info in store.list_after(keys.entries_prefix, start):
        seq = keys.seq_of(info.key)
        if seq is not None and seq > after:
            yield seq, info


class LogReader:
    """An async iterator of ``(seq, entry)``; see the module docstring."""

    def __init__(
        self,
        store: ObjectStore,
        table: Table,
        keys: LogKeys,
        *,
        log: str,
        after: int = 0,
        to_seq: int | None = None,
        prefetch: int = 32,
        verifier: Verifier | None = None,
        classify_end: bool = True,
        dims: Mapping[str, int] | None = None,
    ) -> None:
        if after < 0 or (to_seq is not None and to_seq < after) or prefetch < 1:
            raise ValueError("need 0 <= after <= to_seq and prefetch >= 1")
        self._store = store
        self._table = table
        self._keys = keys
        self._log = log
        self.after = after
        self.to_seq = to_seq
        self.prefetch = prefetch
        self.verifier = verifier
        self.classify_end = classify_end
        self.end: ReadEnd | None = None
        self.bytes_read = 0
        """Bytes fetched, prefetched entries included."""
        self.bytes_yielded = 0
        """Stored bytes of the entries yielded so far (what a byte limit counts)."""
        self._error: DeltalogError | None = None
        self._dims = dict(dims) if dims is not None else None
        """Each collection's dimension (the log's schema); None: not checked across entries."""

    def __aiter__(self) -> AsyncGenerator[tuple[int, Entry], None]:
        return self._iterate()

    async def _iterate(self) -> AsyncGenerator[tuple[int, Entry], None]:
        self._error = None
        expected = self.after + 1
        window: list[ObjectInfo] = []
        gap_after: ObjectInfo | None = None
        limited = False
        async for seq, info in list_entries(self._store, self._keys, self.after):
            if self.to_seq is not None and seq > self.to_seq:
                limited = True
                break
            if seq != expected:
                gap_after = info
                break
            window.append(info)
            expected += 1
            if len(window) >= self.prefetch:
                for item, fetched in zip(await self._fetch(window), window, strict=False):
                    self.bytes_yielded += fetched.size
                    yield item
                if self._error is not None:
                    raise self._error
                window = []
        for item, fetched in zip(await self._fetch(window), window, strict=False):
            self.bytes_yielded += fetched.size
            yield item
        if self._error is not None:
            raise self._error
        if self.classify_end:
            await self._finish(expected, gap_after, limited)

    async def _finish(self, expected: int, gap_after: ObjectInfo | None, limited: bool) -> None:
        head = await self._table.read_head(self._keys.log_id)
        if limited or (self.to_seq is not None and expected > self.to_seq):
            reason = "limit"
        else:
            reason = "hole" if expected <= head else "end"
        self.end = ReadEnd(expected, head, reason, gap_after)

    async def _fetch(self, window: list[ObjectInfo]) -> list[tuple[int, Entry]]:
        """Fetch a window concurrently; return it in order up to the first bad entry.

        The bad entry's error (corrupt, gone, or the store unavailable) is
        raised by the caller after every entry before it was yielded, as
        itself rather than wrapped in the task group's ``ExceptionGroup``.
        """
        results: list[tuple[Entry, dict[str, int]] | DeltalogError | None] = [None] * len(window)

        async def fetch(i: int, info: ObjectInfo) -> None:
            try:
                results[i] = await self._fetch_one(info)
            except DeltalogError as exc:
                results[i] = exc

        async with anyio.create_task_group() as tg:
            for i, info in enumerate(window):
                tg.start_soon(fetch, i, info)
        out: list[tuple[int, Entry]] = []
        for info, result in zip(window, results, strict=True):
            checked = result if not isinstance(result, tuple) else self._check_dims(info, *result)
            if isinstance(checked, DeltalogError) or checked is None:
                self._error = checked
                break
            out.append((self._seq(info), checked))
        return out

    def _check_dims(
        self, info: ObjectInfo, entry: Entry, dims: dict[str, int]
    ) -> Entry | CorruptEntry:
        """In seq order: the entry's vectors have each collection's dimension."""
        if self._dims is None:
            return entry
        for collection, dim in dims.items():
            known = self._dims.setdefault(collection, dim)
            if known != dim:
                return CorruptEntry(
                    f"malformed entry: {dim}-dimensional vectors for collection "
                    f"{collection!r}, which holds {known}-dimensional ones",
                    log=self._log,
                    seq=self._seq(info),
                    key=info.key,
                )
        return entry

    def _seq(self, info: ObjectInfo) -> int:
        seq = self._keys.seq_of(info.key)
        assert seq is not None
        return seq

    async def _fetch_one(self, info: ObjectInfo) -> tuple[Entry, dict[str, int]]:
        """The verified, decoded and validated entry, and its collections' dimensions."""
        seq = self._seq(info)
        stored = await self._store.get(info.key)
        if stored is None:
            raise DataError(
                "a listed entry is gone: entries must never be deleted",
                log=self._log,
                seq=seq,
                key=info.key,
            )
        self.bytes_read += len(stored.data)
        entry = decode_entry(
            stored.data, seq=seq, key=info.key, log=self._log, verifier=self.verifier
        )
        try:
            return entry, validate_entry(entry)
        except ValidationError as exc:
            raise CorruptEntry(
                f"malformed entry: {exc.message}", log=self._log, seq=seq, key=info.key
            ) from exc
