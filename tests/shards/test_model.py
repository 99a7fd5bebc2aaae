"""A stateful model test of a sharded log (DESIGN.md "Shards") against the test oracle.

Hypothesis drives a ``RuleBasedStateMachine`` over a log created with 1 or 3
shards through random sequences of:

- **append** and **submit** (group commit): producers do not change;
- **compact**: every shard, or one, sometimes stopped after a few entries,
  under a random checkpoint policy (``ShardedCompactor``);
- **crash**: one shard's compactor dies at a random step (before or after
  applying, while uploading, before or after its commit, while releasing)
  while the others run; its lease then expires;
- **reshard**: ``reshard`` to 1-4 shards (the new generation built from the
  log, the old one frozen, the switch);
- **snapshot read** and **fresh read**: ``Reader.open`` on the log.

Checked after the steps: each shard's committed state (checkpoint plus tail,
as ``export`` writes it) holds exactly its own records of the oracle at its
hwm (vectors bit for bit); no shard's hwm and no reader's cut (the greatest
committed shard hwm, at least the layout's floor) ever goes back, across
reshards too; a snapshot read equals the oracle at the cut, a fresh read the
oracle at the head (``get``, and ``query`` distances).

It runs on the memory adapters and on moto's server, with real Chroma, with
few examples: every step starts compactors of several shards.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)

from compactor import Limits
from compactor.reshard import reshard
from compactor.shards import ShardedCompactor
from deltalog import Batch, Delta, DeltaLog, LogConfig, Reader, Upsert
from deltalog.entry import MetadataValue
from deltalog.fold import State
from deltalog.keys import Shard
from deltalog.shards import init_layout
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.s3 import S3Store
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import MemoryTable
from tests.compaction import Crash, FaultyTable, assert_states_equal, committed_state, faulty_sinks
from tests.conftest import BUCKET, TABLE
from tests.oracle import oracle_state
from tests.reading import assert_get_matches, assert_query_matches
from tests.strategies import CHROMA_EXACT_FLOATS, COLLECTIONS, DIM, KEYS, deletes, updates, upserts
from tests.test_model import CrashingStore

T = TypeVar("T")
MEMORY = LogConfig(bucket="memory", table="memory", log="sharded-model")
LEASE_TTL = {"memory": 0.5, "moto": 2.0}
STEPS = ("apply-before", "apply-after", "upload", "before-commit", "after-commit", "release")

values: st.SearchStrategy[MetadataValue] = st.one_of(
    st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), CHROMA_EXACT_FLOATS, st.booleans()
)
keys = st.sampled_from(KEYS)
vector_floats = st.floats(-100, 100, width=32)
op_lists = st.lists(
    st.one_of(
        upserts(st.dictionaries(keys, values, min_size=1, max_size=3), elements=vector_floats),
        deletes(),
        updates(st.dictionaries(keys, st.none() | values, min_size=1, max_size=3)),
    ),
    min_size=1,
    max_size=3,
)
query_lists = st.lists(hnp.arrays(np.float32, DIM, elements=vector_floats), min_size=1, max_size=2)


class ShardedModel(RuleBasedStateMachine):
    """See the module docstring. ``endpoint``: moto's server, or None for memory."""

    def __init__(self, endpoint: str | None, shards: int) -> None:
        super().__init__()
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self.tmp = Path(tempfile.mkdtemp(prefix="deltalog-sharded-model-"))
        self.backend = "memory" if endpoint is None else "moto"
        self.config = MEMORY
        self.store = CrashingStore(MemoryStore())
        self.table = FaultyTable(MemoryTable())
        if endpoint is not None:
            log = f"sharded-{uuid.uuid4().hex[:12]}"
            self.config = LogConfig(bucket=BUCKET, table=TABLE, log=log, endpoint_url=endpoint)
            self.store = CrashingStore(self.run(S3Store.connect, self.config))
            self.table = FaultyTable(self.run(DynamoTable.connect, self.config))
        self.log = self.run(DeltaLog.connect, self.config, store=self.store, table=self.table)
        self.run(init_layout, self.table, self.log.keys, shards, now=time.time())
        self.acked: dict[str, tuple[int, Delta]] = {}
        self.hwms: dict[str, int] = {}
        """Each shard's committed hwm as last seen, by shard name."""
        self.cut = 0

    def run(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        async def call() -> T:
            return await func(*args, **kwargs)

        return self.portal.call(call)

    def teardown(self) -> None:
        try:
            self.run(self.log.aclose)
            self.run(self.store.inner.aclose)
            self.run(self.table.inner.aclose)
        finally:
            self._portal_cm.__exit__(None, None, None)
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the model ------------------------------------------------------------------

    def head(self) -> int:
        return max((seq for seq, _ in self.acked.values()), default=0)

    def model_at(self, seq: int) -> State:
        return self.run(self.model, seq)

    async def model(self, seq: int) -> State:
        """The oracle's state of the acknowledged deltas up to ``seq``, in the log's order."""
        order = {s: [d.delta_id for d in e.deltas] async for s, e in self.log.read()}
        entries = [
            (s, Batch("model", [self.acked[d][1] for d in ids]))
            for s, ids in sorted(order.items())
            if s <= seq
        ]
        return oracle_state(entries)

    def sharded(self, **options: Any) -> ShardedCompactor:
        return ShardedCompactor(
            self.config,
            store=self.store,
            table=self.table,
            cache_dir=self.tmp / "cache",
            grace=3600,
            lease_ttl=LEASE_TTL[self.backend],
            **options,
        )

    def _ack(self, delta: Delta, seq: int) -> None:
        self.acked[delta.delta_id] = (seq, delta)

    # -- rules ----------------------------------------------------------------------

    @rule(ops=op_lists)
    def append(self, ops: list[Any]) -> None:
        event("append")
        delta = Delta(ops=ops)
        self._ack(delta, self.run(self.log.append, delta))

    @rule(batch=st.lists(op_lists, min_size=2, max_size=4))
    def submit(self, batch: list[list[Any]]) -> None:
        event("submit")
        deltas = [Delta(ops=ops) for ops in batch]
        seqs: dict[str, int] = {}

        async def go() -> None:
            async with self.log.producer(linger_ms=20) as producer, anyio.create_task_group() as tg:
                for delta in deltas:

                    async def one(d: Delta = delta) -> None:
                        seqs[d.delta_id] = await producer.submit(d)

                    tg.start_soon(one)

        self.run(go)
        for delta in deltas:
            self._ack(delta, seqs[delta.delta_id])

    @rule(
        one=st.none() | st.integers(0, 3),
        entries=st.none() | st.integers(1, 4),
        ratio=st.sampled_from((0.0, 0.1, 1e9)),
    )
    def compact(self, one: int | None, entries: int | None, ratio: float) -> None:
        event(f"compact {'every shard' if one is None else 'one shard'}")

        async def go() -> None:
            layout = await self.table.read_layout(self.log.keys.log_id)
            chosen = None if one is None else [one % layout.shards]
            options = {"checkpoint_ratio": ratio, "limits": Limits(entries)}
            async with self.sharded(shards=chosen, **options) as c:
                outcomes = await c.run_each()
                for outcome in outcomes:
                    assert outcome.error is None, outcome.error
                    assert outcome.result is not None
                    assert outcome.result.status in ("applied", "nothing", "checkpointed")
                for compactor in c.current:
                    await self._check_shard(compactor)

        self.run(go)

    async def _check_shard(self, compactor: Any) -> None:
        """The shard's committed state: exactly its records of the oracle at its hwm."""
        shard = compactor.shard
        state = await compactor.read_state()
        name = shard.name if shard is not None else "own"
        if self.hwms.get(name) == state.hwm:
            return
        assert state.hwm >= self.hwms.get(name, 0), f"{name} went back"
        self.hwms[name] = state.hwm
        want = {
            c: {i: r for i, r in records.items() if shard is None or shard.owns(c, i)}
            for c, records in (await self.model(state.hwm)).items()
        }
        assert_states_equal(await committed_state(compactor), want)

    @precondition(lambda self: self.head() > 0)
    @rule(index=st.integers(0, 3), step=st.sampled_from(STEPS))
    def crash(self, index: int, step: str) -> None:
        event(f"crash one shard {step}")
        _, factory = faulty_sinks(
            before=1 if step == "apply-before" else None,
            after=1 if step == "apply-after" else None,
        )
        self.store.crash_upload = step == "upload"
        self.table.crash_on = step if step in ("before-commit", "after-commit", "release") else None

        async def go() -> None:
            layout = await self.table.read_layout(self.log.keys.log_id)
            chosen = index % layout.shards
            async with self.sharded(
                shards=[chosen], sink_factory=factory, checkpoint_ratio=0.0
            ) as c:
                (outcome,) = await c.run_each(checkpoint=step == "upload")
            if outcome.result is not None and outcome.result.status == "nothing":
                return  # the shard had nothing to do: no step to crash at
            assert isinstance(outcome.error, Crash), outcome
            await self._await_expiry(c.current[0].keys)

        self.run(go)
        self.store.crash_upload = False
        self.table.crash_on = None

    async def _await_expiry(self, keys: Any) -> None:
        state = await self.table.read_state(keys.log_id, sk=keys.state_sk)
        if state.owner is not None:
            await anyio.sleep(max(0.0, state.expires_at - time.time()) + 0.05)

    @precondition(lambda self: self.head() > 0)
    @rule(count=st.integers(1, 4))
    def reshard(self, count: int) -> None:
        event(f"reshard to {count}")

        async def go() -> None:
            await reshard(
                self.config,
                count,
                store=self.store,
                table=self.table,
                cache_dir=self.tmp / "cache",
                lease_ttl=LEASE_TTL[self.backend],
                grace=3600,
                lag=2,
                poll=0.05,
            )
            layout = await self.table.read_layout(self.log.keys.log_id)
            assert (layout.shards, layout.pending_generation) == (count, 0)

        self.run(go)

    @rule(queries=query_lists, fresh=st.booleans())
    def read(self, queries: list[np.ndarray], fresh: bool) -> None:
        event("fresh read" if fresh else "snapshot read")
        vectors = np.stack(queries)

        async def go() -> tuple[int, dict[str, Any], dict[str, Any]]:
            greatest = await self._greatest_hwm()
            async with Reader.open(
                self.config,
                consistency="fresh" if fresh else "snapshot",
                cache_dir=self.tmp / "reader",
                store=self.store,
                table=self.table,
            ) as reader:
                got = {c: await reader.get(collection=c) for c in COLLECTIONS}
                found = {
                    c: await reader.query(collection=c, query_embeddings=vectors, n_results=3)
                    for c in COLLECTIONS
                    if self.has_vectors(c)
                }
                at = reader.statistics().hwm
                if not fresh:  # every commit made before it opened, shown at one cut
                    assert at == greatest, f"the cut is {at}, the greatest shard hwm {greatest}"
                return at, got, found

        at, got, found = self.run(go)
        seq = self.head() if fresh else at
        if not fresh:
            assert at >= self.cut, f"the cut went back from {self.cut} to {at}"
            self.cut = at
        want = self.model_at(seq)
        for collection in COLLECTIONS:
            assert_get_matches(got[collection], want.get(collection, {}), collection)
        for collection, answer in found.items():
            assert_query_matches(answer, want.get(collection, {}), vectors, 3, collection)

    async def _greatest_hwm(self) -> int:
        """The greatest committed hwm of the current shards, and the layout's floor."""
        layout = await self.table.read_layout(self.log.keys.log_id)
        shards: list[Shard | None] = [None]
        if layout.sharded:
            shards = [Shard(layout.generation, i, layout.shards) for i in range(layout.shards)]
        hwms: list[int] = [layout.floor]
        for shard in shards:
            own = self.log.keys.for_shard(shard)
            state = await self.table.read_state(own.log_id, sk=own.state_sk)
            hwms.append(state.hwm)
        return max(hwms)

    def has_vectors(self, collection: str) -> bool:
        return any(
            isinstance(op, Upsert) and op.collection == collection
            for _, delta in self.acked.values()
            for op in delta.ops
        )


SETTINGS = {
    "memory": settings(max_examples=8, stateful_step_count=12, deadline=None),
    "moto": settings(max_examples=2, stateful_step_count=10, deadline=None),
}


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("backend", ["memory", "moto"])
def test_a_sharded_log_against_the_model(
    backend: str, shards: int, request: pytest.FixtureRequest
) -> None:
    """Up to a minute on a loaded machine: each step starts compactors of several shards."""
    endpoint = request.getfixturevalue("initialized") if backend == "moto" else None
    factory = functools.partial(ShardedModel, endpoint, shards)
    run_state_machine_as_test(factory, settings=SETTINGS[backend])  # type: ignore[arg-type]
