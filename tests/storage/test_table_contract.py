"""The table contract, run against every adapter (see ``test_store_contract``)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace

import anyio
import pytest

from deltalog import (
    Closed,
    ConfigurationError,
    Conflict,
    IdentityMismatch,
    LeaseBusy,
    LeaseLost,
    LogConfig,
)
from deltalog.keys import IDENTITY_SK, STATE_SK
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.table import Claim, Commit, LeaseState, LogState, MemoryTable, Table

Client = Callable[[], Awaitable[Table]]
"""Another client of the table under test (another process, as far as bindings go)."""
OURS, THEIRS = "s3://ours/contract", "s3://theirs/contract"


class TableContract:
    """Every ``Table`` adapter passes these."""

    async def write_state_of_the_previous_version(
        self, table: Table, log_id: str, *, hwm: int, key: str
    ) -> None:
        """Store a state item as a version without checkpoints wrote it (no snapshot_hwm)."""
        raise NotImplementedError

    async def forget_identity(self, table: Table, log_id: str) -> None:
        """Delete the log's identity item, as an operator cleaning up by hand would."""
        raise NotImplementedError

    @pytest.fixture
    def log_id(self) -> str:
        return f"contract/{uuid.uuid4().hex[:12]}"

    # -- identity (the fixture ``client`` makes another client of the same table) --

    async def _write_everything(self, table: Table, log_id: str) -> None:
        assert await table.reserve(log_id) == 1
        await table.record_dim(log_id, "words", 8)
        assert await table.claim_keys(log_id, [Claim("k", 1, "e1")]) == {}
        await table.acquire(log_id, "a", ttl=10, now=100.0)
        await table.quarantine(log_id, 5, "bad", now=100.0)
        await table.acquire_lease(log_id, "mirror:x", "a", ttl=10, now=100.0)
        assert await table.advance_version(log_id, "receipt:x", 2) == 2

    async def test_the_first_identity_recorded_stays(
        self, table: Table, client: Client, log_id: str
    ) -> None:
        assert await table.read_identity(log_id) is None
        assert await table.bind(log_id, OURS, record=True) is True
        assert await table.read_identity(log_id) == OURS
        assert await (await client()).bind(log_id, OURS, record=True) is False
        other = await client()
        with pytest.raises(IdentityMismatch) as caught:
            await other.bind(log_id, THEIRS, record=True)
        assert (caught.value.recorded, caught.value.wanted) == (OURS, THEIRS)
        assert await table.read_identity(log_id) == OURS
        assert await other.read_identity(log_id) == OURS, "a failed bind leaves no binding"

    async def test_one_client_addresses_a_log_as_one_identity(
        self, table: Table, log_id: str
    ) -> None:
        await table.bind(log_id, OURS, record=False)
        with pytest.raises(IdentityMismatch):
            await table.bind(log_id, THEIRS, record=False)
        assert await table.read_identity(log_id) is None, "nothing recorded without record"

    async def test_every_item_refuses_another_identity_even_without_the_identity_item(
        self, table: Table, client: Client, log_id: str
    ) -> None:
        """Every write is conditioned on the item's own identity, every read checks it."""
        await table.bind(log_id, OURS, record=True)
        await self._write_everything(table, log_id)
        await self.forget_identity(table, log_id)
        other = await client()
        assert await other.bind(log_id, THEIRS, record=True) is True  # the item was gone
        writes = [
            other.reserve(log_id),
            other.record_dim(log_id, "lines", 4),
            other.claim_keys(log_id, [Claim("k", 2, "e2")]),
            other.replace_claim(log_id, Claim("k", 1, "e1"), Claim("k", 2, "e2")),
            other.acquire(log_id, "b", ttl=10, now=200.0),
            other.quarantine(log_id, 5, "mine", now=200.0),
            other.acquire_lease(log_id, "mirror:x", "b", ttl=10, now=200.0),
            other.advance_version(log_id, "receipt:x", 3),
            other.read_head(log_id),
            other.read_dims(log_id),
            other.get_claims(log_id, ["k"]),
            other.read_state(log_id),
            other.read_quarantined(log_id),
            other.read_lease(log_id, "mirror:x"),
        ]
        for call in writes:
            with pytest.raises(IdentityMismatch) as caught:
                await call
            assert caught.value.wanted == THEIRS
        mine = await client()
        await mine.bind(log_id, OURS, record=False)
        assert await mine.read_head(log_id) == 1
        assert await mine.read_dims(log_id) == {"words": 8}
        assert await mine.get_claims(log_id, ["k"]) == {"k": Claim("k", 1, "e1")}
        state = await mine.read_state(log_id)
        assert (state.owner, state.token) == ("a", 1)
        assert await mine.read_quarantined(log_id) == {5: "bad"}
        assert (await mine.read_lease(log_id, "mirror:x")).owner == "a"
        assert await mine.advance_version(log_id, "receipt:x", 1) == 2, "still version 2"

    async def test_items_without_an_identity_take_the_first_bound_writer(
        self, table: Table, client: Client, log_id: str
    ) -> None:
        """Items an older version wrote (no identity) work on; a writer records its own."""
        await self._write_everything(table, log_id)  # unbound: as an older version wrote
        ours = await client()
        await ours.bind(log_id, OURS, record=False)
        assert await ours.reserve(log_id) == 2
        await ours.acquire(log_id, "b", ttl=10, now=200.0)
        theirs = await client()
        await theirs.bind(log_id, THEIRS, record=False)
        assert await theirs.read_dims(log_id) == {"words": 8}, "still no identity recorded"
        for call in (theirs.reserve(log_id), theirs.read_state(log_id)):
            with pytest.raises(IdentityMismatch):
                await call
        assert await ours.read_head(log_id) == 2

    async def test_reserve_counts_up_from_one(self, table: Table, log_id: str) -> None:
        assert await table.read_head(log_id) == 0
        assert [await table.reserve(log_id) for _ in range(3)] == [1, 2, 3]
        assert await table.read_head(log_id) == 3
        assert await table.read_head(f"{log_id}-other") == 0
        assert await table.reserve(f"{log_id}-other") == 1

    async def test_concurrent_reserves_are_unique(self, table: Table, log_id: str) -> None:
        got: list[int] = []

        async def reserve() -> None:
            got.append(await table.reserve(log_id))

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(reserve)
        assert sorted(got) == list(range(1, 41))
        assert await table.read_head(log_id) == 40

    async def test_record_dim_keeps_the_first(self, table: Table, log_id: str) -> None:
        assert await table.read_dims(log_id) == {}
        assert await table.record_dim(log_id, "words", 8) == 8
        assert await table.record_dim(log_id, "words", 4) == 8
        assert await table.record_dim(log_id, "lines", 4) == 4
        assert await table.read_dims(log_id) == {"words": 8, "lines": 4}
        assert await table.read_dims(f"{log_id}-other") == {}

    async def test_claim_keys_takes_free_keys(self, table: Table, log_id: str) -> None:
        claims = [Claim("a", 1, "e1"), Claim("b", 1, "e1")]
        assert await table.claim_keys(log_id, claims) == {}
        assert await table.get_claims(log_id, ["a", "b", "c"]) == {"a": claims[0], "b": claims[1]}

    async def test_claim_keys_returns_conflicts(self, table: Table, log_id: str) -> None:
        held = Claim("a", 1, "e1")
        assert await table.claim_keys(log_id, [held]) == {}
        mine = [Claim("a", 2, "e2"), Claim("b", 2, "e2"), Claim("c", 2, "e2")]
        assert await table.claim_keys(log_id, mine) == {"a": held}
        assert await table.get_claims(log_id, ["a", "b", "c"]) == {
            "a": held,
            "b": mine[1],
            "c": mine[2],
        }

    async def test_the_same_entry_claiming_again_counts_as_ours(
        self, table: Table, log_id: str
    ) -> None:
        claim = Claim("a", 3, "e1")
        assert await table.claim_keys(log_id, [claim]) == {}
        assert await table.claim_keys(log_id, [claim, Claim("b", 3, "e1")]) == {}
        assert (await table.get_claims(log_id, ["a"]))["a"] == claim

    async def test_concurrent_claims_of_one_key_have_one_winner(
        self, table: Table, log_id: str
    ) -> None:
        winners: list[str] = []

        async def claim(n: int) -> None:
            if not await table.claim_keys(log_id, [Claim("k", n, f"e{n}")]):
                winners.append(f"e{n}")

        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(claim, n)
        assert len(winners) == 1
        assert (await table.get_claims(log_id, ["k"]))["k"].entry_id == winners[0]

    async def test_many_claims_at_once(self, table: Table, log_id: str) -> None:
        claims = [Claim(f"k{n:03d}", 7, "e") for n in range(230)]
        assert await table.claim_keys(log_id, claims) == {}
        keys = [c.key for c in claims]
        assert await table.get_claims(log_id, keys + keys[:5]) == {c.key: c for c in claims}
        others = [Claim(c.key, 8, "f") for c in claims[::50]]
        held = await table.claim_keys(log_id, [*others, Claim("fresh", 8, "f")])
        assert held == {c.key: Claim(c.key, 7, "e") for c in others}

    async def test_get_claims_of_nothing(self, table: Table, log_id: str) -> None:
        assert await table.get_claims(log_id, []) == {}
        assert await table.get_claims(log_id, ["missing"]) == {}

    async def test_replace_claim_swaps_only_what_it_read(self, table: Table, log_id: str) -> None:
        old, new = Claim("k", 1, "e1"), Claim("k", 5, "e1")
        await table.claim_keys(log_id, [old])
        assert await table.replace_claim(log_id, old, new) is True
        assert (await table.get_claims(log_id, ["k"]))["k"] == new
        # A retry of the same swap (its answer was lost) still reports success.
        assert await table.replace_claim(log_id, old, new) is True
        # A stale read loses.
        assert await table.replace_claim(log_id, old, Claim("k", 9, "e9")) is False
        assert (await table.get_claims(log_id, ["k"]))["k"] == new
        assert (
            await table.replace_claim(log_id, Claim("k", 5, "other"), Claim("k", 6, "x")) is False
        )

    async def test_read_state_of_a_new_log(self, table: Table, log_id: str) -> None:
        state = await table.read_state(log_id)
        assert state == LogState()
        assert (state.hwm, state.snapshot_key, state.owner, state.token) == (0, None, None, 0)

    # -- the lease and the commit point ------------------------------------------------

    async def test_acquire_takes_a_free_lease_and_counts_the_token(
        self, table: Table, log_id: str
    ) -> None:
        state = await table.acquire(log_id, "a", ttl=10, now=100.0)
        assert (state.owner, state.token, state.expires_at) == ("a", 1, 110.0)
        with pytest.raises(LeaseBusy, match="held by a"):
            await table.acquire(log_id, "b", ttl=10, now=109.0)
        assert await table.release(log_id, "a", 1)
        freed = await table.read_state(log_id)
        assert (freed.owner, freed.token) == (None, 1)
        again = await table.acquire(log_id, "b", ttl=10, now=109.0)
        assert (again.owner, again.token) == ("b", 2)

    async def test_an_expired_lease_is_taken_and_the_old_holder_fenced(
        self, table: Table, log_id: str
    ) -> None:
        await table.acquire(log_id, "a", ttl=10, now=100.0)
        await table.renew(log_id, "a", 1, ttl=10, now=105.0)
        with pytest.raises(LeaseBusy):
            await table.acquire(log_id, "b", ttl=10, now=114.0)
        taken = await table.acquire(log_id, "b", ttl=10, now=115.0)
        assert (taken.owner, taken.token) == ("b", 2)
        with pytest.raises(LeaseLost):
            await table.renew(log_id, "a", 1, ttl=10, now=116.0)
        commit = Commit(1, "snap-a", "sha-a", 10)
        with pytest.raises(LeaseLost):
            await table.commit(log_id, "a", 1, prev_hwm=0, commit=commit, now=116.0)
        with pytest.raises(LeaseLost):
            await table.note_hole(log_id, "a", 1, seq=3, now=116.0)
        assert await table.release(log_id, "a", 1) is False
        with pytest.raises(LeaseLost):  # the same owner with an old token is fenced too
            await table.renew(log_id, "b", 1, ttl=10, now=116.0)
        state = await table.read_state(log_id)
        assert (state.owner, state.token, state.hwm, state.snapshot_key) == ("b", 2, 0, None)

    async def test_the_same_owner_with_a_stale_token_cannot_commit(
        self, table: Table, log_id: str
    ) -> None:
        """The commit is fenced by the token, not only the owner: ``Compactor(owner=...)``
        lets one owner take its own expired lease again, and its earlier run must lose."""
        first = await table.acquire(log_id, "a", ttl=10, now=100.0)
        again = await table.acquire(log_id, "a", ttl=10, now=111.0)
        assert (first.token, again.owner, again.token) == (1, "a", 2)
        commit = Commit(3, "snap-a1", "sha-a1", 30)
        with pytest.raises(LeaseLost):
            await table.commit(log_id, "a", 1, prev_hwm=0, commit=commit, now=112.0)
        state = await table.read_state(log_id)
        assert (state.owner, state.token, state.hwm, state.snapshot_key) == ("a", 2, 0, None)

    async def test_named_leases_are_fenced_and_apart_from_the_compaction_lease(
        self, table: Table, log_id: str
    ) -> None:
        assert await table.read_lease(log_id, "mirror:x") == LeaseState()
        held = await table.acquire_lease(log_id, "mirror:x", "a", ttl=10, now=100.0)
        assert (held.owner, held.token, held.expires_at) == ("a", 1, 110.0)
        with pytest.raises(LeaseBusy, match="held by a"):
            await table.acquire_lease(log_id, "mirror:x", "b", ttl=10, now=105.0)
        # another name, and the compaction lease, are separate items
        other = await table.acquire_lease(log_id, "mirror:y", "b", ttl=10, now=105.0)
        assert (other.owner, other.token) == ("b", 1)
        assert (await table.acquire(log_id, "c", ttl=10, now=105.0)).token == 1
        await table.renew_lease(log_id, "mirror:x", "a", 1, ttl=10, now=108.0)
        assert (await table.read_lease(log_id, "mirror:x")).expires_at == 118.0
        taken = await table.acquire_lease(log_id, "mirror:x", "b", ttl=10, now=118.0)
        assert (taken.owner, taken.token) == ("b", 2)
        with pytest.raises(LeaseLost):
            await table.renew_lease(log_id, "mirror:x", "a", 1, ttl=10, now=119.0)
        assert await table.release_lease(log_id, "mirror:x", "a", 1) is False
        assert await table.release_lease(log_id, "mirror:x", "b", 2) is True
        freed = await table.read_lease(log_id, "mirror:x")
        assert (freed.owner, freed.token) == (None, 2)
        assert (await table.read_state(log_id)).owner == "c"

    async def test_commit_is_conditioned_on_the_previous_hwm(
        self, table: Table, log_id: str
    ) -> None:
        await table.acquire(log_id, "a", ttl=10, now=100.0)
        first = Commit(4, "snap-4", "sha-4", 40, last_run='{"status": "applied"}')
        state = await table.commit(log_id, "a", 1, prev_hwm=0, commit=first, now=101.0)
        assert (state.hwm, state.snapshot_key, state.snapshot_sha256, state.snapshot_size) == (
            4,
            "snap-4",
            "sha-4",
            40,
        )
        with pytest.raises(Conflict):
            await table.commit(log_id, "a", 1, prev_hwm=0, commit=first, now=102.0)
        # An empty last_run keeps the recorded one.
        second = Commit(6, "snap-6", "sha-6", 60)
        state = await table.commit(log_id, "a", 1, prev_hwm=4, commit=second, now=103.0)
        assert (state.hwm, state.last_run) == (6, '{"status": "applied"}')
        assert await table.release(log_id, "a", 1, last_run='{"status": "nothing"}')
        state = await table.read_state(log_id)
        assert (state.owner, state.hwm, state.snapshot_key, state.last_run) == (
            None,
            6,
            "snap-6",
            '{"status": "nothing"}',
        )

    async def test_commit_records_the_recent_snapshots(self, table: Table, log_id: str) -> None:
        assert (await table.read_state(log_id)).recent_snapshots == ()
        await table.acquire(log_id, "a", ttl=10, now=100.0)
        first = Commit(4, "snap-4", "sha-4", 40, recent_snapshots=("snap-4", "snap-2"))
        state = await table.commit(log_id, "a", 1, prev_hwm=0, commit=first, now=101.0)
        assert state.recent_snapshots == ("snap-4", "snap-2")
        # An empty history keeps the recorded one.
        second = Commit(6, "snap-6", "sha-6", 60)
        await table.commit(log_id, "a", 1, prev_hwm=4, commit=second, now=102.0)
        assert (await table.read_state(log_id)).recent_snapshots == ("snap-4", "snap-2")
        third = Commit(8, "snap-8", "sha-8", 80, recent_snapshots=("snap-8", "snap-4"))
        await table.commit(log_id, "a", 1, prev_hwm=6, commit=third, now=103.0)
        assert (await table.read_state(log_id)).recent_snapshots == ("snap-8", "snap-4")

    async def test_a_commit_records_a_new_lineage_and_others_keep_it(
        self, table: Table, log_id: str
    ) -> None:
        assert (await table.read_state(log_id)).lineage == ""
        await table.acquire(log_id, "a", ttl=10, now=100.0)
        rebuilt = Commit(4, "snap-4", "sha-4", 40, lineage="snap-4")
        await table.commit(log_id, "a", 1, prev_hwm=0, commit=rebuilt, now=101.0)
        assert (await table.read_state(log_id)).lineage == "snap-4"
        await table.commit(log_id, "a", 1, prev_hwm=4, commit=Commit(6, "s6", "x", 6), now=102.0)
        await table.commit(log_id, "a", 1, prev_hwm=6, commit=Commit(7, tail_bytes=3), now=103.0)
        assert (await table.read_state(log_id)).lineage == "snap-4", "runs keep the lineage"
        with pytest.raises(ValueError, match="lineage starts with a checkpoint"):
            Commit(8, lineage="x")

    async def test_a_commit_without_a_checkpoint_moves_hwm_and_keeps_the_checkpoint(
        self, table: Table, log_id: str
    ) -> None:
        await table.acquire(log_id, "a", ttl=10, now=100.0)
        first = Commit(4, "snap-4", "sha-4", 40, recent_snapshots=("snap-4",))
        state = await table.commit(log_id, "a", 1, prev_hwm=0, commit=first, now=101.0)
        assert (state.snapshot_hwm, state.checkpoint_hwm, state.tail_entries) == (4, 4, 0)
        tail = Commit(9, tail_bytes=1234, last_run='{"status": "applied"}')
        await table.commit(log_id, "a", 1, prev_hwm=4, commit=tail, now=102.0)
        state = await table.read_state(log_id)
        assert (state.hwm, state.snapshot_key, state.snapshot_sha256, state.snapshot_size) == (
            9,
            "snap-4",
            "sha-4",
            40,
        )
        assert (state.snapshot_hwm, state.tail_entries, state.tail_bytes) == (4, 5, 1234)
        assert state.recent_snapshots == ("snap-4",)
        with pytest.raises(Conflict):  # the same conditions as any commit
            await table.commit(log_id, "a", 1, prev_hwm=4, commit=tail, now=103.0)
        again = Commit(12, "snap-12", "sha-12", 120, recent_snapshots=("snap-12", "snap-4"))
        state = await table.commit(log_id, "a", 1, prev_hwm=9, commit=again, now=104.0)
        assert (state.hwm, state.snapshot_key, state.snapshot_hwm, state.tail_bytes) == (
            12,
            "snap-12",
            12,
            0,
        )

    async def test_a_state_committed_before_checkpoints_holds_hwm_in_its_snapshot(
        self, table: Table, log_id: str
    ) -> None:
        """No ``snapshot_hwm``: the snapshot holds hwm; the first tail commit records it."""
        await self.write_state_of_the_previous_version(table, log_id, hwm=5, key="old-5")
        state = await table.read_state(log_id)
        assert (state.hwm, state.snapshot_key, state.snapshot_hwm) == (5, "old-5", None)
        assert (state.checkpoint_hwm, state.tail_entries, state.tail_bytes) == (5, 0, 0)
        acquired = await table.acquire(log_id, "a", ttl=10, now=200.0)
        assert acquired.checkpoint_hwm == 5
        tail = Commit(7, tail_bytes=300)
        await table.commit(log_id, "a", acquired.token, prev_hwm=5, commit=tail, now=201.0)
        state = await table.read_state(log_id)
        assert (state.hwm, state.snapshot_key, state.snapshot_hwm, state.tail_bytes) == (
            7,
            "old-5",
            5,
            300,
        )

    def test_a_commit_with_a_checkpoint_has_an_empty_tail(self) -> None:
        with pytest.raises(ValueError, match="empty tail"):
            Commit(3, "k", "sha", 10, tail_bytes=5)
        with pytest.raises(ValueError, match="key and its sha256"):
            Commit(3, "k")

    async def test_note_hole_remembers_when_a_hole_was_first_seen(
        self, table: Table, log_id: str
    ) -> None:
        await table.acquire(log_id, "a", ttl=10, now=100.0)
        assert await table.note_hole(log_id, "a", 1, seq=5, now=101.0) == 101.0
        assert await table.note_hole(log_id, "a", 1, seq=5, now=104.0) == 101.0
        assert await table.note_hole(log_id, "a", 1, seq=7, now=105.0) == 105.0

    async def test_quarantine_marks(self, table: Table, log_id: str) -> None:
        assert await table.read_quarantined(log_id) == {}
        await table.quarantine(log_id, 12, "garbage bytes", now=100.0)
        await table.quarantine(log_id, 3, "undecodable", now=101.0)
        assert await table.read_quarantined(log_id) == {3: "undecodable", 12: "garbage bytes"}

    async def test_a_version_is_recorded_unless_a_higher_one_is(
        self, table: Table, log_id: str
    ) -> None:
        receipt = "receipt:0b8d:00001"
        assert await table.advance_version(log_id, receipt, 5) == 5
        assert await table.advance_version(log_id, receipt, 5) == 5, "the same again: allowed"
        assert await table.advance_version(log_id, receipt, 3) == 5, "an older one is refused"
        assert await table.advance_version(log_id, receipt, 9) == 9
        assert await table.advance_version(log_id, receipt, 0) == 9
        assert await table.advance_version(log_id, "receipt:0b8d:00002", 1) == 1
        assert await table.advance_version(f"{log_id}-other", receipt, 2) == 2

    async def test_concurrent_versions_end_at_the_highest(self, table: Table, log_id: str) -> None:
        """Whatever the order they land in, the highest version is recorded, and every
        caller but the highest's learns that a higher one exists."""
        answers: dict[int, int] = {}

        async def advance(version: int) -> None:
            answers[version] = await table.advance_version(log_id, "r", version)

        async with anyio.create_task_group() as tg:
            for version in (4, 1, 7, 3, 6):
                tg.start_soon(advance, version)
        assert await table.advance_version(log_id, "r", 0) == 7
        assert answers[7] == 7
        assert all(answers[v] >= v for v in answers)


