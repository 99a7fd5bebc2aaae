"""A stateful model test of the whole protocol against a reference model.

Hypothesis drives a ``RuleBasedStateMachine`` through random sequences of:

- **append**: a delta through ``DeltaLog.append``, sometimes with an
  idempotency key; **append again**: a new call with an acknowledged key
  (it must return the original seq and write nothing); **submit**: several
  deltas at once through a group-commit producer;
- **compact**: ``Compactor.run_once`` of one compactor kept open across
  steps, as ``compact --follow`` keeps it (**follow**: an append, then
  such a run) (its warm sink holds the live
  copy's Chroma index open between runs, while crashes, rebuilds and other
  compactors commit around it), under a random checkpoint policy
  (publish every run, at the default ratio, rarely), sometimes with a
  checkpoint requested. Whether it publishes, and why, is the README's
  policy modelled from its rules (``policy``: requested, first, the ratio
  of the tail's stored bytes to the checkpoint's, the caps) on the stored
  objects' own sizes, and a run that publishes nothing commits exactly the
  bytes of the entries after the checkpoint;
- **crash**: a compaction that dies at a random step (before or after
  applying to Chroma, while uploading a checkpoint, before or after the
  commit, while releasing the lease), followed by the lease's expiry (the
  table's lease clock moves past it: ``LeaseClockTable``; nothing sleeps);
- **rebuild**: ``Compactor.rebuild`` to a random seq, or to the end and
  published as the committed snapshot;
- **fresh read**: ``Reader.open(consistency="fresh")`` sees every
  acknowledged delta, compacted or not: ``get`` of every collection
  (ids, documents, metadata) and ``query`` with drawn vectors (the ids,
  documents and metadata of the nearest records, and their distances,
  which is how a reader shows vectors).

The **model** is the list of acknowledged deltas and their seqs; its state
at a seq is the test oracle (``tests.oracle``, written from the README's
rules, sharing no code with the fold) of those deltas, op by op.
Invariants after every step: the committed state (the checkpoint plus the
committed tail, as ``export`` writes it) equals the model at hwm (vectors
bit for bit, documents, metadata), and the checkpoint alone the model at
the seq it holds; hwm never decreases; every acknowledged delta is in the
log exactly once, at its seq, and nothing else is.

It runs twice: on the in-memory adapters (first-class, same contract as S3
and DynamoDB; 20 examples of 15 steps) and on ``S3Store`` + ``DynamoTable``
against moto's server over HTTP (4 of 12: each step costs requests). The
sizes keep it well inside the per-test timeout at load 4 on 2 cores; in CI
the examples are derandomized (``tests/conftest.py``), and
``pytest --hypothesis-profile explore`` searches with random seeds.
Sequences it once found are pinned as plain tests below. The
sink is real ChromaDB in both. Float metadata has few significant digits
(``CHROMA_EXACT_FLOATS``): Chroma changes the last bit of floats with 16-17
significant digits. Vectors are bounded so that query distances stay finite.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import numpy as np
import pytest
from hypothesis import currently_in_test_context, event, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from compactor import Compactor
from compactor.checkpoint import CheckpointPolicy
from deltalog import Batch, Delete, Delta, DeltaLog, LogConfig, Reader, Upsert
from deltalog.entry import MetadataValue
from deltalog.fold import State
from deltalog.keys import STATE_SK
from deltalog.snapshot.cache import SnapshotCache
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.s3 import S3Store
from deltalog.storage.store import MemoryStore, ObjectStore
from deltalog.storage.table import LogState, MemoryTable, Table
from deltalog.storage.transfer import Transferred, Upload
from tests.compaction import (
    Crash,
    FaultyTable,
    assert_states_equal,
    committed_state,
    faulty_sinks,
    sink_state,
)
from tests.conftest import BUCKET, TABLE, examples
from tests.oracle import oracle_state
from tests.reading import assert_get_matches, assert_query_matches
from tests.strategies import (
    CHROMA_EXACT_FLOATS,
    COLLECTIONS,
    DIM,
    KEYS,
    deletes,
    updates,
    upserts,
)

MEMORY = LogConfig(bucket="memory", table="memory", log="model")
CRASH_TTL = 60.0
"""The lease of a compaction that crashes. It expires on the table's clock, which the
model moves past it (``LeaseClockTable``): no test waits for it, and no heartbeat on a
loaded machine comes close to it."""
STEPS = ("apply-before", "apply-after", "upload", "before-commit", "after-commit", "release")
RATIOS = (0.0, 0.1, 1e9)
"""Checkpoint ratios: publish every run, the default, (almost) never."""
T = TypeVar("T")

values: st.SearchStrategy[MetadataValue] = st.one_of(
    st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), CHROMA_EXACT_FLOATS, st.booleans()
)
keys = st.sampled_from(KEYS)
vector_floats = st.floats(-100, 100, width=32)
ops = st.one_of(
    upserts(st.dictionaries(keys, values, min_size=1, max_size=3), elements=vector_floats),
    deletes(),
    updates(st.dictionaries(keys, st.none() | values, min_size=1, max_size=3)),
)
op_lists = st.lists(ops, min_size=1, max_size=3)
query_lists = st.lists(hnp.arrays(np.float32, DIM, elements=vector_floats), min_size=1, max_size=2)


def note(text: str) -> None:
    """Count a step for hypothesis's statistics (also when a plain test drives the model)."""
    if currently_in_test_context():
        event(text)


