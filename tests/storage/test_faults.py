"""The fault proxy, and the log and the compactor behind it.

Every request here goes over the wire through ``deltalog.faults.FaultProxy``
to moto's server: botocore's retries (standard mode: 3 retries, 4 attempts)
run under deltalog's own, exactly as against AWS.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from compactor import Compactor
from deltalog import Conflict, Delta, DeltaLog, LogConfig, Producer, Unavailable, Upsert
from deltalog.codec import decode_entry
from deltalog.entry import Entry, Seal
from deltalog.read import list_entries
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.faults import AMBIGUOUS, REFUSALS, Fault, FaultPolicy, FaultProxy, Request
from deltalog.storage.s3 import S3Store
from deltalog.storage.store import ObjectStore, StoredObject
from tests.builders import delta
from tests.compaction import assert_states_equal, committed_state, reference
from tests.oracle import oracle_state


@pytest.fixture
async def proxy(initialized: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(initialized) as running:
        yield running


@pytest.fixture
def faulty(config: LogConfig, proxy: FaultProxy) -> LogConfig:
    """The test's log, reached through the proxy."""
    return replace(config, endpoint_url=proxy.url)


BOTOCORE_ATTEMPTS = 4
"""``retries={"max_attempts": 3}`` is three retries after the first attempt."""


async def delta_seqs_across_holes(log: DeltaLog) -> dict[str, list[int]]:
    """Every delta_id in the log with the seqs holding it, reading past holes."""
    found: dict[str, list[int]] = {}
    async for seq, info in list_entries(log.store, log.keys, 0):
        stored = await log.store.get(info.key)
        assert stored is not None
        for d in decode_entry(stored.data, seq=seq, key=info.key).deltas:
            found.setdefault(d.delta_id, []).append(seq)
    return found


# -- the proxy itself ------------------------------------------------------------


async def test_operations_are_named_from_the_request(faulty: LogConfig, proxy: FaultProxy) -> None:
    async with DeltaLog.open(faulty) as log:
        await log.append(Delta(ops=[Upsert("words", ["a"], np.zeros((1, 8), np.float32))]))
        [_ async for _ in log.read()]
    operations = proxy.statistics().operations
    for name in ("UpdateItem", "GetItem", "PutObject", "GetObject", "ListObjectsV2"):
        assert operations.get(name, 0) >= 1, (name, operations)
    assert proxy.statistics().faults == {}


async def test_refusals_change_nothing_and_botocore_retries_them(
    faulty: LogConfig, proxy: FaultProxy
) -> None:
    table = await DynamoTable.connect(faulty)
    try:
        for expected, kind in enumerate(REFUSALS, start=1):
            proxy.script(kind, operation="UpdateItem")  # botocore's retry passes
            assert await table.reserve(faulty.keys.log_id) == expected
        proxy.script(Fault.THROTTLE, operation="UpdateItem", times=BOTOCORE_ATTEMPTS)
        with pytest.raises(Unavailable, match="ProvisionedThroughputExceeded"):
            await table.reserve(faulty.keys.log_id)
        assert await table.read_head(faulty.keys.log_id) == 4, "a refusal changes nothing"
    finally:
        await table.aclose()
    stats = proxy.statistics()
    assert stats.faults == {"throttle": 5, "internal-error": 1, "unavailable": 1, "reset": 1}
    assert stats.by_service == {"dynamodb": 8}


async def test_dropped_answers_took_effect(faulty: LogConfig, proxy: FaultProxy) -> None:
    table = await DynamoTable.connect(faulty)
    try:
        proxy.script(Fault.DROP, operation="UpdateItem", times=BOTOCORE_ATTEMPTS)
        with pytest.raises(Unavailable) as raised:
            await table.reserve(faulty.keys.log_id)
        assert raised.value.ambiguous
        head = await table.read_head(faulty.keys.log_id)
        assert head == BOTOCORE_ATTEMPTS, "each dropped attempt counted"
    finally:
        await table.aclose()


async def test_a_truncated_answer_is_never_taken_for_data(
    faulty: LogConfig, proxy: FaultProxy
) -> None:
    """botocore cannot retry a streamed body cut short; the store reads it again."""
    store = await S3Store.connect(faulty)
    try:
        data = bytes(range(256)) * 64
        assert await store.put_if_absent("truncated/object", data)
        proxy.script(Fault.TRUNCATE, operation="GetObject", times=2)
        got = await store.get("truncated/object")
        assert got is not None and got.data == data
        proxy.script(Fault.TRUNCATE, operation="GetObject", times=3)
        with pytest.raises(Unavailable):
            await store.get("truncated/object")
    finally:
        await store.aclose()
    assert proxy.statistics().faults == {"truncate": 5}


