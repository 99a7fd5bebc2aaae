"""The table seam: counters, claims and state that need atomic updates.

``Table`` is the whole contract deltalog needs from DynamoDB. Adapters:
``DynamoTable`` (``deltalog.dynamo``) and ``MemoryTable`` here, a real
in-memory adapter that runs the same contract tests.

Items per log (see ``deltalog.keys``): the append counter ``head``, the
``schema`` (one embedding dimension per collection, fixed by first use),
idempotency ``claims`` (which seq an idempotency key went to), the
``state`` item the compactor commits to (hwm, snapshot, and the lease with
its fencing token), ``quarantine`` marks set by an operator, and
**versions**: the highest version of a subject (a receipt) whose append was
allowed, so that an older version delivered late is refused
(``advance_version``).

The lease: ``acquire`` takes it when free or expired and adds one to the
token; ``renew``, ``commit``, ``note_hole`` and ``release`` are conditioned
on owner and token, so a compactor that paused past its lease is fenced
off whatever the clocks say.

**Shards** (DESIGN.md "Shards"): the ``layout`` item says how many indexes
the log is split into and in which generation (``read_layout``; no item:
one index, generation 0, today's ``state`` item). Each shard has a state
item of its own: the state methods take its sort key ``sk`` (default the
log's own ``state``). A reshard **retires** the state items of the old
generation (``retire_state``): from then on no acquire, renewal or commit
succeeds on them (``Resharded``), which fences the old generation's
compactors; the layout itself changes by compare-and-set
(``write_layout``).

**Named leases** (``acquire_lease`` and friends) are the same protocol on
an item of their own, ``(log, "lease#{name}")``: the right of one process to
own something outside the log for that log (``deltalog mirror`` holds one
per target server). Their tokens count up independently of the compaction
lease's.

**Identity.** A log id names a log within the table, not its bucket. A
table **binds** a log id to the log's full identity (``bind``, done by
``deltalog.storage.identity`` when a log is opened); from then on every
write it makes to any item of that log is conditioned on the item's
recorded identity being absent or equal, and records it, and every read of
an item recorded for another identity raises ``IdentityMismatch``. The
check is made in one place per adapter (``MemoryTable._write``/``_read``,
``DynamoTable._update``/``_check_item``), so an item kind added later is
covered by going through them. A log id never bound is addressed as is
(tools, and the contract tests of the other operations).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from deltalog.errors import Conflict, IdentityMismatch, LeaseBusy, LeaseLost, Resharded
from deltalog.keys import (
    HEAD_SK,
    IDENTITY_SK,
    LAYOUT_SK,
    SCHEMA_SK,
    STATE_SK,
    idempotency_sk,
    lease_sk,
    quarantine_sk,
    version_sk,
)

__all__ = [
    "Bindings",
    "Claim",
    "Commit",
    "Layout",
    "LeaseState",
    "LogState",
    "MemoryTable",
    "Retiring",
    "Table",
    "held_until",
    "identity_mismatch",
    "wall_time",
]


def wall_time(at: float) -> str:
    """A time for people: ``2025-03-01 14:03:22 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def held_until(owner: str | None, expires_at: float, now: float) -> str:
    """``held by OWNER until 2025-03-01 14:03:22 UTC (in 18.7 s)``: a busy lease, for people."""
    return f"held by {owner} until {wall_time(expires_at)} (in {max(0.0, expires_at - now):.1f} s)"


def identity_mismatch(log_id: str, recorded: str | None, wanted: str) -> IdentityMismatch:
    """The error of a handle naming ``wanted`` for a log recorded as ``recorded``."""
    belongs = recorded or "of another bucket or root"
    return IdentityMismatch(
        f"the table's log {log_id!r} is {belongs}, not {wanted}: check --bucket and --root "
        "(DELTALOG_BUCKET, DELTALOG_ROOT). A table holds one log of a name per root prefix: "
        "a log of that name in another bucket needs another --log or --root. Nothing was "
        "written",
        recorded=recorded,
        wanted=wanted,
        log=log_id,
    )