class LeaseClockTable(FaultyTable):
    """A table (``FaultyTable``) whose lease clock runs ``ahead`` seconds ahead.

    Every lease's time (``acquire`` and ``renew`` take ``now`` from the caller)
    is shifted alike, so a holder's lease lasts its ttl as before; moving
    ``ahead`` past a crashed holder's expiry is what waiting for it would do.
    """

    def __init__(self, inner: Table) -> None:
        super().__init__(inner)
        self.ahead = 0.0

    def now(self) -> float:
        return time.time() + self.ahead

    async def acquire(
        self, log_id: str, owner: str, *, ttl: float, now: float, sk: str = STATE_SK
    ) -> LogState:
        return await super().acquire(log_id, owner, ttl=ttl, now=now + self.ahead, sk=sk)

    async def renew(
        self, log_id: str, owner: str, token: int, *, ttl: float, now: float, sk: str = STATE_SK
    ) -> None:
        await self.inner.renew(log_id, owner, token, ttl=ttl, now=now + self.ahead, sk=sk)


class CrashingStore:
    """A store (memory or S3) whose next snapshot upload can die after streaming,
    before it writes."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.crash_upload = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @asynccontextmanager
    async def upload(self, key: str) -> AsyncIterator[Upload]:
        async with self.inner.upload(key) as upload:
            if self.crash_upload:
                self.crash_upload = False
                yield _CrashOnComplete(upload)
            else:
                yield upload


class _CrashOnComplete:
    def __init__(self, upload: Upload) -> None:
        self._upload = upload

    async def write(self, data: bytes) -> None:
        await self._upload.write(data)

    async def complete(self) -> Transferred:
        raise Crash("crash while uploading the snapshot")


class DeltaLogModel(RuleBasedStateMachine):
    """See the module docstring. ``endpoint``: moto's server, or None for memory."""

    keyed = Bundle("keyed")

    def __init__(self, endpoint: str | None = None) -> None:
        super().__init__()
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self.tmp = Path(tempfile.mkdtemp(prefix="deltalog-model-"))
        self.config = MEMORY
        self.store = CrashingStore(MemoryStore())
        self.table = LeaseClockTable(MemoryTable())
        if endpoint is not None:
            log = f"model-{uuid.uuid4().hex[:12]}"
            self.config = LogConfig(bucket=BUCKET, table=TABLE, log=log, endpoint_url=endpoint)
            self.store = CrashingStore(self.run(S3Store.connect, self.config))
            self.table = LeaseClockTable(self.run(DynamoTable.connect, self.config))
        self.log_id = self.config.keys.log_id
        self.log = self.run(DeltaLog.connect, self.config, store=self.store, table=self.table)
        self.acked: dict[str, tuple[int, Delta]] = {}
        """delta_id -> (seq, delta): every acknowledged delta."""
        self.hwm = 0
        self.checked: tuple[str | None, int] = (None, 0)
        self.next_key = 0
        self.kept = AsyncExitStack()
        self.follower: Compactor | None = None
        """The compactor the compact rule runs, kept open across steps."""

    def run(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        async def call() -> T:
            return await func(*args, **kwargs)

        return self.portal.call(call)

    def teardown(self) -> None:
        try:
            self.run(self.kept.aclose)
            self.run(self.log.aclose)
            self.run(self.store.inner.aclose)
            self.run(self.table.inner.aclose)
        finally:
            self._portal_cm.__exit__(None, None, None)
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the model ----------------------------------------------------------------

    def head(self) -> int:
        return max((seq for seq, _ in self.acked.values()), default=0)

    def model_at(self, seq: int) -> State:
        """The oracle's state of every acknowledged delta up to ``seq``, op by op.

        Within one entry (group commit) the deltas apply in the entry's
        order, which the log decides: the model takes that order from the
        log's delta ids, and the deltas themselves from its own records.
        """
        order = self.run(self.delta_order)
        entries = [
            (s, Batch("model", [self.acked[d][1] for d in order[s]]))
            for s in sorted(order)
            if s <= seq
        ]
        return oracle_state(entries)

    async def delta_order(self) -> dict[int, list[str]]:
        return {seq: [d.delta_id for d in entry.deltas] async for seq, entry in self.log.read()}

    def compactor(self, **options: Any) -> Compactor:
        return Compactor(
            self.config,
            cache_dir=self.tmp / "cache",
            store=self.store,
            table=self.table,
            grace=3600,
            **options,
        )

    def state(self) -> LogState:
        return self.run(self.table.read_state, self.log_id)

    def snapshot(self, key: str, sha256: str) -> State:
        async def read() -> State:
            cache = SnapshotCache(self.tmp / "check")
            path = await cache.committed(self.store, key, sha256, log=self.config.log)
            return await sink_state(path, cache.working_copy)

        return self.run(read)

    # -- rules --------------------------------------------------------------------

    def _ack(self, delta: Delta, seq: int) -> None:
        assert seq > 0 and delta.delta_id not in self.acked
        self.acked[delta.delta_id] = (seq, delta)

    @rule(ops=op_lists)
    def append(self, ops: list[Any]) -> None:
        note("append")
        delta = Delta(ops=ops)
        self._ack(delta, self.run(self.log.append, delta))

    @rule(target=keyed, ops=op_lists)
    def append_keyed(self, ops: list[Any]) -> tuple[str, int]:
        note("append keyed")
        self.next_key += 1
        delta = Delta(ops=ops, idempotency_key=f"receipt-{self.next_key}")
        seq = self.run(self.log.append, delta)
        self._ack(delta, seq)
        return delta.idempotency_key or "", seq

    @rule(original=consumes(keyed), ops=op_lists)
    def append_again(self, original: tuple[str, int], ops: list[Any]) -> None:
        """A repeated call (after a producer crash): the original seq, nothing written."""
        note("append again")
        key, seq = original
        again = self.run(self.log.append, Delta(ops=ops, idempotency_key=key))
        assert again == seq

    @rule(batch=st.lists(op_lists, min_size=1, max_size=4))
    def submit(self, batch: list[list[Any]]) -> None:
        note("submit")
        deltas = [Delta(ops=ops) for ops in batch]
        seqs: dict[str, int] = {}

        async def go() -> None:
            async with self.log.producer(linger_ms=20) as producer:

                async def one(delta: Delta) -> None:
                    seqs[delta.delta_id] = await producer.submit(delta)

                async with anyio.create_task_group() as tg:
                    for delta in deltas:
                        tg.start_soon(one, delta)

        self.run(go)
        for delta in deltas:
            self._ack(delta, seqs[delta.delta_id])

    @rule(ratio=st.sampled_from(RATIOS), requested=st.booleans())
    def compact(self, ratio: float, requested: bool) -> None:
        note(f"compact ratio {ratio:g}{' checkpoint' if requested else ''}")
        before = self.state()

        async def go() -> Any:
            if self.follower is None:
                self.follower = await self.kept.enter_async_context(self.compactor())
            self.follower.policy = CheckpointPolicy(ratio)
            return await self.follower.run_once(checkpoint=requested)

        result = self.run(go)
        note(f"compact {'on the warm sink' if result.warm_sink else 'opened a copy'}")
        if self.head() > self.hwm:
            status = "applied"
        elif requested and before.tail_entries:
            status = "checkpointed"
        else:
            status = "nothing"
        assert result.status == status, result
        assert result.hwm_after == self.head()
        if status == "nothing":
            assert result.checkpoint == "", result
            return
        reason, tail_bytes = self.policy(before, ratio, requested)
        assert result.checkpoint == reason, (result, tail_bytes)
        assert result.tail_bytes == (0 if reason else tail_bytes), result

    @rule(ops=op_lists, ratio=st.sampled_from((0.1, 1e9)))
    def follow(self, ops: list[Any], ratio: float) -> None:
        """An entry arrives and the kept compactor runs, as a follower would: mostly on
        the index it holds open since its last run."""
        self.append(ops)
        self.compact(ratio, False)

    def policy(self, before: LogState, ratio: float, requested: bool) -> tuple[str, int]:
        """Why a run that brings the committed state to the head should publish a
        checkpoint (or ""), and the bytes of the tail it would commit otherwise.

        The README's rules ("Checkpoints and the committed tail"), in their order,
        on the sizes of the stored objects themselves (not the state's accounting):
        asked for; no checkpoint yet; the entries after the checkpoint's seq reach
        ``ratio`` times the checkpoint archive's bytes; or they reach a cap (``auto``:
        one seq per 64 KiB of checkpoint, at least 2,000; 256 MiB).
        """
        sizes = self.run(self.stored_sizes)
        tail = [
            sizes[self.config.keys.entry(seq)]
            for seq in range(before.checkpoint_hwm + 1, self.head() + 1)
        ]
        tail_bytes = sum(tail)
        if requested:
            return "requested", tail_bytes
        if before.snapshot_key is None:
            return "first", tail_bytes
        checkpoint = sizes[before.snapshot_key]
        if tail_bytes >= ratio * checkpoint:
            return "ratio", tail_bytes
        if len(tail) >= max(2_000, checkpoint // (64 * 1024)):
            return "entries", tail_bytes
        if tail_bytes >= 256 * 1024 * 1024:
            return "bytes", tail_bytes
        return "", tail_bytes

    async def stored_sizes(self) -> dict[str, int]:
        """Every object of the log (entries and snapshots) and its stored bytes."""
        return {
            info.key: info.size async for info in self.store.list_after(self.config.keys.prefix)
        }

    @precondition(lambda self: self.head() > self.hwm)
    @rule(step=st.sampled_from(STEPS), ratio=st.sampled_from(RATIOS))
    def crash(self, step: str, ratio: float) -> None:
        note(f"crash {step}")
        _, factory = faulty_sinks(
            before=1 if step == "apply-before" else None,
            after=1 if step == "apply-after" else None,
        )
        self.store.crash_upload = step == "upload"
        self.table.crash_on = step if step in ("before-commit", "after-commit", "release") else None

        async def go() -> None:
            async with self.compactor(
                sink_factory=factory, lease_ttl=CRASH_TTL, checkpoint_ratio=ratio
            ) as compactor:
                await compactor.run_once(checkpoint=step == "upload")

        try:
            self.run(go)
        except Crash:
            pass
        else:
            raise AssertionError(f"the compaction did not crash at {step}")
        assert not self.store.crash_upload and self.table.crash_on is None
        self._await_lease_expiry()

    def _await_lease_expiry(self) -> None:
        """A crashed holder never releases: its lease ends by expiring (the table's
        clock moves past it)."""
        state = self.state()
        if state.owner is not None:
            self.table.ahead += state.expires_at - self.table.now() + 1.0
            assert self.state().lease_free(self.table.now())

    @rule(fraction=st.floats(0, 1))
    def rebuild(self, fraction: float) -> None:
        note("rebuild")
        to_seq = round(self.head() * fraction)

        async def go() -> Any:
            async with self.compactor() as compactor:
                return await compactor.rebuild(to_seq)

        result = self.run(go)
        assert (result.hwm, result.published) == (to_seq, False)
        assert_states_equal(
            self.snapshot(result.snapshot_key, result.snapshot_sha256), self.model_at(to_seq)
        )

    @rule()
    def rebuild_and_publish(self) -> None:
        note("rebuild and publish")

        async def go() -> Any:
            async with self.compactor() as compactor:
                return await compactor.rebuild(publish=True)

        result = self.run(go)
        assert (result.hwm, result.published) == (self.head(), True)
        assert self.state().snapshot_key == result.snapshot_key

    @rule(queries=query_lists, n_results=st.integers(1, 5))
    def fresh_read(self, queries: list[np.ndarray], n_results: int) -> None:
        note("fresh read")
        vectors = np.stack(queries)
        queried = [c for c in COLLECTIONS if self.has_vectors(c)]

        async def go() -> tuple[dict[str, Any], dict[str, Any]]:
            async with Reader.open(
                self.config,
                consistency="fresh",
                cache_dir=self.tmp / "reader",
                store=self.store,
                table=self.table,
            ) as reader:
                got = {c: await reader.get(collection=c) for c in COLLECTIONS}
                found = {
                    c: await reader.query(
                        collection=c, query_embeddings=vectors, n_results=n_results
                    )
                    for c in queried
                }
                return got, found

        got, found = self.run(go)
        want = self.model_at(self.head())
        for collection in COLLECTIONS:
            assert_get_matches(got[collection], want.get(collection, {}), collection)
        for collection in queried:
            records = want.get(collection, {})
            assert_query_matches(found[collection], records, vectors, n_results, collection)

    def has_vectors(self, collection: str) -> bool:
        """Whether an acknowledged delta upserted into ``collection`` (it has a dimension)."""
        return any(
            isinstance(op, Upsert) and op.collection == collection
            for _, delta in self.acked.values()
            for op in delta.ops
        )

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def hwm_never_decreases(self) -> None:
        state = self.state()
        assert state.hwm >= self.hwm, f"hwm went from {self.hwm} to {state.hwm}"
        assert state.hwm <= self.head()
        self.hwm = state.hwm

    @invariant()
    def every_acknowledged_delta_is_in_the_log_exactly_once(self) -> None:
        order = self.run(self.delta_order)
        where: dict[str, list[int]] = {}
        for seq, ids in order.items():
            for delta_id in ids:
                where.setdefault(delta_id, []).append(seq)
        assert where == {d: [seq] for d, (seq, _) in self.acked.items()}
        assert sorted(order) == list(range(1, self.head() + 1)), "dense seqs, no seals needed"

    @invariant()
    def the_committed_state_is_the_model_at_hwm(self) -> None:
        state = self.state()
        committed = (state.snapshot_key, state.hwm)
        if committed == self.checked:
            return
        if state.snapshot_key is None or state.snapshot_sha256 is None:
            assert state.hwm == 0
        else:
            checkpoint = self.snapshot(state.snapshot_key, state.snapshot_sha256)
            assert_states_equal(checkpoint, self.model_at(state.checkpoint_hwm))
            assert_states_equal(self.run(self.exported), self.model_at(state.hwm))
        self.checked = committed

    async def exported(self) -> State:
        async with self.compactor() as compactor:
            return await committed_state(compactor)


SETTINGS = {
    "memory": settings(max_examples=examples(20), stateful_step_count=15, deadline=None),
    "moto": settings(max_examples=examples(4), stateful_step_count=12, deadline=None),
}


@pytest.mark.parametrize("backend", ["memory", "moto"])
def test_the_protocol_against_the_model(backend: str, request: pytest.FixtureRequest) -> None:
    endpoint = request.getfixturevalue("initialized") if backend == "moto" else None
    # hypothesis takes any factory of machines; its hint says a class
    factory = functools.partial(DeltaLogModel, endpoint)
    run_state_machine_as_test(factory, settings=SETTINGS[backend])  # type: ignore[arg-type]


def _steps(machine: DeltaLogModel, steps: list[tuple[str, dict[str, Any]]]) -> None:
    """Run ``steps`` (a rule's name and its arguments) as hypothesis would: each rule,
    then every invariant."""
    try:
        for name, arguments in steps:
            getattr(machine, name)(**arguments)
            machine.hwm_never_decreases()
            machine.every_acknowledged_delta_is_in_the_log_exactly_once()
            machine.the_committed_state_is_the_model_at_hwm()
    finally:
        machine.teardown()


def _upsert(*ids: str) -> Upsert:
    return Upsert("words", list(ids), np.ones((len(ids), DIM), dtype=np.float32))


@pytest.mark.parametrize("backend", ["memory", "moto"])
def test_a_tiny_checkpoint_is_published_by_the_ratio(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """Issue 18's minimal sequence: the first checkpoint holds no record (the log's first
    entry deletes an id never written), so the next run's tail passes the ratio 0.1 of
    its size, and the run rightly publishes."""
    endpoint = request.getfixturevalue("initialized") if backend == "moto" else None
    _steps(
        DeltaLogModel(endpoint),
        [
            ("append", {"ops": [Delete("words", ["a"])]}),
            ("compact", {"ratio": 0.0, "requested": False}),
            ("append", {"ops": [_upsert("a")]}),
            ("append", {"ops": [_upsert("a", "b", "c")]}),
            ("compact", {"ratio": 0.1, "requested": False}),
        ],
    )


@pytest.mark.parametrize("backend", ["memory", "moto"])
def test_the_tail_adds_up_over_runs_that_publish_nothing(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """Runs that (almost) never publish: each commits the bytes of every entry after
    the checkpoint, not only its own, so the ratio builds up over many small runs."""
    endpoint = request.getfixturevalue("initialized") if backend == "moto" else None
    never = {"ratio": 1e9, "requested": False}
    _steps(
        DeltaLogModel(endpoint),
        [
            ("append", {"ops": [_upsert("a")]}),
            ("compact", {"ratio": 0.0, "requested": False}),
            ("append", {"ops": [_upsert("b")]}),
            ("compact", never),
            ("append", {"ops": [_upsert("a", "c")]}),
            ("compact", never),
            ("compact", {"ratio": 1e9, "requested": True}),
        ],
    )


@pytest.mark.parametrize("backend", ["memory", "moto"])
def test_a_run_that_crashed_holding_the_lease_is_taken_over_after_its_expiry(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """The crash at release keeps the lease until it expires (on the table's clock, which
    the model moves past it); the next run takes it over with a new token."""
    endpoint = request.getfixturevalue("initialized") if backend == "moto" else None
    _steps(
        DeltaLogModel(endpoint),
        [
            ("append", {"ops": [_upsert("a")]}),
            ("crash", {"step": "release", "ratio": 0.1}),
            ("append", {"ops": [_upsert("b")]}),
            ("compact", {"ratio": 0.1, "requested": False}),
        ],
    )