class TestMemoryTable(TableContract):
    @pytest.fixture
    def table(self) -> MemoryTable:
        return MemoryTable()

    @pytest.fixture
    def client(self, table: MemoryTable) -> Client:
        async def another() -> Table:
            return table.client()

        return another

    async def forget_identity(self, table: Table, log_id: str) -> None:
        assert isinstance(table, MemoryTable)
        del table._items[(log_id, IDENTITY_SK)]

    async def write_state_of_the_previous_version(
        self, table: Table, log_id: str, *, hwm: int, key: str
    ) -> None:
        assert isinstance(table, MemoryTable)
        table._states[log_id] = LogState(
            hwm=hwm, snapshot_key=key, snapshot_sha256="sha", snapshot_size=50, token=3
        )


class TestDynamoTable(TableContract):
    @pytest.fixture
    async def table(self, config: LogConfig) -> AsyncIterator[DynamoTable]:
        table = await DynamoTable.connect(config)
        yield table
        await table.aclose()

    @pytest.fixture
    async def client(self, config: LogConfig) -> AsyncIterator[Client]:
        async with AsyncExitStack() as stack:

            async def another() -> Table:
                table = await DynamoTable.connect(config)
                stack.push_async_callback(table.aclose)
                return table

            yield another

    async def forget_identity(self, table: Table, log_id: str) -> None:
        assert isinstance(table, DynamoTable)
        key = {"pk": {"S": log_id}, "sk": {"S": IDENTITY_SK}}
        await table._db.delete_item(TableName=table.name, Key=key)

    async def write_state_of_the_previous_version(
        self, table: Table, log_id: str, *, hwm: int, key: str
    ) -> None:
        """The state item exactly as the version before checkpoints committed it."""
        assert isinstance(table, DynamoTable)
        await table._db.put_item(
            TableName=table.name,
            Item={
                "pk": {"S": log_id},
                "sk": {"S": STATE_SK},
                "hwm": {"N": str(hwm)},
                "snapshot_key": {"S": key},
                "snapshot_sha256": {"S": "sha"},
                "snapshot_size": {"N": "50"},
                "token": {"N": "3"},
                "expires_at": {"N": "0"},
                "updated_at": {"N": "100"},
                "recent_snapshots": {"L": [{"S": key}]},
            },
        )

    async def test_a_missing_table_says_to_run_init(self, config: LogConfig) -> None:
        name = f"missing-{uuid.uuid4().hex[:12]}"
        table = await DynamoTable.connect(replace(config, table=name))
        try:
            with pytest.raises(ConfigurationError, match=f"--table {name}"):
                await table.reserve("log")
            with pytest.raises(ConfigurationError, match="does not exist"):
                await table.read_head("log")
            with pytest.raises(ConfigurationError, match="does not exist"):
                await table.claim_keys("log", [Claim("k", 1, "e")])
        finally:
            await table.aclose()

    async def test_a_closed_table_raises_closed(self, config: LogConfig) -> None:
        table = await DynamoTable.connect(config)
        await table.aclose()
        with pytest.raises(Closed):
            await table.read_head("log")