class Bindings:
    """The identity a table adapter addresses each bound log as (see ``Table.bind``)."""

    def __init__(self) -> None:
        self._by_log: dict[str, str] = {}

    def get(self, log_id: str) -> str | None:
        return self._by_log.get(log_id)

    def add(self, log_id: str, identity: str) -> None:
        """Bind ``log_id``; one table cannot address one log as two identities."""
        bound = self._by_log.setdefault(log_id, identity)
        if bound != identity:
            raise identity_mismatch(log_id, bound, identity)

    def discard(self, log_id: str, identity: str) -> None:
        if self._by_log.get(log_id) == identity:
            del self._by_log[log_id]

    def check(self, log_id: str, recorded: str | None) -> None:
        """The rule of every access: an item recorded for another identity is not ours."""
        wanted = self._by_log.get(log_id)
        if wanted is not None and recorded is not None and recorded != wanted:
            raise identity_mismatch(log_id, recorded, wanted)


@dataclass(frozen=True, slots=True)
class Claim:
    """An idempotency key taken by the entry ``entry_id`` at ``seq``."""

    key: str
    seq: int
    entry_id: str
    claimed_at: float = 0.0
    """When the claimer took it (its clock, seconds since the epoch); 0 for a claim
    written by a version before it. Tells how long the seq has gone unwritten."""


@dataclass(frozen=True, slots=True)
class LogState:
    """The commit point of a log: hwm, the checkpoint, who compacts.

    The committed state is the **checkpoint** (the published snapshot
    ``snapshot_key``, holding seqs up to ``snapshot_hwm``) plus the
    **committed tail**: the entries in ``(snapshot_hwm, hwm]``, applied but
    not re-published (DESIGN.md "Checkpoints").
    """

    hwm: int = 0
    snapshot_key: str | None = None
    snapshot_sha256: str | None = None
    snapshot_size: int = 0
    """The checkpoint archive's bytes."""
    snapshot_hwm: int | None = None
    """The seq the checkpoint holds; None in a state committed by a version before
    checkpoints, whose snapshot holds ``hwm`` (see ``checkpoint_hwm``)."""
    tail_bytes: int = 0
    """Stored bytes of the entries in the committed tail."""
    owner: str | None = None
    token: int = 0
    expires_at: float = 0.0
    updated_at: float = 0.0
    hole_seq: int = 0
    """The hole the compactor last stopped at, and when it first saw it."""
    hole_first_seen: float = 0.0
    last_run: str = ""
    """A one-line JSON summary of the last compaction run."""
    recent_snapshots: tuple[str, ...] = ()
    """The keys of the most recently committed snapshots, newest (the committed
    one) first: what retention keeps. Empty for a state committed by a version
    before it."""
    retired_by: int = 0
    """The layout generation that replaced this state (a reshard); 0 while current."""
    lineage: str = ""
    """Which rebuild the checkpoint descends from: empty for the log's first
    lineage (and a state committed before lineages); a published rebuild starts
    a new one (named by its checkpoint's key). Every copy derived from the
    committed state (a compactor's live copy, a mirror) records the lineage it
    descends from and is discarded once the state's is another."""

    def lease_free(self, now: float) -> bool:
        return self.owner is None or self.expires_at <= now

    @property
    def checkpoint_hwm(self) -> int:
        """The seq the checkpoint holds: ``snapshot_hwm``, or ``hwm`` for an older state."""
        return self.hwm if self.snapshot_hwm is None else self.snapshot_hwm

    @property
    def tail_entries(self) -> int:
        """Seqs in the committed tail, ``(checkpoint_hwm, hwm]``."""
        return self.hwm - self.checkpoint_hwm


@dataclass(frozen=True, slots=True)
class Retiring:
    """An earlier generation whose checkpoints are deleted once ``since`` + a grace is past."""

    generation: int
    shards: int
    since: float
    """When the switch to a newer generation made it old."""


