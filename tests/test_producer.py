"""Group commit: batching limits, backpressure, failure delivery, closing."""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Literal

import anyio
import numpy as np
import pytest

from deltalog import (
    Closed,
    Delta,
    DeltaLog,
    DeltalogError,
    LogConfig,
    Unavailable,
    ValidationError,
)
from deltalog.codec import encode_delta
from deltalog.producer import SETTLE_SECONDS, Producer
from tests.builders import batch_of, delete, delta, delta_seqs, read_all
from tests.faulty import faulty_log


async def _submit_all(deltas: list[Delta], log: DeltaLog, **limits: Any) -> dict[str, int]:
    """Submit every delta from its own task through one producer; return the seqs."""
    got: dict[str, int] = {}
    async with log.producer(**limits) as producer:

        async def submit(d: Delta) -> None:
            got[d.delta_id] = await producer.submit(d)

        async with anyio.create_task_group() as tg:
            for d in deltas:
                tg.start_soon(submit, d)
    return got


async def test_max_deltas_bounds_an_entry(log: DeltaLog) -> None:
    deltas = [delete(f"x{n}") for n in range(100)]
    got = await _submit_all(deltas, log, linger_ms=50, max_deltas=10)
    entries = await read_all(log)
    assert len(entries) >= 10
    assert all(len(batch_of(e).deltas) <= 10 for _, e in entries)
    assert {d: s[0] for d, s in (await delta_seqs(log)).items()} == got


async def test_max_deltas_ends_the_linger_early(memory_log: DeltaLog) -> None:
    deltas = [delete(f"x{n}") for n in range(5)]
    with anyio.fail_after(5):  # the linger is 100 s
        got = await _submit_all(deltas, memory_log, linger_ms=100_000, max_deltas=5)
    assert set(got.values()) == {1}


async def test_linger_waits_for_company(memory_log: DeltaLog) -> None:
    async with memory_log.producer(linger_ms=100) as producer:
        start = anyio.current_time()
        assert await producer.submit(delete("a")) == 1
        waited = anyio.current_time() - start
    assert waited >= 0.09
    seqs: list[int] = []
    with anyio.fail_after(10):  # the linger is 100 s: the second delta ends it
        async with memory_log.producer(linger_ms=100_000, max_deltas=2) as producer:

            async def submit(d: Delta) -> None:
                seqs.append(await producer.submit(d))

            async with anyio.create_task_group() as tg:
                tg.start_soon(submit, delete("b"))
                await anyio.wait_all_tasks_blocked()  # b is gathered, lingering
                assert (producer.statistics().in_flight, seqs) == (0, [])
                tg.start_soon(submit, delete("c"))
    assert seqs == [2, 2], "b waited for c and they shared an entry"


async def test_max_bytes_bounds_an_entry(memory_log: DeltaLog, rng: np.random.Generator) -> None:
    deltas = [delta(rng, f"d{n}", rows=4) for n in range(9)]
    size = max(len(encode_delta(d)) for d in deltas)
    got = await _submit_all(deltas, memory_log, linger_ms=100, max_bytes=int(size * 2.5))
    entries = await read_all(memory_log)
    assert max(len(batch_of(e).deltas) for _, e in entries) == 2
    assert len(entries) >= 5
    assert sorted(set(got.values())) == [seq for seq, _ in entries]


async def test_a_delta_bigger_than_max_bytes_gets_an_entry_of_its_own(
    memory_log: DeltaLog, rng: np.random.Generator
) -> None:
    big = delta(rng, "big", rows=50)
    small = [delete(f"s{n}") for n in range(3)]
    got = await _submit_all([big, *small], memory_log, linger_ms=50, max_bytes=200)
    assert list(got.values()).count(got[big.delta_id]) == 1


async def test_backpressure_with_a_tiny_queue_still_completes(config: LogConfig) -> None:
    """With the one writer held, the queue fills to max_pending and stays there:
    the other submitters wait in submit(); released, every delta is written."""
    deltas = [delete(f"x{n}") for n in range(10)]
    async with faulty_log(config) as (log, store, _):
        store.hang_puts = "before"
        limits = {"linger_ms": 0, "max_pending": 2, "max_deltas": 1, "max_in_flight": 1}
        with anyio.fail_after(60):
            async with log.producer(**limits) as producer, anyio.create_task_group() as tg:
                for d in deltas:
                    tg.start_soon(producer.submit, d)
                await store.hung.wait()  # one entry in flight, held before its put
                await anyio.wait_all_tasks_blocked()
                stats = producer.statistics()
                # one in flight, one gathered and waiting for a slot, two queued
                assert (stats.in_flight, stats.queued, stats.deltas_acknowledged) == (1, 2, 0)
                store.release.set()
        assert len(await delta_seqs(log)) == 10
        assert (await log.status()).hole_count == 0


