"""The append protocol: one entry, written exactly once, at a fresh seq.

1. Reserve a seq: add one to the counter (an ambiguous failure of that
   costs a hole, never a duplicate).
2. Claim the idempotency keys of the entry's deltas at that seq.
3. Create ``entries/{seq}`` only if absent.
4. On an ambiguous failure or a 412, read the key back: our ``entry_id``
   means success; a seal means reserve again (moving our claims); nothing
   means retry the write; another producer's entry means the counter was
   reset: log loudly and reserve again.

A delta whose idempotency key is already claimed by a written entry is a
duplicate: it is not written again and resolves to the original seq. A key
claimed at a seq that is still unwritten is another append in flight
(``Conflict``), unless the claim is older than the grace period
(``LogConfig.grace``): its producer was stopped (a rerun after Ctrl-C meets
its own keys there), so the append seals that seq (``If-None-Match``: a late
write or the seal wins, never both) and writes the delta itself. An attempt
whose every key went to other appends seals its own reserved seq: no entry
ever holds zero deltas.
Every wait between attempts backs off exponentially with jitter, and the
number of attempts is bounded by ``LogConfig.append_attempts``.

A write cancelled midway is **settled** (``Appender.settle``): a delta is
durable at a seq, certainly not written (no put of its entry was sent, or
the seq holds something else), or of unknown outcome (a put was sent and
nothing can be read there yet: it may still land).
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import anyio

from deltalog.codec import Frame, batch_body, decode_entry, seal_body
from deltalog.config import LogConfig
from deltalog.entry import Batch, Seal, new_id
from deltalog.errors import Closed, Conflict, CorruptEntry, DeltalogError, Unavailable
from deltalog.storage.store import ObjectStore, StoredObject
from deltalog.storage.table import Claim, Table

__all__ = ["Appender", "Attempt", "EncodedDelta", "Repeat"]

log = logging.getLogger("deltalog.append")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EncodedDelta:
    """A validated delta and its MessagePack bytes."""

    delta_id: str
    idempotency_key: str | None
    data: bytes


class Repeat(int):
    """The seq an earlier append with the same idempotency key went to: nothing was written.

    It is an ``int`` (the seq), so a caller that wants only the seq need not
    care; one that counts writes tells a repeat by ``isinstance(seq, Repeat)``.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Repeat({int(self)})"


Outcome = int | DeltalogError
"""Per delta: the seq it is durable at (a ``Repeat`` if an earlier append holds it), or why
it was not written."""


def _repeated(outcome: Outcome) -> Outcome:
    """A follower's outcome: its twin's seq is a repeat for it."""
    return Repeat(outcome) if isinstance(outcome, int) else outcome


@dataclass(slots=True)
class Attempt:
    """One entry on its way into the log; pass one to ``write`` to settle it if cancelled."""

    entry_id: str = field(default_factory=new_id)
    submitted: list[EncodedDelta] = field(default_factory=list)
    deltas: list[EncodedDelta] = field(default_factory=list)
    """The deltas the entry holds (submitted ones minus duplicates and lost keys)."""
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    claimed: list[Claim] = field(default_factory=list)
    follows: dict[str, str] = field(default_factory=dict)
    """delta_id -> the delta_id of an earlier delta in this entry with the same key"""
    sent: tuple[int, str] | None = None
    """(seq, key) of the entry's last put that was started: it may have landed."""