@dataclass(frozen=True, slots=True)
class Layout:
    """How a log is split into indexes: the ``layout`` item (DESIGN.md "Shards").

    ``shards`` indexes in ``generation``; a log without the item has one
    index in generation 0 (the log's own keys). A reshard in progress
    builds ``pending_shards`` in ``pending_generation`` (0: none). ``floor``
    is the old generation's last committed hwm at the switch: readers' cut
    is never below it.
    """

    shards: int = 1
    generation: int = 0
    pending_shards: int = 0
    pending_generation: int = 0
    floor: int = 0
    retiring: tuple[Retiring, ...] = ()
    updated_at: float = 0.0
    stored: bool = False
    """Whether the item exists (``write_layout`` compares it)."""

    @property
    def sharded(self) -> bool:
        return self.generation > 0


@dataclass(frozen=True, slots=True)
class LeaseState:
    """A named lease: who holds it, with which fencing token, until when."""

    owner: str | None = None
    token: int = 0
    expires_at: float = 0.0
    updated_at: float = 0.0

    def lease_free(self, now: float) -> bool:
        return self.owner is None or self.expires_at <= now


@dataclass(frozen=True, slots=True)
class Commit:
    """What a compaction run commits: the new hwm and, when it published one, a checkpoint.

    With ``snapshot_key`` the checkpoint is replaced by one that holds
    ``hwm`` (``snapshot_hwm = hwm``, an empty tail); without, only hwm and
    the tail's bytes move and the checkpoint stays.
    """

    hwm: int
    snapshot_key: str | None = None
    snapshot_sha256: str | None = None
    snapshot_size: int = 0
    last_run: str = ""
    recent_snapshots: tuple[str, ...] = ()
    """The new ``LogState.recent_snapshots`` (``snapshot_key`` first); empty keeps
    the recorded ones."""
    tail_bytes: int = 0
    """The committed tail's stored bytes after this commit (0 with a checkpoint)."""
    lineage: str | None = None
    """A new ``LogState.lineage`` (a published rebuild); None keeps the recorded one."""

    def __post_init__(self) -> None:
        if (self.snapshot_key is None) != (self.snapshot_sha256 is None):
            raise ValueError("a checkpoint needs both its key and its sha256")
        if self.lineage is not None and self.snapshot_key is None:
            raise ValueError("a new lineage starts with a checkpoint")
        if self.snapshot_key is not None and self.tail_bytes:
            raise ValueError("a commit with a checkpoint has an empty tail")