def test_policy_is_seeded() -> None:
    """The same seed and the same requests give the same faults."""
    request = Request("s3", "PutObject", "PUT", "/b/k", "", {}, b"")

    def draws(seed: int) -> list[tuple[Fault, float] | None]:
        proxy = FaultProxy(
            "http://127.0.0.1:9", policy=FaultPolicy(rate=0.3, delay_rate=0.2), seed=seed
        )
        assert proxy.policy is not None
        return [proxy.policy.choose(request, proxy.rng) for _ in range(200)]

    first = draws(7)
    assert first == draws(7) != draws(8)
    kinds = {choice[0] for choice in first if choice is not None}
    assert kinds == {*REFUSALS, *AMBIGUOUS, Fault.DELAY}


# -- appends: each fault kind, where it hurts most -------------------------------


APPEND_FAULTS = [
    # (fault, operation, times): BOTOCORE_ATTEMPTS in a row reach deltalog itself
    (Fault.DROP, "PutObject", 1),
    (Fault.DROP, "PutObject", BOTOCORE_ATTEMPTS),
    (Fault.TRUNCATE, "PutObject", 1),
    (Fault.RESET, "PutObject", 1),
    (Fault.THROTTLE, "PutObject", BOTOCORE_ATTEMPTS),
    (Fault.DELAY, "PutObject", 1),
    (Fault.DROP, "UpdateItem", BOTOCORE_ATTEMPTS),
    (Fault.TRUNCATE, "UpdateItem", 1),
    (Fault.DROP, "GetObject", BOTOCORE_ATTEMPTS),
]


@pytest.mark.parametrize(("kind", "operation", "times"), APPEND_FAULTS)
async def test_an_append_lands_exactly_once_whatever_the_fault(
    kind: Fault,
    operation: str,
    times: int,
    faulty: LogConfig,
    proxy: FaultProxy,
    rng: np.random.Generator,
) -> None:
    async with DeltaLog.open(faulty) as log:
        first = await log.append(delta(rng, "first"))
        proxy.script(kind, operation=operation, times=times, delay=0.2)
        if operation == "GetObject":  # a read-back happens after an ambiguous put
            proxy.script(Fault.DROP, operation="PutObject", times=BOTOCORE_ATTEMPTS)
        d = delta(rng, "second")
        seq = await log.append(d)
        found = await delta_seqs_across_holes(log)
    assert found[d.delta_id] == [seq] and seq > first
    assert proxy.pending() == 0, "every scripted fault was injected"


async def test_an_append_that_fails_after_its_write_landed_says_it_may_have(
    faulty: LogConfig, config: LogConfig, proxy: FaultProxy, rng: np.random.Generator
) -> None:
    """The entry is written, every answer about it is lost: the caller must be told."""
    async with DeltaLog.open(replace(faulty, append_attempts=2)) as log:
        proxy.script(Fault.DROP, operation="PutObject", times=BOTOCORE_ATTEMPTS)
        # Reading it back fails too: the store reads a cut body 3 times, twice.
        proxy.script(Fault.TRUNCATE, operation="GetObject", times=6)
        d = delta(rng, "landed")
        with pytest.raises(Unavailable) as raised:
            await log.append(d)
        assert raised.value.ambiguous, "a retry without an idempotency key may duplicate"
        assert proxy.pending() == 0
    async with DeltaLog.open(config) as direct:
        assert (await delta_seqs_across_holes(direct))[d.delta_id] == [1]


# -- the compactor: answers lost at each of its writes ---------------------------


LOST_ANSWERS = {
    "acquire": ("UpdateItem", lambda r: b"ADD #token" in r.body),
    "note a hole": ("UpdateItem", lambda r: b"hole_first_seen" in r.body),
    "seal": ("PutObject", lambda r: "/entries/" in r.path),
    "snapshot upload": ("PutObject", lambda r: "/snapshots/" in r.path),
    "commit": ("UpdateItem", lambda r: b"snapshot_key = :key" in r.body),
    "release": ("UpdateItem", lambda r: b"REMOVE #owner" in r.body),
}