class Appender:
    """Writes entries for one log; shared by ``DeltaLog.append`` and producers."""

    def __init__(self, config: LogConfig, store: ObjectStore, table: Table) -> None:
        self.config = config
        self.keys = config.keys
        self.log_id = self.keys.log_id
        self.store = store
        self.table = table
        self.producer_id = config.producer_id or f"producer-{new_id()[:12]}"
        self.entries_written = 0
        self.retries = 0
        self.duplicates = 0
        self._keys_in_flight: dict[str, anyio.Event] = {}

    def _error(
        self, error: type[DeltalogError], message: str, seq: int | None = None
    ) -> DeltalogError:
        return error(message, log=self.config.log, seq=seq)

    async def write(
        self, deltas: Sequence[EncodedDelta], attempt: Attempt | None = None
    ) -> dict[str, Outcome]:
        """Append ``deltas`` as one entry; return each delta's outcome by ``delta_id``.

        ``attempt`` (a fresh one) records the progress, for ``settle`` if the
        write is cancelled.
        """
        attempt = attempt or Attempt()
        attempt.submitted = list(deltas)
        keys = {d.idempotency_key for d in deltas if d.idempotency_key}
        await self._wait_for_keys(keys)
        done = anyio.Event()
        self._keys_in_flight.update(dict.fromkeys(keys, done))
        try:
            return await self._write(attempt)
        finally:
            for key in keys:
                del self._keys_in_flight[key]
            done.set()

    async def _wait_for_keys(self, keys: set[str]) -> None:
        """Wait until no other write of this appender holds one of ``keys``.

        Two writes with one key in one process take turns, so the second
        finds the first's claim written and resolves to its seq, where racing
        it would only tell one of them that the key is in flight.
        """
        while busy := [self._keys_in_flight[k] for k in keys if k in self._keys_in_flight]:
            await busy[0].wait()

    async def _write(self, attempt: Attempt) -> dict[str, Outcome]:
        attempt.deltas = await self._retrying(
            lambda: self._drop_known_duplicates(attempt, list(attempt.submitted))
        )
        if not attempt.deltas:
            return self._finish(attempt, 0, wrote=False)
        last: DeltalogError | None = None
        for n in range(self.config.append_attempts):
            try:
                seq = await self.table.reserve(self.log_id)
            except Unavailable as exc:
                last = exc
                await self._backoff(n)
                continue
            await self._retrying(functools.partial(self._claim, attempt, seq))
            if not attempt.deltas:  # every key went to another append: nothing to write
                await self._abandon(seq)
                return self._finish(attempt, 0, wrote=False)
            written = await self._put(attempt, seq)
            if written:
                return self._finish(attempt, seq)
            await self._backoff(n)
        raise Unavailable(
            f"append failed after {self.config.append_attempts} attempts: {last}",
            log=self.config.log,
        ) from last

    def _finish(self, attempt: Attempt, seq: int, *, wrote: bool = True) -> dict[str, Outcome]:
        self.entries_written += wrote
        for delta in attempt.deltas:
            attempt.outcomes[delta.delta_id] = seq
        for follower, leader in attempt.follows.items():
            attempt.outcomes[follower] = _repeated(attempt.outcomes[leader])
        return attempt.outcomes

    async def _put(self, attempt: Attempt, seq: int) -> bool:
        """Write at ``seq``; True when durable, False when a new seq is needed."""
        body = batch_body(
            attempt.entry_id,
            [d.data for d in attempt.deltas],
            producer_id=self.producer_id,
            created_at=time.time(),
        )
        frame = Frame(body)
        data = frame.at(seq, signer=self.config.signer)
        key = self.keys.entry(seq)
        last: Unavailable | None = None
        maybe_written = False
        attempt.sent = (seq, key)
        for n in range(self.config.append_attempts):
            try:
                if await self.store.put_if_absent(key, data):
                    return True
            except Unavailable as exc:
                last = exc
                maybe_written |= exc.ambiguous
                if not exc.ambiguous:
                    self.retries += 1
                    await self._backoff(n)
                    continue
            verdict = await self._read_back_or_say_so(attempt, seq, key)
            if verdict is not None:
                return verdict
            self.retries += 1
            await self._backoff(n)
        raise Unavailable(
            f"could not write entry after {self.config.append_attempts} tries: {last}",
            ambiguous=maybe_written,
            log=self.config.log,
            seq=seq,
            key=key,
        ) from last

    async def _abandon(self, seq: int) -> None:
        """Seal ``seq``, reserved by an attempt left with no delta to write.

        Claiming keys at a reserved seq can lose every one of them to appends
        that claimed them first (concurrent producers of the same deltas). An
        entry never holds zero deltas, and a seal now spares the compactor a
        hole it would wait a grace period for. If the seal cannot be written,
        the hole stays for a compactor to seal.
        """
        reason = "reserved by an append whose every delta was claimed by another append"
        try:
            await self._retrying(functools.partial(self._seal, seq, reason))
        except Unavailable as exc:
            log.warning(
                "seq %d of log %s: could not seal a seq no delta needs (%s); a compactor "
                "seals it after the grace period",
                seq,
                self.config.log,
                exc,
            )

    async def _seal(self, seq: int, reason: str) -> bool:
        """Write a seal at ``seq`` if nothing is there; False if something already is."""
        seal = Seal(sealed_by=self.producer_id, reason=reason, kind="hole", sealed_at=time.time())
        data = Frame(seal_body(seal)).at(seq, signer=self.config.signer)
        return await self.store.put_if_absent(self.keys.entry(seq), data)

    async def _read_back_or_say_so(self, attempt: Attempt, seq: int, key: str) -> bool | None:
        """``_read_back``; if that fails, the entry may be written: the error says so."""
        try:
            return await self._read_back(attempt, seq, key)
        except Unavailable as exc:
            raise Unavailable(
                f"the entry may have been written, but reading it back failed: {exc.message}",
                ambiguous=True,
                log=self.config.log,
                seq=seq,
                key=key,
            ) from exc

    async def _read_back(self, attempt: Attempt, seq: int, key: str) -> bool | None:
        """What is at ``key``: True ours, False taken (re-reserve), None absent."""
        stored = await self._get_with_retry(key)
        if stored is None:
            return None
        try:
            entry = decode_entry(stored.data, seq=seq, key=key)
        except CorruptEntry:
            log.error(
                "seq %d of log %s holds an undecodable object; reserving again",
                seq,
                self.config.log,
            )
            return False
        if isinstance(entry, Batch) and entry.entry_id == attempt.entry_id:
            return True
        if isinstance(entry, Batch):
            log.error(
                "seq %d of log %s holds another producer's entry: was the counter reset? "
                "reserving again",
                seq,
                self.config.log,
            )
        return False

    async def settle(self, attempt: Attempt, *, within: float) -> dict[str, Outcome]:
        """Each submitted delta's outcome after ``write(..., attempt)`` was cancelled.

        Outcomes known before the cancellation stand. If no put of the entry
        was started, the rest were certainly not written (``Closed``).
        Otherwise the entry is read back, shielded, for at most ``within``
        seconds: our entry means durable at its seq; a seal or another entry
        means not written (``Closed``); nothing there, or no answer, means
        the outcome is unknown (``Unavailable(ambiguous=True)``).
        """
        landed: bool | None = False
        if attempt.sent is not None:
            landed = None
            with anyio.move_on_after(within, shield=True):
                landed = await self._landed(attempt, *attempt.sent)
        in_entry = {d.delta_id for d in attempt.deltas}
        outcomes: dict[str, Outcome] = {}
        for delta in attempt.submitted:
            leader = attempt.follows.get(delta.delta_id, delta.delta_id)
            if leader in attempt.outcomes:
                outcome = attempt.outcomes[leader]
                outcomes[delta.delta_id] = (
                    outcome if leader == delta.delta_id else _repeated(outcome)
                )
            elif landed is None and leader in in_entry:
                outcomes[delta.delta_id] = self._unknown(attempt)
            elif landed and leader in in_entry and attempt.sent is not None:
                outcomes[delta.delta_id] = attempt.sent[0]
            else:
                outcomes[delta.delta_id] = self._error(
                    Closed,
                    "the append was stopped before the delta was written; it is not in "
                    "the log, so retrying it writes it once",
                )
        return outcomes

    async def _landed(self, attempt: Attempt, seq: int, key: str) -> bool | None:
        """``_read_back`` of a cancelled write; None when it cannot tell."""
        try:
            return await self._read_back(attempt, seq, key)
        except DeltalogError:
            return None

    def _unknown(self, attempt: Attempt) -> DeltalogError:
        seq, key = attempt.sent or (None, None)
        return Unavailable(
            "the append was stopped while its entry was being written: the delta may or "
            "may not be in the log. Retry it only with an idempotency key (a retry "
            "without one may write it twice), or read the log to find it",
            ambiguous=True,
            log=self.config.log,
            seq=seq,
            key=key,
        )

    async def _get_with_retry(self, key: str) -> StoredObject | None:
        return await self._retrying(lambda: self.store.get(key))

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, retried with backoff while it raises ``Unavailable``."""
        for n in range(self.config.append_attempts - 1):
            try:
                return await call()
            except Unavailable:
                self.retries += 1
                await self._backoff(n)
        return await call()

    async def _backoff(self, attempt: int) -> None:
        await anyio.sleep(random.uniform(0, min(2.0, 0.02 * 2**attempt)))

    # -- idempotency keys -------------------------------------------------

    async def _drop_known_duplicates(
        self, attempt: Attempt, deltas: list[EncodedDelta]
    ) -> list[EncodedDelta]:
        """Resolve deltas whose key is already claimed, before reserving a seq."""
        deltas = self._dedupe_within(attempt, deltas)
        keys = [d.idempotency_key for d in deltas if d.idempotency_key]
        if not keys:
            return deltas
        claims = await self.table.get_claims(self.log_id, keys)
        return [
            d
            for d in deltas
            if not await self._settled(attempt, d, claims.get(d.idempotency_key or ""))
        ]

    def _dedupe_within(self, attempt: Attempt, deltas: list[EncodedDelta]) -> list[EncodedDelta]:
        first: dict[str, EncodedDelta] = {}
        kept = []
        for delta in deltas:
            key = delta.idempotency_key
            if key is not None and key in first:
                attempt.follows[delta.delta_id] = first[key].delta_id
                continue
            if key is not None:
                first[key] = delta
            kept.append(delta)
        return kept

    async def _settled(self, attempt: Attempt, delta: EncodedDelta, claim: Claim | None) -> bool:
        """True if ``delta`` needs no write: a duplicate, or refused while in flight."""
        if claim is None or claim.entry_id == attempt.entry_id:
            return False
        state = await self._claim_state(claim)
        if state == "in-flight":
            state = await self._seal_if_abandoned(claim)
        if state == "written":
            self.duplicates += 1
            attempt.outcomes[delta.delta_id] = Repeat(claim.seq)
            return True
        if state == "in-flight":
            attempt.outcomes[delta.delta_id] = self._error(
                Conflict, self._in_flight_message(claim), claim.seq
            )
            return True
        return False

    async def _seal_if_abandoned(self, claim: Claim) -> str:
        """Seal the unwritten seq of a claim older than the grace; the claim's state after.

        The append holding the key was reserved more than ``grace`` seconds
        ago and has not written its seq: its producer was most likely stopped
        (a rerun after Ctrl-C meets its own keys there). Sealing with
        ``If-None-Match`` makes exactly one of the seal and a late write win,
        so the key is then either written (a repeat) or free to take over.
        """
        age = time.time() - claim.claimed_at
        if not claim.claimed_at or age < self.config.grace:
            return "in-flight"
        reason = (
            f"seq reserved for idempotency key {claim.key!r} and not written for "
            f"{age:.0f}s (grace {self.config.grace:g}s): sealed by an append of that key"
        )
        if await self._retrying(functools.partial(self._seal, claim.seq, reason)):
            log.info("log %s: sealed seq %d, %s", self.config.log, claim.seq, reason)
            return "stale"
        return await self._claim_state(claim)  # a late write, or a compactor's seal, won

    def _in_flight_message(self, claim: Claim) -> str:
        held = (
            f"idempotency key {claim.key!r} is held by an append at seq {claim.seq} that has "
            "not been written yet"
        )
        if not claim.claimed_at:  # claimed by a version that did not say when
            return (
                f"{held}; if its producer died, a compactor seals the seq after its grace "
                "period (deltalog compact): retry then"
            )
        age = max(0.0, time.time() - claim.claimed_at)
        return (
            f"{held} (claimed {age:.0f}s ago); if its producer died, retry after the grace "
            f"period ({self.config.grace:g}s, DELTALOG_GRACE): this append then seals the "
            "seq itself and writes the delta"
        )

    async def _claim_state(self, claim: Claim) -> str:
        """``written``, ``in-flight`` or ``stale`` (the claimed seq was sealed)."""
        key = self.keys.entry(claim.seq)
        stored = await self._get_with_retry(key)
        if stored is None:
            return "in-flight"
        try:
            entry = decode_entry(stored.data, seq=claim.seq, key=key)
        except CorruptEntry:
            return "stale"
        if isinstance(entry, Batch) and entry.entry_id == claim.entry_id:
            return "written"
        return "stale" if isinstance(entry, Seal | Batch) else "in-flight"

    async def _claim(self, attempt: Attempt, seq: int) -> None:
        """Claim (or move) every key of the attempt at ``seq``."""
        now = time.time()
        wanted = [
            Claim(d.idempotency_key, seq, attempt.entry_id, now)
            for d in attempt.deltas
            if d.idempotency_key
        ]
        if not wanted:
            return
        moved = {c.key: c for c in attempt.claimed}
        fresh = [c for c in wanted if c.key not in moved]
        held = await self.table.claim_keys(self.log_id, fresh) if fresh else {}
        lost: set[str] = set()
        for claim in wanted:
            if claim.key in moved:
                if not await self.table.replace_claim(self.log_id, moved[claim.key], claim):
                    lost.add(claim.key)
                    delta = next(d for d in attempt.deltas if d.idempotency_key == claim.key)
                    attempt.outcomes[delta.delta_id] = self._error(
                        Conflict,
                        f"idempotency key {claim.key!r} was taken over while its seq "
                        f"{moved[claim.key].seq} was sealed; retry the append",
                        seq,
                    )
            elif claim.key in held and not await self._take_over(attempt, held[claim.key], claim):
                lost.add(claim.key)
        attempt.claimed = [c for c in wanted if c.key not in lost]
        attempt.deltas = [d for d in attempt.deltas if d.idempotency_key not in lost]

    async def _take_over(self, attempt: Attempt, other: Claim, mine: Claim) -> bool:
        """Resolve a key another entry claimed first; True if ours now."""
        delta = next(d for d in attempt.deltas if d.idempotency_key == mine.key)
        if await self._settled(attempt, delta, other):
            return False
        if await self.table.replace_claim(self.log_id, other, mine):
            return True
        attempt.outcomes[delta.delta_id] = self._error(
            Conflict, f"idempotency key {mine.key!r} was claimed concurrently; retry the append"
        )
        return False