class Table(Protocol):
    """The operations deltalog performs on its table."""

    async def read_identity(self, log_id: str) -> str | None:
        """The identity recorded for the log (``LogKeys.identity``), None if none is."""
        ...

    async def bind(self, log_id: str, identity: str, *, record: bool) -> bool:
        """Address the log as ``identity`` from now on; True if this call recorded it.

        With ``record``, the identity is written unless one is (a conditional
        write): another recorded one raises ``IdentityMismatch`` and nothing
        is written. Without, nothing is written (a reader). Either way, every
        later write of this table to the log's items is conditioned on, and
        records, the identity; a read of an item recorded for another raises
        ``IdentityMismatch``; so does binding one log id to two identities.
        """
        ...

    async def reserve(self, log_id: str) -> int:
        """Atomically add one to the counter and return the new value."""
        ...

    async def read_head(self, log_id: str) -> int:
        """The last reserved seq (0 for a new log), read consistently."""
        ...

    async def record_dim(self, log_id: str, collection: str, dim: int) -> int:
        """Fix ``collection``'s dimension at ``dim`` unless set; return the stored one."""
        ...

    async def read_dims(self, log_id: str) -> dict[str, int]: ...

    async def claim_keys(self, log_id: str, claims: Sequence[Claim]) -> dict[str, Claim]:
        """Take each key unless another entry holds it; return those held by others.

        A key already held by the same ``entry_id`` counts as taken (a retry).
        """
        ...

    async def get_claims(self, log_id: str, keys: Sequence[str]) -> dict[str, Claim]: ...

    async def replace_claim(self, log_id: str, old: Claim, new: Claim) -> bool:
        """Swap ``old`` for ``new`` if ``old`` is still what is stored.

        True also when ``new`` is already stored: a retry of a swap whose
        answer was lost must not look like losing the key.
        """
        ...

    async def advance_version(self, log_id: str, subject: str, version: int) -> int:
        """Record ``version`` of ``subject`` unless a higher one is recorded; return the one
        recorded after the call (``version``, or the higher one that refused it).

        Conditional and atomic: of two callers the higher version wins whatever the order.
        """
        ...

    async def read_state(self, log_id: str, *, sk: str = STATE_SK) -> LogState: ...

    async def acquire(
        self, log_id: str, owner: str, *, ttl: float, now: float, sk: str = STATE_SK
    ) -> LogState:
        """Take the lease if free or expired, adding one to the token.

        Raises ``LeaseBusy`` naming the holder otherwise, ``Resharded`` if the
        state is retired.
        """
        ...

    async def renew(
        self, log_id: str, owner: str, token: int, *, ttl: float, now: float, sk: str = STATE_SK
    ) -> None:
        """Extend the lease; ``LeaseLost`` if ``owner``/``token`` no longer hold it
        (``Resharded`` if the state was retired)."""
        ...

    async def commit(
        self,
        log_id: str,
        owner: str,
        token: int,
        *,
        prev_hwm: int,
        commit: Commit,
        now: float,
        sk: str = STATE_SK,
    ) -> LogState:
        """The commit point: set hwm and snapshot only if the lease and hwm are as read
        and the state is not retired.

        Raises ``LeaseLost`` when fenced (another owner or token; ``Resharded``
        when retired), ``Conflict`` when hwm moved.
        """
        ...

    async def release(
        self, log_id: str, owner: str, token: int, *, last_run: str = "", sk: str = STATE_SK
    ) -> bool:
        """Give the lease up (keeping the token); False if it was no longer ours."""
        ...

    async def note_hole(
        self, log_id: str, owner: str, token: int, *, seq: int, now: float, sk: str = STATE_SK
    ) -> float:
        """Record when the hole at ``seq`` was first seen (under the lease); return that time."""
        ...

    async def read_states(self, log_id: str, prefix: str) -> dict[str, LogState]:
        """Every state item whose sort key starts with ``prefix`` (a generation's shards),
        by sort key, in one consistent read."""
        ...

    async def retire_state(self, log_id: str, *, sk: str, generation: int, now: float) -> LogState:
        """Retire a state item for ``generation`` (idempotent; ``Conflict`` if another
        generation retired it): no acquire, renewal or commit succeeds on it again."""
        ...

    async def read_layout(self, log_id: str) -> Layout:
        """The layout item, or the default ``Layout()`` (one index, generation 0)."""
        ...

    async def write_layout(
        self, log_id: str, layout: Layout, *, expected: Layout, now: float
    ) -> Layout:
        """Store ``layout`` if the stored item is still ``expected`` (absent when
        ``expected.stored`` is false; else the same generation and pending
        generation). ``Conflict`` otherwise."""
        ...

    async def quarantine(self, log_id: str, seq: int, reason: str, *, now: float) -> None:
        """Mark the entry at ``seq`` as quarantined: compaction treats it as a seal."""
        ...

    async def read_quarantined(self, log_id: str) -> dict[int, str]: ...

    async def read_lease(self, log_id: str, name: str) -> LeaseState: ...

    async def acquire_lease(
        self, log_id: str, name: str, owner: str, *, ttl: float, now: float
    ) -> LeaseState:
        """Take the named lease if free or expired, adding one to its token (else ``LeaseBusy``)."""
        ...

    async def renew_lease(
        self, log_id: str, name: str, owner: str, token: int, *, ttl: float, now: float
    ) -> None:
        """Extend the named lease; ``LeaseLost`` if ``owner``/``token`` no longer hold it."""
        ...

    async def release_lease(self, log_id: str, name: str, owner: str, token: int) -> bool:
        """Give the named lease up (keeping the token); False if it was no longer ours."""
        ...

    async def aclose(self) -> None: ...