@pytest.mark.parametrize("step", sorted(LOST_ANSWERS))
async def test_compaction_survives_a_lost_answer_at_each_write(
    step: str,
    faulty: LogConfig,
    config: LogConfig,
    proxy: FaultProxy,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    async with DeltaLog.open(config) as log:
        await log.append(delta(rng, "a"))
        await log.table.reserve(log.keys.log_id)  # a hole, sealed at once (grace 0)
        await log.append(delta(rng, "b"))
        operation, when = LOST_ANSWERS[step]
        proxy.script(Fault.DROP, operation=operation, when=when)
        async with Compactor(faulty, cache_dir=tmp_path, grace=0, lease_ttl=10) as compactor:
            result = await compactor.run_once()
            assert proxy.pending() == 0, f"the {step} answer was not dropped"
            head = await log.head()
            assert (result.status, result.hwm_after, result.seals_written) == ("applied", head, 1)
            state = await log.table.read_state(log.keys.log_id)
            assert (state.hwm, state.snapshot_key) == (head, result.snapshot_key)
            await log.append(delta(rng, "c"))
            again = await compactor.run_once()
            assert again.status == "applied", f"after a lost {step} answer: {again}"
            assert_states_equal(await committed_state(compactor), await reference(log))
            assert (await compactor.verify()).ok


# -- many producers under random faults -------------------------------------------

TASKS = 32
DELTAS_PER_TASK = 300
IN_FLIGHT_PER_TASK = 8
"""Each task keeps this many submissions waiting for their acks: a faulted request
costs an entry botocore's backoff (0.5 s on average), so strictly sequential
tasks would be bound by that latency, not by the protocol."""
KEYED_TASKS = {1, 3}
"""Tasks whose deltas carry idempotency keys (and may be retried): moto copies a
whole table for every item of a ``TransactWriteItems``, so keep claims few."""
FAULT_RATE = 0.10
AMBIGUOUS_SHARE = 0.5


@pytest.fixture
async def own_table(config: LogConfig) -> LogConfig:
    """The test's log in a table of its own (moto's transactions slow down as tables grow)."""
    own = replace(config, table=f"faults-{uuid.uuid4().hex[:12]}")
    table = await DynamoTable.connect(own)
    try:
        await table.ensure_table()
    finally:
        await table.aclose()
    return own


class RecordingStore:
    """An object store that keeps what was read: the compactor's read is the test's."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.read: dict[str, bytes] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get(self, key: str) -> StoredObject | None:
        stored = await self.inner.get(key)
        if stored is not None:
            self.read[key] = stored.data
        return stored

    def entries(self, log: DeltaLog) -> list[tuple[int, Entry]]:
        seqs = {key: log.keys.seq_of(key) for key in self.read}
        return sorted(
            (seq, decode_entry(self.read[key], seq=seq, key=key))
            for key, seq in seqs.items()
            if seq is not None
        )


class _Ledger:
    """What the producers were told: acknowledged seqs and failures, by delta_id."""

    def __init__(self) -> None:
        self.acked: dict[str, int] = {}
        self.failed: dict[str, BaseException] = {}
        self.maybe_written: set[str] = set()
        """Failed with an ambiguous error at least once."""
        self.retried = 0

    def check(self, entries: list[tuple[int, Entry]]) -> None:
        found: dict[str, list[int]] = {}
        for seq, entry in entries:
            for d in entry.deltas:
                found.setdefault(d.delta_id, []).append(seq)
        for delta_id, seq in self.acked.items():
            assert found.get(delta_id) == [seq], f"acknowledged {delta_id} at {seq}: {found}"
        for delta_id in self.failed:
            assert len(found.get(delta_id, [])) <= 1, f"unacknowledged {delta_id} duplicated"
            assert delta_id not in found or delta_id in self.maybe_written, (
                f"{delta_id} is in the log, but its producer was told it was not written: "
                f"{self.failed[delta_id]!r}"
            )
        unknown = set(found) - set(self.acked) - set(self.failed)
        assert not unknown, f"deltas nobody submitted: {sorted(unknown)[:5]}"


def _delta(task: int, i: int, rng: np.random.Generator) -> Delta:
    name = f"t{task}-{i}"
    return Delta(
        ops=[
            Upsert(
                collection="faults",
                ids=[name],
                embeddings=rng.standard_normal((1, 8), dtype=np.float32),
                documents=[name],
                metadatas=[{"task": task, "i": i, "x": round(float(rng.random()), 3)}],
            )
        ],
        idempotency_key=name if task in KEYED_TASKS else None,
    )


async def _produce(
    task: int, producer: Producer, ledger: _Ledger, rng: np.random.Generator
) -> None:
    """Submit the task's deltas, ``IN_FLIGHT_PER_TASK`` at a time."""
    window = anyio.Semaphore(IN_FLIGHT_PER_TASK)
    async with anyio.create_task_group() as tg:
        for i in range(DELTAS_PER_TASK):
            await window.acquire()
            tg.start_soon(_submit, task, _delta(task, i, rng), producer, ledger, window)


async def _submit(
    task: int, d: Delta, producer: Producer, ledger: _Ledger, window: anyio.Semaphore
) -> None:
    keyed = task in KEYED_TASKS
    try:
        for attempt in range(2 if keyed else 1):  # only a keyed delta may be retried
            try:
                ledger.acked[d.delta_id] = await producer.submit(d)
                ledger.failed.pop(d.delta_id, None)
                break
            except (Unavailable, Conflict) as exc:
                ledger.failed[d.delta_id] = exc
                if isinstance(exc, Unavailable) and exc.ambiguous:
                    ledger.maybe_written.add(d.delta_id)
                ledger.retried += attempt == 0 and keyed
    finally:
        window.release()


async def test_producers_under_faults_lose_nothing_and_duplicate_nothing(
    own_table: LogConfig, proxy: FaultProxy, rng: np.random.Generator, tmp_path: Path
) -> None:
    """32 tasks in two producer handles, 10% of requests faulted, half of them ambiguously."""
    seed = int(rng.integers(2**32))
    proxy.rng.seed(seed)
    proxy.policy = FaultPolicy(rate=FAULT_RATE, ambiguous=AMBIGUOUS_SHARE)
    faulty = replace(own_table, endpoint_url=proxy.url)
    ledger = _Ledger()
    started = time.monotonic()
    async with (
        DeltaLog.open(faulty) as one,
        DeltaLog.open(faulty) as two,
        one.producer(linger_ms=2, max_deltas=16) as first,
        two.producer(linger_ms=2, max_deltas=16) as second,
        anyio.create_task_group() as tg,
    ):
        for task in range(TASKS):
            tg.start_soon(_produce, task, (first, second)[task % 2], ledger, rng)
    produced = time.monotonic() - started
    proxy.policy = None
    stats = proxy.statistics()

    async with AsyncExitStack() as stack:
        log = await stack.enter_async_context(DeltaLog.open(own_table))
        store = RecordingStore(log.store)
        compactor = await stack.enter_async_context(
            Compactor(own_table, cache_dir=tmp_path, grace=0, lease_ttl=10, store=store)
        )
        result = await compactor.run_once()  # seals every hole (grace 0)
        head = await log.head()
        assert result.hwm_after == head, result
        listed = [seq async for seq, _ in list_entries(log.store, log.keys, 0)]
        assert listed == list(range(1, head + 1)), "dense once sealed"
        entries = store.entries(log)
        assert [seq for seq, _ in entries] == listed
        ledger.check(entries)
        want = {c: dict(r) for c, r in oracle_state(entries).items() if r}
        assert_states_equal(await committed_state(compactor), want)
    seals = sum(isinstance(e, Seal) for _, e in entries)
    print(
        f"seed {seed}: {len(ledger.acked)} acknowledged, {len(ledger.failed)} failed "
        f"({ledger.retried} keyed retries); {head - seals} entries + {seals} seals in "
        f"{produced:.1f}s; {stats.requests} requests, faults {stats.faults}, "
        f"by service {stats.by_service}"
    )
    assert len(ledger.acked) + len(ledger.failed) == TASKS * DELTAS_PER_TASK
    assert len(ledger.acked) >= 0.99 * TASKS * DELTAS_PER_TASK
    assert stats.injected >= 0.06 * stats.requests, "about 10% of requests are faulted"
    assert stats.ambiguous >= 0.3 * stats.injected
    assert min(stats.by_service.get("s3", 0), stats.by_service.get("dynamodb", 0)) >= 20
    assert stats.by_operation.get("TransactWriteItems", 0) >= 1