async def test_a_failed_entry_fails_every_submitter_with_the_cause(config: LogConfig) -> None:
    async with faulty_log(config, append_attempts=2) as (log, store, _):
        store.refuse_puts = True
        failures: list[Unavailable] = []
        async with log.producer(linger_ms=100, max_deltas=5) as producer:

            async def submit(d: Delta) -> None:
                with pytest.raises(Unavailable) as caught:
                    await producer.submit(d)
                failures.append(caught.value)

            async with anyio.create_task_group() as tg:
                for n in range(5):
                    tg.start_soon(submit, delete(f"x{n}"))
            assert len(failures) == 5
            for failure in failures:
                assert failure.__cause__ in store.faults
                assert "injected: put refused" in str(failure)
                assert failure.seq == 1 and failure.key == log.keys.entry(1)
            stats = producer.statistics()
            assert (stats.deltas_failed, stats.deltas_acknowledged, stats.entries_written) == (
                5,
                0,
                0,
            )
            # The producer is still usable once the store recovers.
            store.refuse_puts = False
            assert await producer.submit(delete("after")) == 2
        assert (await log.status()).holes == [1]


async def test_closing_flushes_what_was_submitted(memory_log: DeltaLog) -> None:
    n = 50
    got: dict[str, int] = {}
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):  # the linger is 100 s: closing must not wait for it
            async with memory_log.producer(linger_ms=100_000) as producer:

                async def submit(d: Delta) -> None:
                    got[d.delta_id] = await producer.submit(d)

                for i in range(n):
                    tg.start_soon(submit, delete(f"x{i}"))
                await anyio.wait_all_tasks_blocked()  # every submitter is inside submit()
    assert len(got) == n
    assert {d: s[0] for d, s in (await delta_seqs(memory_log)).items()} == got


async def test_closing_flushes_submitters_waiting_for_queue_space(log: DeltaLog) -> None:
    n = 20
    got: dict[str, int] = {}
    async with (
        anyio.create_task_group() as tg,
        log.producer(linger_ms=100_000, max_pending=1, max_deltas=4) as producer,
    ):

        async def submit(d: Delta) -> None:
            got[d.delta_id] = await producer.submit(d)

        for i in range(n):
            tg.start_soon(submit, delete(f"x{i}"))
        await anyio.wait_all_tasks_blocked()
    assert len(got) == n
    assert {d: s[0] for d, s in (await delta_seqs(log)).items()} == got


async def test_submit_after_close_raises_closed(memory_log: DeltaLog) -> None:
    producer = memory_log.producer()
    with pytest.raises(Closed, match="never entered"):
        await producer.submit(delete("a"))
    async with producer:
        assert await producer.submit(delete("a")) == 1
    with pytest.raises(Closed):
        await producer.submit(delete("b"))
    with pytest.raises(Closed, match="entered once"):
        async with producer:
            pass
    assert await memory_log.head() == 1


async def test_a_closed_log_refuses_producers(config: LogConfig) -> None:
    async with DeltaLog.open(config) as log:
        pass
    with pytest.raises(Closed):
        log.producer()
    with pytest.raises(Closed):
        await log.append(delete("a"))


@pytest.mark.parametrize(
    "limits",
    [
        {"linger_ms": -1},
        {"max_bytes": 0},
        {"max_deltas": 0},
        {"max_pending": 0},
        {"max_in_flight": 0},
    ],
)
def test_limits_must_be_positive(memory_log: DeltaLog, limits: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="positive"):
        memory_log.producer(**limits)


async def test_validation_errors_raise_in_the_submitter_and_queue_nothing(
    memory_log: DeltaLog, rng: np.random.Generator
) -> None:
    async with memory_log.producer(linger_ms=1) as producer:
        with pytest.raises(ValidationError) as caught:
            await producer.submit(Delta(ops=[]))
        assert caught.value.field == "ops"
        await producer.submit(delta(rng, "a", dim=8))
        with pytest.raises(ValidationError) as caught:
            await producer.submit(delta(rng, "b", dim=4))
        assert caught.value.field == "collection 'words'"
        stats = producer.statistics()
        assert (stats.deltas_submitted, stats.queued, stats.deltas_acknowledged) == (1, 0, 1)
    assert len(await read_all(memory_log)) == 1


async def test_statistics(log: DeltaLog) -> None:
    deltas = [delete(f"x{n}") for n in range(30)]
    async with log.producer(linger_ms=20, max_deltas=10) as producer:
        idle = producer.statistics()
        assert (idle.deltas_submitted, idle.queued, idle.in_flight, idle.deltas_per_entry) == (
            0,
            0,
            0,
            0.0,
        )
        async with anyio.create_task_group() as tg:
            for d in deltas:
                tg.start_soon(producer.submit, d)
    stats = producer.statistics()
    entries = await read_all(log)
    assert (stats.deltas_submitted, stats.deltas_acknowledged, stats.deltas_failed) == (30, 30, 0)
    assert stats.entries_written == len(entries)
    assert stats.bytes_written == sum(len(encode_delta(d)) for d in deltas)
    assert (stats.queued, stats.in_flight) == (0, 0)
    assert stats.deltas_per_entry == 30 / len(entries)


