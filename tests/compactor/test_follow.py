"""``follow_one``: the follower watches the head counter, wakes on a new entry, and keeps
its compactor's warm sink across runs (memory adapters, real ChromaDB)."""

from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np

from compactor import CompactionResult, Compactor
from compactor.follow import follow_one
from deltalog import DeltaLog
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import LogState, MemoryTable
from tests.builders import delta
from tests.compaction import assert_states_equal, committed_state, reference
from tests.compactor.conftest import MEMORY


class CountingTable(MemoryTable):
    """Counts the follower's reads: the head counter and the state item."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = 0
        self.states = 0

    async def read_head(self, log_id: str) -> int:
        self.heads += 1
        return await super().read_head(log_id)

    async def read_state(self, log_id: str) -> LogState:
        self.states += 1
        return await super().read_state(log_id)


async def test_an_idle_follower_reads_only_the_head_and_wakes_on_a_new_entry(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = MemoryStore(), CountingTable()
    results: list[CompactionResult] = []
    ran = anyio.Event()

    def on_result(result: CompactionResult) -> None:
        results.append(result)
        ran.set()

    async with (
        DeltaLog.open(MEMORY, store=store, table=table) as log,
        Compactor(
            MEMORY, cache_dir=tmp_path, store=store, table=table, checkpoint_ratio=1e6
        ) as compactor,
        anyio.create_task_group() as tg,
    ):
        table.heads = table.states = 0  # opening the log reads its state (the identity check)
        tg.start_soon(
            lambda: follow_one(compactor, poll_min=0.01, poll_max=0.02, on_result=on_result)
        )
        with anyio.fail_after(30):
            while table.heads < 20:  # noqa: ASYNC110 (another task polls)
                await anyio.sleep(0.01)
        assert table.states == 1, "an idle log costs one read per poll: its head"
        for name in ("a", "b", "c"):
            ran = anyio.Event()
            await log.append(delta(rng, name))
            with anyio.fail_after(30):
                await ran.wait()
        tg.cancel_scope.cancel()
    assert [r.hwm_after for r in results] == [1, 2, 3]
    assert [(r.checkpoint, r.warm_sink) for r in results] == [
        ("first", False),  # closed to publish the first checkpoint
        ("", False),  # opened the live copy again
        ("", True),  # the index held open since the run before
    ]
    async with (
        DeltaLog.open(MEMORY, store=store, table=table) as log,
        Compactor(MEMORY, cache_dir=tmp_path, store=store, table=table) as again,
    ):
        assert_states_equal(await committed_state(again), await reference(log))
