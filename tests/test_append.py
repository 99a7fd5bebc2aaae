"""The append protocol: dense seqs, exactly once, holes, seals, idempotency keys."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace

import anyio
import numpy as np
import pytest

from deltalog import (
    Batch,
    ConfigurationError,
    Conflict,
    Delta,
    DeltaLog,
    IdentityMismatch,
    LogConfig,
    Repeat,
    Seal,
    Unavailable,
)
from deltalog.codec import Frame, batch_body, encode_delta, seal_body
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import Claim, MemoryTable
from tests.builders import batch_of, delete, delta, delta_seqs, read_all, seal_of
from tests.faulty import FaultyStore, FaultyTable, faulty_log, faulty_memory_log

TASKS = 32
PER_TASK = 200


async def _submit_concurrently(
    log: DeltaLog, rng: np.random.Generator, tasks: int, per_task: int
) -> tuple[dict[str, int], dict[str, Delta]]:
    deltas = {
        d.delta_id: d
        for d in (delta(rng, f"t{t}-{n}", rows=1) for t in range(tasks) for n in range(per_task))
    }
    order = list(deltas.values())
    acknowledged: dict[str, int] = {}

    async def submitter(producer_index: int) -> None:
        for d in order[producer_index * per_task : (producer_index + 1) * per_task]:
            acknowledged[d.delta_id] = await producer.submit(d)

    async with log.producer(linger_ms=5) as producer, anyio.create_task_group() as tg:
        for t in range(tasks):
            tg.start_soon(submitter, t)
    return acknowledged, deltas


async def _check_exactly_once(
    log: DeltaLog, acknowledged: dict[str, int], deltas: dict[str, Delta]
) -> None:
    entries = await read_all(log)
    seqs = [seq for seq, _ in entries]
    assert seqs == list(range(1, len(entries) + 1))
    seen: dict[str, int] = {}
    for seq, entry in entries:
        for d in batch_of(entry).deltas:
            assert d.delta_id not in seen, f"delta {d.delta_id} at {seen[d.delta_id]} and {seq}"
            seen[d.delta_id] = seq
            want = deltas[d.delta_id].ops[0]
            assert d.ops[0].ids == want.ids
    assert seen == acknowledged
    status = await log.status()
    assert (status.head, status.entries, status.hole_count) == (len(entries), len(entries), 0)


async def test_concurrent_producers_append_every_delta_once_at_dense_seqs(
    log: DeltaLog, rng: np.random.Generator
) -> None:
    acknowledged, deltas = await _submit_concurrently(log, rng, TASKS, PER_TASK)
    assert len(acknowledged) == TASKS * PER_TASK
    await _check_exactly_once(log, acknowledged, deltas)
    # Group commit shares entries: far fewer entries than deltas.
    assert (await log.head()) < TASKS * PER_TASK / 4


async def test_concurrent_producers_on_memory_adapters(
    memory_log: DeltaLog, rng: np.random.Generator
) -> None:
    acknowledged, deltas = await _submit_concurrently(memory_log, rng, TASKS, PER_TASK)
    await _check_exactly_once(memory_log, acknowledged, deltas)


async def test_concurrent_plain_appends_get_distinct_dense_seqs(log: DeltaLog) -> None:
    got: dict[str, int] = {}

    async def append(n: int) -> None:
        d = delete(f"id{n}")
        got[d.delta_id] = await log.append(d)

    async with anyio.create_task_group() as tg:
        for n in range(40):
            tg.start_soon(append, n)
    assert sorted(got.values()) == list(range(1, 41))
    assert {d: seqs[0] for d, seqs in (await delta_seqs(log)).items()} == got


async def test_append_without_a_producer(log: DeltaLog, rng: np.random.Generator) -> None:
    first, second = delta(rng, "a"), delete("a#0")
    assert await log.append(first) == 1
    assert await log.append(second) == 2
    entries = await read_all(log)
    assert [seq for seq, _ in entries] == [1, 2]
    for (_, entry), want in zip(entries, (first, second), strict=True):
        batch = batch_of(entry)
        assert [d.delta_id for d in batch.deltas] == [want.delta_id]
        assert batch.producer_id == log.appender.producer_id
    assert log.statistics().entries_written == 2
    assert log.statistics().deltas_appended == 2


async def test_a_second_write_at_an_existing_seq_is_refused(log: DeltaLog) -> None:
    assert await log.append(delete("a")) == 1
    key = log.keys.entry(1)
    before = await log.store.get(key)
    assert before is not None
    impostor = Frame(batch_body("impostor", [encode_delta(delete("b"))], created_at=0)).at(1)
    assert await log.store.put_if_absent(key, impostor) is False
    after = await log.store.get(key)
    assert after is not None and after.data == before.data


async def test_a_reserved_but_unwritten_seq_is_a_hole(log: DeltaLog) -> None:
    assert await log.table.reserve(log.keys.log_id) == 1
    assert await log.append(delete("a")) == 2
    assert await log.append(delete("b")) == 3
    reader = log.read()
    assert [item async for item in reader] == []
    assert reader.end is not None and reader.end.is_hole
    assert (reader.end.seq, reader.end.head, reader.end.reason) == (1, 3, "hole")
    assert reader.end.next_entry is not None
    assert reader.end.next_entry.key == log.keys.entry(2)
    after_hole = log.read(after=1)
    assert [seq async for seq, _ in after_hole] == [2, 3]
    assert after_hole.end is not None and after_hole.end.reason == "end"
    status = await log.status()
    assert (status.head, status.entries, status.holes, status.hole_count) == (3, 2, [1], 1)


# -- ambiguous failures ----------------------------------------------------


async def test_a_write_whose_answer_is_lost_is_not_duplicated(config: LogConfig) -> None:
    async with faulty_log(config) as (log, store, _):
        store.lost_answers = 1
        d = delete("a")
        assert await log.append(d) == 1
        assert len(store.faults) == 1 and store.faults[0].ambiguous
        assert await log.head() == 1
        assert await delta_seqs(log) == {d.delta_id: [1]}


async def test_a_write_lost_on_the_way_is_retried_at_the_same_seq(config: LogConfig) -> None:
    async with faulty_log(config) as (log, store, _):
        store.lost_requests = 2
        d = delete("a")
        assert await log.append(d) == 1
        assert store.puts == [log.keys.entry(1)] * 3
        assert await delta_seqs(log) == {d.delta_id: [1]}
        assert log.statistics().append_retries >= 2


async def test_lost_answers_through_a_producer_are_not_duplicated(
    config: LogConfig, rng: np.random.Generator
) -> None:
    async with faulty_log(config) as (log, store, _):
        store.lost_answers = 5
        acknowledged: dict[str, int] = {}

        async def submit(d: Delta) -> None:
            acknowledged[d.delta_id] = await producer.submit(d)

        async with (
            log.producer(linger_ms=2, max_deltas=4) as producer,
            anyio.create_task_group() as tg,
        ):
            for n in range(40):
                tg.start_soon(submit, delta(rng, f"d{n}", rows=1))
        assert len(store.faults) == 5
        seen = await delta_seqs(log)
        assert {d: seqs for d, seqs in seen.items() if len(seqs) > 1} == {}
        assert {d: seqs[0] for d, seqs in seen.items()} == acknowledged
        assert (await log.status()).hole_count == 0


async def test_a_lost_reserve_answer_costs_a_hole_not_a_duplicate(config: LogConfig) -> None:
    async with faulty_log(config) as (log, _, table):
        table.lost_reserve_answers = 1
        d = delete("a")
        assert await log.append(d) == 2
        assert table.reserved == [1, 2]
        status = await log.status()
        assert (status.head, status.entries, status.holes) == (2, 1, [1])
        assert [seq async for seq, _ in log.read(after=1)] == [2]


# -- seals and foreign entries ---------------------------------------------


async def _seal(log: DeltaLog, seq: int, reason: str = "test seal") -> None:
    seal = Seal(sealed_by="test", reason=reason)
    assert await log.store.put_if_absent(log.keys.entry(seq), Frame(seal_body(seal)).at(seq))


async def test_an_append_that_finds_a_seal_reserves_again(log: DeltaLog) -> None:
    await _seal(log, 1)  # a compactor sealed seq 1 before the counter got there
    d = delete("a")
    assert await log.append(d) == 2
    entries = await read_all(log)
    assert seal_of(entries[0][1]).reason == "test seal"
    assert [seq for seq, _ in entries] == [1, 2]
    assert [x.delta_id for x in batch_of(entries[1][1]).deltas] == [d.delta_id]


async def test_a_sealed_hole_is_read_as_a_seal(log: DeltaLog) -> None:
    assert await log.table.reserve(log.keys.log_id) == 1  # a producer died here
    assert await log.append(delete("a")) == 2
    await _seal(log, 1)
    entries = await read_all(log)
    assert [(seq, e.is_seal) for seq, e in entries] == [(1, True), (2, False)]
    assert (await log.status()).hole_count == 0


async def test_another_producers_entry_at_our_seq_reserves_again(
    log: DeltaLog, caplog: pytest.LogCaptureFixture
) -> None:
    """Only possible after a counter reset: loud, and never an overwrite."""
    other = Frame(batch_body("other", [encode_delta(delete("x"))], created_at=0)).at(1)
    assert await log.store.put_if_absent(log.keys.entry(1), other)
    with caplog.at_level(logging.ERROR, logger="deltalog.append"):
        assert await log.append(delete("a")) == 2
    assert "was the counter reset?" in caplog.text
    assert batch_of((await read_all(log))[0][1]).entry_id == "other"


async def test_an_undecodable_object_at_our_seq_reserves_again(log: DeltaLog) -> None:
    assert await log.store.put_if_absent(log.keys.entry(1), b"not an entry")
    assert await log.append(delete("a")) == 2


# -- idempotency keys ------------------------------------------------------


async def test_a_repeated_key_returns_the_original_seq_and_writes_nothing(
    log: DeltaLog, rng: np.random.Generator
) -> None:
    first = delta(rng, "a", idempotency_key="receipt-1")
    written = await log.append(first)
    assert written == 1 and not isinstance(written, Repeat)
    assert await log.append(delete("b")) == 2
    again = delta(rng, "a", idempotency_key="receipt-1")
    repeated = await log.append(again)
    assert repeated == 1 and isinstance(repeated, Repeat), repeated
    assert await log.head() == 2
    seen = await delta_seqs(log)
    assert again.delta_id not in seen and seen[first.delta_id] == [1] and len(seen) == 2
    assert log.statistics().duplicates_skipped == 1


async def test_a_key_survives_a_new_handle(config: LogConfig) -> None:
    """A producer that crashed and restarted repeats its call on a new handle."""
    async with DeltaLog.open(config) as first:
        assert await first.append(delete("a", key="k")) == 1
    async with DeltaLog.open(config) as second:
        assert await second.append(delete("a", key="k")) == Repeat(1)
        async with second.producer() as producer:
            assert isinstance(await producer.submit(delete("a", key="k")), Repeat)
        assert await second.head() == 1


async def test_one_key_twice_in_one_batch_is_written_once(log: DeltaLog) -> None:
    first, second = delete("a", key="k"), delete("b", key="k")
    async with (
        log.producer(linger_ms=10_000, max_deltas=2) as producer,
        anyio.create_task_group() as tg,
    ):
        got: list[int] = []

        async def submit(d: Delta) -> None:
            got.append(await producer.submit(d))

        tg.start_soon(submit, first)
        tg.start_soon(submit, second)
    assert got == [1, 1]
    assert sorted(isinstance(seq, Repeat) for seq in got) == [False, True]  # one wrote it
    assert await log.head() == 1
    assert list(await delta_seqs(log)) == [first.delta_id]
    assert producer.statistics().entries_written == 1


async def test_one_key_submitted_concurrently_into_separate_entries(log: DeltaLog) -> None:
    deltas = [delete(f"x{n}", key="k") for n in range(6)]
    got: list[int] = []

    async def submit(d: Delta) -> None:
        got.append(await producer.submit(d))

    async with log.producer(linger_ms=0, max_deltas=1) as producer, anyio.create_task_group() as tg:
        for d in deltas:
            tg.start_soon(submit, d)
    assert got == [1] * len(deltas)
    assert sum(not isinstance(seq, Repeat) for seq in got) == 1
    assert await log.head() == 1
    assert len(await delta_seqs(log)) == 1


async def test_keys_of_plain_appends_racing(log: DeltaLog) -> None:
    got: list[int] = []

    async def append(n: int) -> None:
        got.append(await log.append(delete(f"x{n}", key="same")))

    async with anyio.create_task_group() as tg:
        for n in range(5):
            tg.start_soon(append, n)
    assert got == [1] * 5
    assert sum(not isinstance(seq, Repeat) for seq in got) == 1
    assert await log.head() == 1
    assert len(await delta_seqs(log)) == 1


async def test_a_key_held_by_an_unwritten_seq_is_a_conflict(log: DeltaLog) -> None:
    seq = await log.table.reserve(log.keys.log_id)
    assert await log.table.claim_keys(log.keys.log_id, [Claim("k", seq, "elsewhere")]) == {}
    with pytest.raises(Conflict, match="has not been written yet") as caught:
        await log.append(delete("a", key="k"))
    assert (caught.value.seq, caught.value.log) == (seq, log.config.log)
    assert await log.head() == 1
    assert await read_all(log) == []


@asynccontextmanager
async def _two_logs(
    adapters: str, config: LogConfig
) -> AsyncIterator[tuple[tuple[DeltaLog, FaultyStore], tuple[DeltaLog, FaultyTable]]]:
    """Two handles of one log, each through its own fault wrappers (on moto: own clients)."""
    async with AsyncExitStack() as stack:
        if adapters == "moto":
            a, a_store, _ = await stack.enter_async_context(faulty_log(config))
            b, _, b_table = await stack.enter_async_context(faulty_log(config))
        else:
            config = LogConfig(bucket="memory", table="memory", log="mem")
            store, table = MemoryStore(), MemoryTable()
            a, a_store, _ = await stack.enter_async_context(faulty_memory_log(config, store, table))
            b, _, b_table = await stack.enter_async_context(faulty_memory_log(config, store, table))
        yield (a, a_store), (b, b_table)


@pytest.mark.parametrize("adapters", ["memory", "moto"])
async def test_a_batch_whose_every_key_is_held_in_flight_seals_its_seq(
    adapters: str, config: LogConfig
) -> None:
    """Issue 19 item 10: concurrent ingests of the same receipts left entries with no delta.

    Producer B checks its two keys (free), then reserves; producer A claims
    both at its own seq and is still writing when B claims them: B loses
    both keys. B's seq used to receive a batch of zero deltas; now B seals it.
    """
    async with _two_logs(adapters, config) as ((a, a_store), (b, b_table)):
        a_store.hang_puts = "before"  # A has reserved and claimed, and is writing
        b_table.hold_reserves = a_store.hung  # B reserves once A is there
        answers: dict[str, object] = {}
        entries: dict[str, int] = {}

        async def submit_both(log: DeltaLog, name: str) -> None:
            async def submit(d: Delta) -> None:
                try:
                    answers[f"{name}:{d.idempotency_key}"] = await producer.submit(d)
                except Conflict as exc:
                    answers[f"{name}:{d.idempotency_key}"] = exc

            deltas = [delete(f"{name}-x", key="k1"), delete(f"{name}-y", key="k2")]
            async with (
                log.producer(linger_ms=10_000, max_deltas=2) as producer,
                anyio.create_task_group() as submitters,
            ):
                for d in deltas:
                    submitters.start_soon(submit, d)
            entries[name] = producer.statistics().entries_written

        async with anyio.create_task_group() as tg:
            tg.start_soon(submit_both, b, "b")
            await b_table.reserving.wait()  # B read the claims before A claimed them
            tg.start_soon(submit_both, a, "a")
            with anyio.fail_after(30):
                while len(answers) < 2:  # noqa: ASYNC110 (answers come from the tasks)
                    await anyio.sleep(0.01)
            a_store.release.set()
        assert {k: type(v).__name__ for k, v in answers.items()} == {
            "a:k1": "int",
            "a:k2": "int",
            "b:k1": "Conflict",
            "b:k2": "Conflict",
        }
        assert entries == {"a": 1, "b": 0}
        stored = await read_all(a)
        assert [seq for seq, _ in stored] == [1, 2]
        assert [len(e.deltas) for _, e in stored] == [2, 0]
        assert seal_of(stored[1][1]).reason.startswith("reserved by an append whose every delta")
        status = await a.status()
        assert (status.head, status.entries, status.hole_count) == (2, 2, 0)


async def test_a_key_left_unwritten_past_the_grace_is_sealed_and_written_again(
    log: DeltaLog,
) -> None:
    """Issue 19 item 3: a rerun after an interrupted producer meets its own keys at
    seqs reserved and never written; past the grace it seals them itself."""
    seq = await log.table.reserve(log.keys.log_id)
    stopped = Claim("k", seq, "stopped-producer", time.time() - 120)  # grace: 60 s
    await log.table.claim_keys(log.keys.log_id, [stopped])
    d = delete("a", key="k")
    assert await log.append(d) == 2
    entries = await read_all(log)
    assert seal_of(entries[0][1]).reason.startswith(
        "seq reserved for idempotency key 'k' and not written for 120s (grace 60s)"
    )
    assert [x.delta_id for x in batch_of(entries[1][1]).deltas] == [d.delta_id]
    claim = (await log.table.get_claims(log.keys.log_id, ["k"]))["k"]
    assert (claim.seq, claim.entry_id) == (2, batch_of(entries[1][1]).entry_id)
    again = await log.append(delete("a", key="k"))
    assert again == 2 and isinstance(again, Repeat)
    assert (await log.status()).hole_count == 0


async def test_a_key_younger_than_the_grace_is_a_conflict_that_says_when_to_retry(
    log: DeltaLog,
) -> None:
    seq = await log.table.reserve(log.keys.log_id)
    live = Claim("k", seq, "slow-producer", time.time())
    await log.table.claim_keys(log.keys.log_id, [live])
    with pytest.raises(Conflict) as caught:
        await log.append(delete("a", key="k"))
    assert re.search(
        r"claimed \d+s ago\); if its producer died, retry after the grace period "
        r"\(60s, DELTALOG_GRACE\): this append then seals the seq itself",
        caught.value.message,
    )
    assert await log.head() == 1
    assert await read_all(log) == []


async def test_a_late_write_beats_the_seal_of_its_key(config: LogConfig) -> None:
    """The stopped producer's write lands just before the seal: the seal loses (412)
    and the append resolves to the late entry, writing nothing."""
    async with faulty_log(config, grace=0.0) as (log, store, _):
        seq = await log.table.reserve(log.keys.log_id)
        original = delete("a", key="k")
        late = Frame(batch_body("slow", [encode_delta(original)], created_at=0)).at(seq)
        await log.table.claim_keys(log.keys.log_id, [Claim("k", seq, "slow", time.time())])
        store.before_put[log.keys.entry(seq)] = late
        again = await log.append(delete("a", key="k"))
        assert again == seq and isinstance(again, Repeat)
        assert store.before_put == {}, "the seal was tried"
        assert await delta_seqs(log) == {original.delta_id: [seq]}
        assert await log.head() == 1


async def test_a_claim_pointing_at_a_sealed_seq_is_taken_over(log: DeltaLog) -> None:
    seq = await log.table.reserve(log.keys.log_id)
    await log.table.claim_keys(log.keys.log_id, [Claim("k", seq, "dead-producer")])
    await _seal(log, seq, "producer died")
    d = delete("a", key="k")
    assert await log.append(d) == 2
    claim = (await log.table.get_claims(log.keys.log_id, ["k"]))["k"]
    assert claim.seq == 2 and claim.entry_id == batch_of((await read_all(log))[1][1]).entry_id
    assert await log.append(delete("b", key="k")) == 2
    assert await log.head() == 2


async def test_a_claim_moves_with_its_entry_past_a_seal(log: DeltaLog) -> None:
    await _seal(log, 1)
    assert await log.append(delete("a", key="k")) == 2
    claim = (await log.table.get_claims(log.keys.log_id, ["k"]))["k"]
    assert claim.seq == 2
    assert await log.append(delete("a", key="k")) == 2
    assert await log.head() == 2


async def test_a_lost_answer_while_moving_a_claim_is_not_a_conflict(config: LogConfig) -> None:
    async with faulty_log(config) as (log, _, table):
        await _seal(log, 1)
        table.lost_replace_answers = 1
        d = delete("a", key="k")
        assert await log.append(d) == 2
        assert table.lost_replace_answers == 0
        assert (await log.table.get_claims(log.keys.log_id, ["k"]))["k"].seq == 2
        assert await delta_seqs(log) == {d.delta_id: [2]}
        assert await log.append(delete("a", key="k")) == 2


async def test_keys_in_a_batch_with_known_and_new_keys(log: DeltaLog) -> None:
    assert await log.append(delete("a", key="old")) == 1
    old_again, new, plain = delete("a", key="old"), delete("b", key="new"), delete("c")
    got: dict[str, int] = {}

    async def submit(d: Delta) -> None:
        got[d.delta_id] = await producer.submit(d)

    async with (
        log.producer(linger_ms=10_000, max_deltas=3) as producer,
        anyio.create_task_group() as tg,
    ):
        for d in (old_again, new, plain):
            tg.start_soon(submit, d)
    assert got == {old_again.delta_id: 1, new.delta_id: 2, plain.delta_id: 2}
    assert [d.delta_id for d in batch_of((await read_all(log))[1][1]).deltas] == [
        new.delta_id,
        plain.delta_id,
    ]
    assert isinstance((await read_all(log))[0][1], Batch)


async def test_a_counter_that_keeps_failing_gives_up_leaving_only_holes(
    config: LogConfig,
) -> None:
    async with faulty_log(config, append_attempts=3) as (log, store, table):
        table.lost_reserve_answers = 3
        with pytest.raises(Unavailable, match="append failed after 3 attempts") as caught:
            await log.append(delete("a"))
        assert isinstance(caught.value.__cause__, Unavailable)
        assert store.puts == []
        status = await log.status()
        assert (status.head, status.entries, status.holes) == (3, 0, [1, 2, 3])


@pytest.mark.parametrize("missing", ["bucket", "table"])
async def test_a_missing_bucket_or_table_says_to_run_init(config: LogConfig, missing: str) -> None:
    """Opening the log says so, before anything is written (no seq is reserved)."""
    gone = f"gone-{uuid.uuid4().hex[:12]}"
    wrong = replace(config, bucket=gone) if missing == "bucket" else replace(config, table=gone)
    for _ in range(2):
        with pytest.raises(ConfigurationError, match=f"{missing} '{gone}' does not exist") as e:
            async with DeltaLog.open(wrong):
                pass
        assert "run `deltalog init --bucket" in str(e.value)
        assert not isinstance(e.value, IdentityMismatch), "a new log: nothing to mismatch"
    async with DeltaLog.open(config, read_only=True) as log:
        status = await log.status()
    assert (status.head, status.identity) == (0, None), "nothing was written"