# -- leaving the block with an exception or a cancellation ------------------------


class Boom(Exception):
    """The application's own failure inside the producer's block."""


async def _leave(how: str, scope: anyio.CancelScope) -> None:
    """Leave the producer's block the way ``how`` says."""
    if how == "exception":
        raise Boom
    scope.cancel()
    await anyio.sleep_forever()


async def _stop_mid_stream(
    log: DeltaLog, deltas: list[Delta], how: str, *, after_acks: int, **limits: Any
) -> dict[str, int | DeltalogError]:
    """Submitters outside the block; the block is left once ``after_acks`` deltas
    were acknowledged. Returns every answer; fails if one is still missing
    ``SETTLE_SECONDS + 20`` seconds after the block was left."""
    answers: dict[str, int | DeltalogError] = {}
    acknowledged, everyone = anyio.Event(), anyio.Event()

    async def submit(producer: Producer, d: Delta) -> None:
        try:
            answers[d.delta_id] = await producer.submit(d)
        except DeltalogError as exc:
            answers[d.delta_id] = exc
        if sum(isinstance(a, int) for a in answers.values()) >= after_acks:
            acknowledged.set()
        if len(answers) == len(deltas):
            everyone.set()

    async with anyio.create_task_group() as submitters:
        with anyio.CancelScope() as block, contextlib.suppress(Boom):
            async with log.producer(**limits) as producer:
                for d in deltas:
                    submitters.start_soon(submit, producer, d)
                await acknowledged.wait()
                with anyio.fail_after(SETTLE_SECONDS + 20):
                    await _leave(how, block)
        with anyio.fail_after(20):
            await everyone.wait()
    return answers


def _check_against_the_log(
    answers: dict[str, int | DeltalogError], in_log: dict[str, list[int]]
) -> Counter[str]:
    """Each answer is true of the log; returns how many of each kind."""
    kinds: Counter[str] = Counter()
    for delta_id, answer in answers.items():
        if isinstance(answer, int):
            assert in_log.get(delta_id) == [answer], delta_id
            kinds["seq"] += 1
        elif isinstance(answer, Closed):
            assert delta_id not in in_log, f"{delta_id} was told Closed but is in the log"
            kinds["closed"] += 1
        else:
            assert isinstance(answer, Unavailable) and answer.ambiguous, repr(answer)
            assert "idempotency key" in str(answer)
            kinds["unknown"] += 1
    assert set(in_log) <= set(answers)
    return kinds


@pytest.mark.parametrize("how", ["exception", "cancellation"])
async def test_leaving_the_block_early_answers_every_submitter_truthfully(
    log: DeltaLog, how: str
) -> None:
    """Issue 10, bug 3: 300 submitters outside the block, one delta per entry, one
    entry in flight, the block left once 5 are acknowledged. Every submitter is
    answered at once: its seq if durable, Closed only if its delta is not in the
    log, otherwise an ambiguous Unavailable (at most the one entry in flight)."""
    deltas = [delete(f"x{n}") for n in range(300)]
    answers = await _stop_mid_stream(
        log, deltas, how, after_acks=5, linger_ms=0, max_deltas=1, max_in_flight=1
    )
    kinds = _check_against_the_log(answers, await delta_seqs(log))
    assert len(answers) == 300
    assert kinds["seq"] >= 5 and kinds["unknown"] <= 1 and kinds["closed"] >= 290, kinds
    assert (await log.status()).hole_count <= 1, "at most the seq in flight is left a hole"


@pytest.mark.parametrize(
    ("hang", "landed"), [("after", True), ("before", False)], ids=["landed", "not-sent"]
)
async def test_a_write_cancelled_midway_is_settled_by_reading_it_back(
    config: LogConfig, hang: Literal["before", "after"], landed: bool
) -> None:
    """A put that landed before the cancellation is the delta's seq, never Closed;
    a put that may still be on its way is an unknown outcome, never Closed."""
    async with faulty_log(config) as (log, store, _):
        store.hang_puts = hang
        answers: dict[str, int | DeltalogError] = {}
        d = delete("x")

        async def submit(producer: Producer) -> None:
            try:
                answers["x"] = await producer.submit(d)
            except DeltalogError as exc:
                answers["x"] = exc

        with anyio.fail_after(SETTLE_SECONDS + 30):
            async with anyio.create_task_group() as tg:
                with contextlib.suppress(Boom):
                    async with log.producer(linger_ms=0) as producer:
                        tg.start_soon(submit, producer)
                        await store.hung.wait()
                        raise Boom
        store.hang_puts = None
        in_log = await delta_seqs(log)
    assert (
        _check_against_the_log({d.delta_id: answers["x"]}, in_log)["seq" if landed else "unknown"]
        == 1
    )
    assert (d.delta_id in in_log) is landed