class MemoryTable:
    """The table seam in dicts: for tests, examples and single-process use."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], str] = {}
        """(log id, sort key) -> the identity the item was written for."""
        self._bindings = Bindings()
        self._heads: dict[str, int] = {}
        self._dims: dict[str, dict[str, int]] = {}
        self._claims: dict[tuple[str, str], Claim] = {}
        self._states: dict[str, LogState] = {}
        """The log's own state items (``state``), by log id."""
        self._shard_states: dict[tuple[str, str], LogState] = {}
        """Shards' state items, by (log id, sort key)."""
        self._layouts: dict[str, Layout] = {}
        self._quarantined: dict[str, dict[int, str]] = {}
        self._leases: dict[tuple[str, str], LeaseState] = {}
        self._versions: dict[tuple[str, str], int] = {}
        self.requests = 0

    def client(self) -> MemoryTable:
        """Another client of the same tables, with bindings of its own (another process)."""
        other = copy.copy(self)
        other._bindings = Bindings()
        other.requests = 0
        return other

    def _read(self, log_id: str, *sks: str) -> None:
        """The identity check of every read (see ``Table.bind``)."""
        for sk in sks:
            self._bindings.check(log_id, self._items.get((log_id, sk)))

    def _write(self, log_id: str, *sks: str) -> None:
        """The identity check of every write, all items first; then records the identity."""
        self._read(log_id, *sks)
        if (wanted := self._bindings.get(log_id)) is not None:
            for sk in sks:
                self._items[(log_id, sk)] = wanted

    async def read_identity(self, log_id: str) -> str | None:
        self.requests += 1
        return self._items.get((log_id, IDENTITY_SK))

    async def bind(self, log_id: str, identity: str, *, record: bool) -> bool:
        self._bindings.add(log_id, identity)
        if not record:
            return False
        self.requests += 1
        recorded = (log_id, IDENTITY_SK) in self._items
        try:
            self._write(log_id, IDENTITY_SK)
        except IdentityMismatch:
            self._bindings.discard(log_id, identity)
            raise
        return not recorded

    async def reserve(self, log_id: str) -> int:
        self.requests += 1
        self._write(log_id, HEAD_SK)
        self._heads[log_id] = self._heads.get(log_id, 0) + 1
        return self._heads[log_id]

    async def read_head(self, log_id: str) -> int:
        self.requests += 1
        self._read(log_id, HEAD_SK)
        return self._heads.get(log_id, 0)

    async def record_dim(self, log_id: str, collection: str, dim: int) -> int:
        self.requests += 1
        self._write(log_id, SCHEMA_SK)
        return self._dims.setdefault(log_id, {}).setdefault(collection, dim)

    async def read_dims(self, log_id: str) -> dict[str, int]:
        self.requests += 1
        self._read(log_id, SCHEMA_SK)
        return dict(self._dims.get(log_id, {}))

    async def claim_keys(self, log_id: str, claims: Sequence[Claim]) -> dict[str, Claim]:
        self.requests += 1
        self._write(log_id, *(idempotency_sk(c.key) for c in claims))
        held: dict[str, Claim] = {}
        for claim in claims:
            existing = self._claims.setdefault((log_id, claim.key), claim)
            if existing.entry_id != claim.entry_id:
                held[claim.key] = existing
        return held

    async def get_claims(self, log_id: str, keys: Sequence[str]) -> dict[str, Claim]:
        self.requests += 1
        self._read(log_id, *(idempotency_sk(k) for k in keys))
        return {k: c for k in keys if (c := self._claims.get((log_id, k))) is not None}

    async def replace_claim(self, log_id: str, old: Claim, new: Claim) -> bool:
        self.requests += 1
        self._write(log_id, idempotency_sk(new.key))
        if self._claims.get((log_id, old.key)) not in (old, new):
            return False
        self._claims[(log_id, old.key)] = new
        return True

    async def advance_version(self, log_id: str, subject: str, version: int) -> int:
        self.requests += 1
        self._write(log_id, version_sk(subject))
        recorded = max(self._versions.get((log_id, subject), version), version)
        self._versions[(log_id, subject)] = recorded
        return recorded

    async def read_state(self, log_id: str, *, sk: str = STATE_SK) -> LogState:
        self.requests += 1
        self._read(log_id, sk)
        return self._state(log_id, sk)

    async def acquire(
        self, log_id: str, owner: str, *, ttl: float, now: float, sk: str = STATE_SK
    ) -> LogState:
        state = await self.read_state(log_id, sk=sk)
        _check_current(state, log_id, sk)
        if not state.lease_free(now):
            raise LeaseBusy(
                f"the lease is {held_until(state.owner, state.expires_at, now)}", log=log_id
            )
        self._write(log_id, sk)
        state = replace(
            state, owner=owner, token=state.token + 1, expires_at=now + ttl, updated_at=now
        )
        self._put(log_id, sk, state)
        return state

    def _state(self, log_id: str, sk: str) -> LogState:
        if sk == STATE_SK:
            return self._states.get(log_id, LogState())
        return self._shard_states.get((log_id, sk), LogState())

    def _put(self, log_id: str, sk: str, state: LogState) -> None:
        if sk == STATE_SK:
            self._states[log_id] = state
        else:
            self._shard_states[(log_id, sk)] = state

    def _held(
        self, log_id: str, sk: str, owner: str, token: int, *, current: bool = True
    ) -> LogState:
        self._write(log_id, sk)
        state = self._state(log_id, sk)
        if current:
            _check_current(state, log_id, sk)
        if state.owner != owner or state.token != token:
            raise LeaseLost(
                f"lease lost: held by {state.owner} with token {state.token}, not token {token}",
                log=log_id,
            )
        return state

    async def renew(
        self, log_id: str, owner: str, token: int, *, ttl: float, now: float, sk: str = STATE_SK
    ) -> None:
        self.requests += 1
        state = self._held(log_id, sk, owner, token)
        self._put(log_id, sk, replace(state, expires_at=now + ttl, updated_at=now))

    async def commit(
        self,
        log_id: str,
        owner: str,
        token: int,
        *,
        prev_hwm: int,
        commit: Commit,
        now: float,
        sk: str = STATE_SK,
    ) -> LogState:
        self.requests += 1
        state = self._held(log_id, sk, owner, token)
        if state.hwm != prev_hwm:
            raise Conflict(f"hwm moved from {prev_hwm} to {state.hwm}", log=log_id)
        if commit.snapshot_key is not None:
            state = replace(
                state,
                snapshot_key=commit.snapshot_key,
                snapshot_sha256=commit.snapshot_sha256,
                snapshot_size=commit.snapshot_size,
                snapshot_hwm=commit.hwm,
            )
        elif state.snapshot_hwm is None:  # an older state: its snapshot holds its hwm
            state = replace(state, snapshot_hwm=state.hwm)
        state = replace(
            state,
            hwm=commit.hwm,
            tail_bytes=commit.tail_bytes,
            last_run=commit.last_run or state.last_run,
            recent_snapshots=commit.recent_snapshots or state.recent_snapshots,
            lineage=state.lineage if commit.lineage is None else commit.lineage,
            updated_at=now,
        )
        self._put(log_id, sk, state)
        return state

    async def release(
        self, log_id: str, owner: str, token: int, *, last_run: str = "", sk: str = STATE_SK
    ) -> bool:
        self.requests += 1
        try:
            state = self._held(log_id, sk, owner, token, current=False)
        except LeaseLost:
            return False
        self._put(
            log_id,
            sk,
            replace(state, owner=None, expires_at=0.0, last_run=last_run or state.last_run),
        )
        return True

    async def note_hole(
        self, log_id: str, owner: str, token: int, *, seq: int, now: float, sk: str = STATE_SK
    ) -> float:
        self.requests += 1
        state = self._held(log_id, sk, owner, token, current=False)
        if state.hole_seq == seq:
            return state.hole_first_seen
        self._put(log_id, sk, replace(state, hole_seq=seq, hole_first_seen=now))
        return now

    async def read_states(self, log_id: str, prefix: str) -> dict[str, LogState]:
        self.requests += 1
        found = {sk: state for (log, sk), state in self._shard_states.items() if log == log_id}
        if log_id in self._states:
            found[STATE_SK] = self._states[log_id]
        chosen = {sk: state for sk, state in sorted(found.items()) if sk.startswith(prefix)}
        self._read(log_id, *chosen)
        return chosen

    async def retire_state(self, log_id: str, *, sk: str, generation: int, now: float) -> LogState:
        self.requests += 1
        self._write(log_id, sk)
        state = self._state(log_id, sk)
        if state.retired_by not in (0, generation):
            raise Conflict(
                f"the state {sk!r} was retired by generation {state.retired_by}, not {generation}",
                log=log_id,
            )
        state = replace(state, retired_by=generation, updated_at=now)
        self._put(log_id, sk, state)
        return state

    async def read_layout(self, log_id: str) -> Layout:
        self.requests += 1
        self._read(log_id, LAYOUT_SK)
        return self._layouts.get(log_id, Layout())

    async def write_layout(
        self, log_id: str, layout: Layout, *, expected: Layout, now: float
    ) -> Layout:
        self.requests += 1
        self._write(log_id, LAYOUT_SK)
        stored = self._layouts.get(log_id, Layout())
        if not _same_layout(stored, expected):
            raise Conflict(
                f"the layout changed: generation {stored.generation} (pending "
                f"{stored.pending_generation}), not {expected.generation} (pending "
                f"{expected.pending_generation}); read it again",
                log=log_id,
            )
        written = replace(layout, updated_at=now, stored=True)
        self._layouts[log_id] = written
        return written

    async def quarantine(self, log_id: str, seq: int, reason: str, *, now: float) -> None:
        self.requests += 1
        self._write(log_id, quarantine_sk(seq))
        self._quarantined.setdefault(log_id, {})[seq] = reason

    async def read_quarantined(self, log_id: str) -> dict[int, str]:
        self.requests += 1
        marks = dict(self._quarantined.get(log_id, {}))
        self._read(log_id, *(quarantine_sk(seq) for seq in marks))
        return marks

    async def read_lease(self, log_id: str, name: str) -> LeaseState:
        self.requests += 1
        self._read(log_id, lease_sk(name))
        return self._leases.get((log_id, name), LeaseState())

    async def acquire_lease(
        self, log_id: str, name: str, owner: str, *, ttl: float, now: float
    ) -> LeaseState:
        lease = await self.read_lease(log_id, name)
        if not lease.lease_free(now):
            raise LeaseBusy(
                f"the lease {name!r} is {held_until(lease.owner, lease.expires_at, now)}",
                log=log_id,
            )
        self._write(log_id, lease_sk(name))
        lease = LeaseState(owner, lease.token + 1, now + ttl, now)
        self._leases[(log_id, name)] = lease
        return lease

    def _held_lease(self, log_id: str, name: str, owner: str, token: int) -> LeaseState:
        self._write(log_id, lease_sk(name))
        lease = self._leases.get((log_id, name), LeaseState())
        if lease.owner != owner or lease.token != token:
            raise LeaseLost(
                f"lease {name!r} lost: held by {lease.owner} with token {lease.token}, "
                f"not token {token}",
                log=log_id,
            )
        return lease

    async def renew_lease(
        self, log_id: str, name: str, owner: str, token: int, *, ttl: float, now: float
    ) -> None:
        self.requests += 1
        lease = self._held_lease(log_id, name, owner, token)
        self._leases[(log_id, name)] = replace(lease, expires_at=now + ttl, updated_at=now)

    async def release_lease(self, log_id: str, name: str, owner: str, token: int) -> bool:
        self.requests += 1
        try:
            lease = self._held_lease(log_id, name, owner, token)
        except LeaseLost:
            return False
        self._leases[(log_id, name)] = replace(lease, owner=None, expires_at=0.0)
        return True

    async def aclose(self) -> None:
        return None


def _check_current(state: LogState, log_id: str, sk: str) -> None:
    """``Resharded`` if a reshard retired the state: nobody acquires or commits there again."""
    if state.retired_by:
        raise Resharded(
            f"the state {sk!r} was retired by layout generation {state.retired_by} (the log "
            "was resharded): read the layout again and use its shards",
            generation=state.retired_by,
            log=log_id,
        )


def _same_layout(stored: Layout, expected: Layout) -> bool:
    """Whether ``stored`` is the layout a compare-and-set expected."""
    if not expected.stored:
        return not stored.stored
    return stored.stored and (stored.generation, stored.pending_generation) == (
        expected.generation,
        expected.pending_generation,
    )
