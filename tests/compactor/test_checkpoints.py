"""Checkpoints: crashes at each new step, retention, multipart archives, older states.

Each test runs on the memory adapters and on moto's server (``backend``).

- **Crashes** at each step a run with checkpoints adds: after applying,
  before committing hwm alone; after uploading a checkpoint, before its
  commit (the switch: hwm was committed before the upload); after a
  commit, before the live copy is kept and retention runs. The committed
  state is unchanged by the first, has the run's hwm on the old checkpoint
  after the second (the upload is an orphan), moved by the third; in every
  case the next run converges to the reference fold, and readers see it.
- **Order**: a run that publishes commits hwm (with its committed tail)
  before it closes Chroma and uploads, so a snapshot reader sees the run's
  entries while the checkpoint uploads; then the switch, on that hwm.
- **Retention** never deletes the checkpoint the committed state points to,
  even at ``orphan_grace=0`` with every other snapshot gone.
- **The committed tail**: a snapshot reader, a cold ``export`` and a cold
  ``run_once`` refuse a committed tail that ends before hwm (a missing
  entry is damage, never a shorter fold); the tail's bytes add up across
  runs; a live copy behind the checkpoint is not reused.
- **Size**: an archive of many parts goes up as a multipart upload and
  comes down by ranged requests, for a cold compactor, a reader and
  ``export``.
- **Compatibility**: a state committed by the version before checkpoints
  (no ``snapshot_hwm``, no ``tail_bytes``) reads as a checkpoint at hwm.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import chromadb
import numpy as np
import pytest
from chromadb.config import Settings

from compactor import Compactor
from deltalog import DataError, DeltaLog, LogConfig, Reader
from deltalog.errors import Unavailable
from deltalog.keys import STATE_SK
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.s3 import S3Store
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import MemoryTable
from tests.builders import delete, delta, patch
from tests.compaction import (
    Crash,
    FaultyTable,
    State,
    assert_states_equal,
    committed_state,
    faulty_sinks,
    held_download,
    reference,
    until_state,
)
from tests.compactor.conftest import Backend
from tests.faulty import FaultyStore

PART = 4096
TAIL_ONLY = 1e6
"""A checkpoint ratio no test's tail reaches: runs publish the first checkpoint, when asked,
or at a cap, and otherwise commit a tail. (The default ratio would publish here: a test's
zstd checkpoint of a few records is smaller than ten of its entries.)"""


class TailBackend(Backend):
    """``backend`` whose compactors use ``TAIL_ONLY`` unless a test says otherwise."""

    def compactor(self, config: LogConfig | None = None, **options: Any) -> Compactor:
        return super().compactor(config, **{"checkpoint_ratio": TAIL_ONLY, **options})


@pytest.fixture
def backend(backend: Backend) -> Backend:
    return TailBackend(
        backend.name, backend.config, backend.store, backend.table, backend.lease_ttl
    )


async def snapshot_keys(log: DeltaLog) -> list[str]:
    return [info.key async for info in log.store.list_after(log.keys.snapshots_prefix)]


async def reader_sees(log: DeltaLog, cache: Path) -> dict[str, list[str]]:
    """What a snapshot reader with its own cache answers: ids per collection."""
    async with Reader.open(log.config, cache_dir=cache, store=log.store, table=log.table) as reader:
        return {"words": sorted((await reader.get(collection="words"))["ids"])}


def ids_of(state: State) -> dict[str, list[str]]:
    return {"words": sorted(state.get("words", {}))}


async def converged(log: DeltaLog, c: Compactor, cache: Path) -> None:
    """The committed state, a fresh snapshot reader and verify all equal the reference."""
    want = await reference(log)
    assert (await log.table.read_state(log.keys.log_id)).hwm == await log.head()
    assert_states_equal(await committed_state(c), want)
    assert await reader_sees(log, cache) == ids_of(want)
    assert (await c.verify()).ok


async def three_entries(log: DeltaLog, rng: np.random.Generator, name: str) -> None:
    await log.append(delta(rng, name, rows=3))
    await log.append(delete(f"{name}#1"))
    await log.append(patch([f"{name}#0"], [{"label": "TOTAL"}]))


# -- crashes at each new step ---------------------------------------------------------


async def test_a_crash_after_applying_before_committing_hwm_changes_nothing(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    table = FaultyTable(backend.table)
    async with (
        backend.open_log() as log,
        backend.compactor(cache_dir=tmp_path / "c", table=table, lease_ttl=backend.lease_ttl) as c,
    ):
        await three_entries(log, rng, "a")
        first = await c.run_once()
        await three_entries(log, rng, "b")
        before = await log.table.read_state(log.keys.log_id)
        table.crash_on = "before-commit"  # applied to the live copy, not committed
        with pytest.raises(Crash):
            await c.run_once()
        after = await log.table.read_state(log.keys.log_id)
        assert (after.hwm, after.snapshot_key, after.tail_bytes) == (
            before.hwm,
            first.snapshot_key,
            0,
        )
        assert await snapshot_keys(log) == [first.snapshot_key], "nothing was uploaded"
        await until_free(log)
        again = await c.run_once()
        assert (again.hwm_before, again.hwm_after, again.checkpoint) == (3, 6, "")
        assert again.working_copy == "checkpoint", "the uncommitted live copy was not reused"
        await converged(log, c, tmp_path / "reader")


async def test_a_crash_after_uploading_a_checkpoint_before_its_commit_leaves_an_orphan(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    table = FaultyTable(backend.table)
    async with (
        backend.open_log() as log,
        backend.compactor(cache_dir=tmp_path / "c", table=table, lease_ttl=backend.lease_ttl) as c,
        backend.compactor(cache_dir=tmp_path / "s", orphan_grace=0, retain=1) as sweeper,
    ):
        await three_entries(log, rng, "a")
        first = await c.run_once()
        await three_entries(log, rng, "b")
        table.crash_on = "before-checkpoint-commit"
        with pytest.raises(Crash):
            await c.run_once(checkpoint=True)
        state = await log.table.read_state(log.keys.log_id)
        # hwm was committed (with its tail) before the upload; the switch was not
        assert (state.hwm, state.snapshot_key) == (6, first.snapshot_key)
        (orphan,) = set(await snapshot_keys(log)) - {first.snapshot_key}
        await until_free(log)
        await log.append(delta(rng, "c"))
        done = await sweeper.run_once()  # a tail commit; its retention sweeps the orphan
        assert (done.hwm_after, done.checkpoint, done.snapshot_key) == (7, "", first.snapshot_key)
        assert await snapshot_keys(log) == [first.snapshot_key], f"{orphan} is gone"
        await converged(log, c, tmp_path / "reader")


async def test_a_checkpoint_owed_by_a_run_stopped_between_its_commits_is_published_next(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """The first run's checkpoint ("first") crashes after its hwm commit: the log has a
    committed tail and no checkpoint. The next run has nothing new to apply, and still
    publishes the checkpoint the policy owes (a rerun finishes what was interrupted)."""
    table = FaultyTable(backend.table)
    async with (
        backend.open_log() as log,
        backend.compactor(cache_dir=tmp_path / "c", table=table, lease_ttl=backend.lease_ttl) as c,
    ):
        await three_entries(log, rng, "a")
        table.crash_on = "before-checkpoint-commit"
        with pytest.raises(Crash):
            await c.run_once()
        state = await log.table.read_state(log.keys.log_id)
        assert (state.hwm, state.snapshot_key, state.tail_entries) == (3, None, 3)
        await until_free(log)
        again = await c.run_once()
        assert (again.hwm_before, again.hwm_after, again.checkpoint) == (3, 3, "first")
        state = await log.table.read_state(log.keys.log_id)
        assert (state.snapshot_hwm, state.tail_entries) == (3, 0)
        assert state.snapshot_key is not None
        assert (await c.run_once()).status == "nothing", "owed no more"
        await converged(log, c, tmp_path / "reader")


class _UploadWatch:
    """A store that runs ``before`` when an upload starts (then uploads as ``inner``)."""

    def __init__(self, inner: Any, before: Any) -> None:
        self.inner = inner
        self.before = before

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @asynccontextmanager
    async def upload(self, key: str) -> AsyncIterator[Any]:
        await self.before(key)
        async with self.inner.upload(key) as upload:
            yield upload


async def test_a_run_that_publishes_commits_hwm_before_it_uploads(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """While the checkpoint uploads, the run's entries are committed (the tail) and a
    snapshot reader returns them; then the switch moves the checkpoint, not hwm."""
    seen: list[tuple[int, str | None, dict[str, list[str]]]] = []
    async with backend.open_log() as log:

        async def before(key: str) -> None:
            state = await log.table.read_state(log.keys.log_id)
            seen.append((state.hwm, state.snapshot_key, await reader_sees(log, tmp_path / "r")))

        store = _UploadWatch(backend.store, before)
        async with backend.compactor(cache_dir=tmp_path / "c", store=store) as c:
            await three_entries(log, rng, "a")
            first = await c.run_once()  # the first checkpoint: a tail from seq 0 before it
            assert seen[0] == (3, None, ids_of(await reference(log)))
            await three_entries(log, rng, "b")
            second = await c.run_once(checkpoint=True)
            assert seen[1][:2] == (6, first.snapshot_key)
            assert seen[1][2] == ids_of(await reference(log))
            state = await log.table.read_state(log.keys.log_id)
            assert (state.hwm, state.checkpoint_hwm, state.tail_entries) == (6, 6, 0)
            assert (second.hwm_before, second.hwm_after, second.checkpoint) == (3, 6, "requested")
            assert state.snapshot_key == second.snapshot_key != first.snapshot_key
            await converged(log, c, tmp_path / "reader")


async def test_a_crash_after_a_commit_before_the_live_copy_and_retention_converges(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    cases = [  # a run that publishes commits twice: hwm (with its tail), then the switch
        (False, "after-commit"),
        (True, "after-commit"),
        (True, "after-checkpoint-commit"),
    ]
    for publish, crash in cases:
        switched = crash == "after-checkpoint-commit"
        table = FaultyTable(backend.table)
        config = replace(backend.config, log=f"{backend.config.log}-{publish}-{switched}")
        async with (
            backend.open_log(config) as log,
            backend.compactor(
                config,
                cache_dir=tmp_path / f"c{publish}{switched}",
                table=table,
                lease_ttl=backend.lease_ttl,
                retain=1,
                orphan_grace=0,
            ) as c,
        ):
            await three_entries(log, rng, "a")
            first = await c.run_once()
            await three_entries(log, rng, "b")
            table.crash_on = crash
            with pytest.raises(Crash):
                await c.run_once(checkpoint=publish)
            state = await log.table.read_state(log.keys.log_id)
            assert state.hwm == 6, "the commit landed"
            assert (state.snapshot_key == first.snapshot_key) is not switched
            assert first.snapshot_key in await snapshot_keys(log), "retention did not run"
            await until_free(log)
            await log.append(delta(rng, "c"))
            again = await c.run_once()
            assert again.working_copy == "checkpoint" and again.hwm_after == 7
            assert again.replayed_tail == (0 if switched else 3)
            keys = await snapshot_keys(log)
            assert keys == [state.snapshot_key], "retention ran with the next commit"
            await converged(log, c, tmp_path / f"reader{publish}{switched}")


async def until_free(log: DeltaLog) -> None:
    """A crashed run never released its lease: it ends by expiring."""
    await until_state(log, lambda state: state.lease_free(time.time()))


async def test_a_crash_mid_replay_of_a_cold_copy_leaves_no_live_copy(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """A cold compactor dies while replaying the committed tail: nothing is kept."""
    async with backend.open_log() as log:
        async with backend.compactor(cache_dir=tmp_path / "a") as a:
            await three_entries(log, rng, "a")
            await a.run_once()
            await three_entries(log, rng, "b")
            assert (await a.run_once()).tail_entries == 3
        await log.append(delta(rng, "c"))
        _, crashing = faulty_sinks(before=1)
        async with backend.compactor(
            cache_dir=tmp_path / "b", sink_factory=crashing, lease_ttl=backend.lease_ttl
        ) as b:
            with pytest.raises(Crash):
                await b.run_once()
            assert not (b.cache.root / "live").exists()
            await until_free(log)
        async with backend.compactor(cache_dir=tmp_path / "b") as b:
            again = await b.run_once()
            assert (again.working_copy, again.replayed_tail, again.hwm_after) == (
                "checkpoint",
                3,
                7,
            )
            await converged(log, b, tmp_path / "reader")


# -- retention --------------------------------------------------------------------------


@pytest.mark.parametrize("history", [True, False], ids=["history", "no-history"])
async def test_retention_keeps_the_checkpoint_the_state_points_to(
    backend: Backend, rng: np.random.Generator, tmp_path: Path, history: bool
) -> None:
    """retain=1, orphan_grace=0: orphans and unpublished rebuilds go, the checkpoint
    (older than every one of them, far below hwm) stays; also when the state has no
    ``recent_snapshots`` (committed by an older version), where retention keeps the
    newest snapshots by hwm, and the checkpoint is not among them."""
    options: dict[str, Any] = {"retain": 1, "orphan_grace": 0}
    async with (
        backend.open_log() as log,
        backend.compactor(cache_dir=tmp_path / "c", **options) as c,
    ):
        await log.append(delta(rng, "a"))
        checkpoint = (await c.run_once()).snapshot_key
        assert checkpoint is not None
        if not history:
            await forget_checkpoint_fields(backend, log, "recent_snapshots")
        for i in range(4):
            await log.append(delta(rng, f"t{i}"))
            # A run killed before its commit, under the token it held:
            token = (await log.table.read_state(log.keys.log_id)).token
            orphan = log.keys.snapshot(await log.head() - 1, token, f"orphan{i}")
            assert await log.store.put_if_absent(orphan, b"never committed")
            rebuilt = await c.rebuild()  # uploaded, not published: an orphan too
            result = await c.run_once()
            assert (result.checkpoint, result.snapshot_key) == ("", checkpoint)
            assert checkpoint in await snapshot_keys(log)
        state = await log.table.read_state(log.keys.log_id)
        assert (state.hwm, state.snapshot_hwm, state.snapshot_key) == (5, 1, checkpoint)
        assert set(await snapshot_keys(log)) <= {checkpoint, rebuilt.snapshot_key}
        assert_states_equal(await committed_state(c), await reference(log))
        assert await reader_sees(log, tmp_path / "reader") == ids_of(await reference(log))


# -- size: archives of many parts -------------------------------------------------------


async def test_an_archive_of_many_parts_goes_up_and_comes_down_whole(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    config = replace(backend.config, part_size=PART, transfer_concurrency=3)
    store: Any = MemoryStore(part_size=PART) if backend.name == "memory" else None
    table = MemoryTable() if backend.name == "memory" else backend.table
    if store is None:
        store = await S3Store.connect(config)
    try:
        async with (
            DeltaLog.open(config, store=store, table=table) as log,
            Compactor(
                config,
                cache_dir=tmp_path / "a",
                store=store,
                table=table,
                checkpoint_ratio=TAIL_ONLY,
            ) as a,
        ):
            for i in range(4):
                await log.append(delta(rng, f"r{i}", rows=20, dim=64))
            first = await a.run_once()
            assert first.snapshot_key is not None
            assert first.snapshot_size > 8 * PART, "an archive of many parts (zstd)"
            if isinstance(store, S3Store):
                head = await store._s3.head_object(Bucket=config.bucket, Key=first.snapshot_key)
                parts = -(-first.snapshot_size // PART)
                assert head["ETag"].strip('"').endswith(f"-{parts}"), "a multipart upload"
            await log.append(delete("r0#3"))
            await a.run_once()
            want = await reference(log)
            async with Compactor(config, cache_dir=tmp_path / "b", store=store, table=table) as b:
                cold = await b.run_once(checkpoint=True)
                assert cold.working_copy == "checkpoint" and cold.replayed_tail == 1
                assert_states_equal(await committed_state(b), want)  # export, downloaded
            async with Reader.open(
                config, cache_dir=tmp_path / "r", store=store, table=table
            ) as reader:
                assert sorted((await reader.get(collection="words"))["ids"]) == sorted(
                    want["words"]
                )
    finally:
        await store.aclose()


# -- the committed tail: what each of its readers must check ----------------------------


async def checkpoint_at_1_tail_to_3(log: DeltaLog, c: Compactor, rng: np.random.Generator) -> str:
    """Entries a, b, c: a checkpoint at 1 and a committed tail to hwm 3; its key."""
    await log.append(delta(rng, "a"))
    first = await c.run_once()
    assert (first.checkpoint, first.snapshot_key) != ("", None)
    await log.append(delta(rng, "b"))
    await log.append(delta(rng, "c"))
    assert (await c.run_once()).checkpoint == ""
    state = await log.table.read_state(log.keys.log_id)
    assert (state.hwm, state.checkpoint_hwm) == (3, 1)
    assert first.snapshot_key is not None
    return first.snapshot_key


async def test_a_snapshot_reader_refuses_a_committed_tail_that_ends_before_hwm(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Every seq up to hwm is an entry or a seal: with entry 3 gone, a snapshot reader
    raises a ``DataError`` naming seq 3 rather than answer the fold at 2 as hwm 3."""
    async with backend.open_log() as log:
        async with backend.compactor(cache_dir=tmp_path / "c") as c:
            await checkpoint_at_1_tail_to_3(log, c, rng)
        await log.store.delete(log.keys.entry(3))
        with pytest.raises(DataError, match="missing seq 3") as refused:
            await reader_sees(log, tmp_path / "reader")
        assert refused.value.seq == 3


async def test_a_cold_copy_whose_committed_tail_ends_before_hwm_publishes_nothing(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """With entry 2 gone, a cold ``export`` and a cold ``run_once(checkpoint=True)`` each
    raise a ``DataError`` (seq 2) and leave the committed checkpoint as it was, rather
    than publish one that lacks seqs 2-3."""
    async with backend.open_log() as log:
        async with backend.compactor(cache_dir=tmp_path / "warm") as c:
            checkpoint = await checkpoint_at_1_tail_to_3(log, c, rng)
        await log.store.delete(log.keys.entry(2))
        before = await snapshot_keys(log)
        async with backend.compactor(cache_dir=tmp_path / "cold") as cold:
            with pytest.raises(DataError) as exported:
                await cold.export(tmp_path / "out")
            assert exported.value.seq == 2
            assert not (tmp_path / "out").exists()
        async with backend.compactor(cache_dir=tmp_path / "cold2") as cold:
            with pytest.raises(DataError) as checkpointed:
                await cold.run_once(checkpoint=True)
            assert checkpointed.value.seq == 2
        state = await log.table.read_state(log.keys.log_id)
        assert (state.hwm, state.snapshot_key, state.checkpoint_hwm) == (3, checkpoint, 1)
        assert await snapshot_keys(log) == before, "nothing uploaded"


async def test_tail_bytes_add_up_across_runs(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Three tail-only runs (a publishes the first checkpoint; b, then c, go to the
    tail): the tail's bytes are b's plus c's, in the result and the state, so the ratio
    builds up over many small runs."""
    async with backend.open_log() as log, backend.compactor(cache_dir=tmp_path / "c") as c:
        results = []
        for name in ("a", "b", "c"):
            await log.append(delta(rng, name))
            results.append(await c.run_once())
        assert [r.checkpoint for r in results] == ["first", "", ""]
        sizes = {
            log.keys.seq_of(info.key): info.size
            async for info in log.store.list_after(log.keys.entries_prefix)
        }
        state = await log.table.read_state(log.keys.log_id)
        assert results[1].tail_bytes == sizes[2]
        assert results[2].tail_bytes == state.tail_bytes == sizes[2] + sizes[3]


async def test_a_live_copy_behind_the_checkpoint_is_not_reused(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Compactor A keeps a live copy at seq 1; B publishes a checkpoint at 3; one more
    entry arrives. A's copy is behind the checkpoint, so A starts from the checkpoint
    (nothing of the tail to replay), not from its copy (2 seqs to replay)."""
    async with backend.open_log() as log, backend.compactor(cache_dir=tmp_path / "a") as a:
        await log.append(delta(rng, "a"))
        assert (await a.run_once()).checkpoint == "first"
        await log.append(delta(rng, "b"))
        await log.append(delta(rng, "c"))
        async with backend.compactor(cache_dir=tmp_path / "b") as b:
            assert (await b.run_once(checkpoint=True)).snapshot_hwm == 3
        await log.append(delta(rng, "d"))
        result = await a.run_once()
        assert (result.working_copy, result.replayed_tail, result.hwm_after) == (
            "checkpoint",
            0,
            4,
        )
        await converged(log, a, tmp_path / "reader")


# -- compatibility with states committed before checkpoints ----------------------------


async def test_a_state_committed_before_checkpoints_is_read_as_a_checkpoint_at_hwm(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    async with backend.open_log() as log:
        async with backend.compactor(cache_dir=tmp_path / "old") as old:
            await three_entries(log, rng, "a")
            committed = await old.run_once()
        await forget_checkpoint_fields(backend, log)
        state = await log.table.read_state(log.keys.log_id)
        assert (state.hwm, state.snapshot_hwm, state.checkpoint_hwm, state.tail_entries) == (
            3,
            None,
            3,
            0,
        )
        status = await log.status()
        assert (status.snapshot_hwm, status.tail_entries, status.tail_bytes) == (3, 0, 0)
        assert await reader_sees(log, tmp_path / "r1") == ids_of(await reference(log))
        await three_entries(log, rng, "b")
        async with backend.compactor(cache_dir=tmp_path / "new") as new:
            result = await new.run_once()
            assert (result.hwm_before, result.hwm_after, result.checkpoint) == (3, 6, "")
            assert (result.snapshot_key, result.snapshot_hwm) == (committed.snapshot_key, 3)
            state = await log.table.read_state(log.keys.log_id)
            assert (state.snapshot_hwm, state.tail_entries) == (3, 3)
            await converged(log, new, tmp_path / "r2")


async def forget_checkpoint_fields(backend: Backend, log: DeltaLog, *fields: str) -> None:
    """Make the state item what an older version left: without ``fields`` (by default
    those of checkpoints, ``snapshot_hwm`` and ``tail_bytes``)."""
    fields = fields or ("snapshot_hwm", "tail_bytes")
    table = backend.table
    if isinstance(table, MemoryTable):
        state = table._states[log.keys.log_id]
        empty: dict[str, Any] = {"snapshot_hwm": None, "tail_bytes": 0, "recent_snapshots": ()}
        table._states[log.keys.log_id] = replace(state, **{f: empty[f] for f in fields})
        return
    assert isinstance(table, DynamoTable)
    await table._db.update_item(
        TableName=table.name,
        Key={"pk": {"S": log.keys.log_id}, "sk": {"S": STATE_SK}},
        UpdateExpression=f"REMOVE {', '.join(fields)}",
    )


# -- derived copies: their lineage and trust settings ---------------------------------


def _add_stray_record(chroma_dir: Path) -> None:
    """Damage a Chroma directory: one record no entry wrote."""
    client = chromadb.PersistentClient(
        path=str(chroma_dir), settings=Settings(anonymized_telemetry=False)
    )
    try:
        words = client.get_collection("words", embedding_function=None)
        dim = len(words.get(limit=1, include=["embeddings"])["embeddings"][0])  # type: ignore[index]
        words.add(ids=["stray"], embeddings=np.ones((1, dim), np.float32))
    finally:
        client.close()  # type: ignore[attr-defined]  # the concrete client has it


async def test_a_forced_rebuild_reaches_a_hosts_live_copy(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """A repair (``rebuild --publish --force``) reaches every derived copy.

    Compactor A keeps a live copy, which gets damaged (a stray record, standing
    in for whatever the repair is for). A forced rebuild at the same hwm starts
    a new lineage; one more entry arrives. A's next run must start from the
    rebuilt checkpoint, not from its live copy (still at a seq the state
    holds), so the checkpoint it publishes equals the reference fold.
    """
    async with (
        backend.open_log() as log,
        backend.compactor(cache_dir=tmp_path / "a", checkpoint_ratio=0) as a,
        backend.compactor(cache_dir=tmp_path / "b") as b,
    ):
        await log.append(delta(rng, "x", rows=3))
        await a.run_once()
        await anyio.to_thread.run_sync(_add_stray_record, a.cache.root / "live" / "chroma")
        rebuilt = await b.rebuild(publish=True, force=True)
        await log.append(delta(rng, "y", rows=2))
        result = await a.run_once()
        assert_states_equal(await committed_state(a), await reference(log))
        assert (result.working_copy, result.replayed_tail) == ("checkpoint", 0)
        assert (await log.table.read_state(log.keys.log_id)).lineage == rebuilt.snapshot_key
        await log.append(delta(rng, "z", rows=1))
        assert (await a.run_once()).working_copy == "warm", "its new live copy is of the lineage"


async def test_a_live_copy_folded_under_other_trust_settings_is_discarded(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Two compactors share a host's cache: one trusts every entry, one requires a
    signature. Which entries get folded depends on that, so neither reuses the
    other's live copy; each reuses its own."""
    signed = replace(backend.config, signing_key=bytes(range(32)))
    async with (
        backend.open_log(signed) as log,
        backend.compactor(cache_dir=tmp_path) as any_entry,
        backend.compactor(signed, cache_dir=tmp_path) as verifying,
    ):
        runs: list[str] = []
        for c in (any_entry, verifying, verifying, any_entry):
            await log.append(delta(rng, f"d{len(runs)}"))
            runs.append((await c.run_once()).working_copy)
        assert runs == ["empty", "checkpoint", "warm", "checkpoint"]


# -- a checkpoint pruned while it downloads -------------------------------------------


@pytest.mark.parametrize("who", ["reader", "export", "verify"])
async def test_a_checkpoint_pruned_mid_download_is_read_again_from_the_state(
    backend: Backend, rng: np.random.Generator, tmp_path: Path, who: str
) -> None:
    """A vanished object is the "pruned: read the state again" case.

    A checkpoint of many 4 KiB parts is committed; a reader (or ``export``, or
    ``verify``) downloads it, and after its first range a compactor (retain 1)
    commits a newer checkpoint and deletes that one. The download's next range
    finds it gone: the state has moved on, so it loads the newer checkpoint.
    """
    config = replace(backend.config, part_size=PART, transfer_concurrency=2)
    store: Any = MemoryStore(part_size=PART) if backend.name == "memory" else None
    table = MemoryTable() if backend.name == "memory" else backend.table
    store = store or await S3Store.connect(config)
    options: Any = {"store": store, "table": table, "checkpoint_ratio": 0}
    try:
        async with (
            DeltaLog.open(config, store=store, table=table) as log,
            Compactor(config, cache_dir=tmp_path / "c", retain=1, orphan_grace=0, **options) as c,
        ):
            for i in range(3):
                await log.append(delta(rng, f"r{i}", rows=20, dim=64))
            first = await c.run_once()
            assert first.snapshot_key is not None and first.snapshot_size > 4 * PART
            async with (
                held_download(config, store, first.snapshot_key) as (held, reached, go),
                anyio.create_task_group() as tg,
            ):
                got: list[Any] = []
                tg.start_soon(_download_as, who, config, held, table, tmp_path / who, got)
                with anyio.fail_after(60):
                    await reached.wait()
                await log.append(delete("r0#3"))
                second = await c.run_once()
                assert first.snapshot_key not in await snapshot_keys(log), "pruned"
                go.set()
            want = await reference(log)
            (answer,) = got
            if who == "reader":
                assert answer == (second.snapshot_key, sorted(want["words"]))
            elif who == "export":
                assert (answer.snapshot_key, answer.hwm) == (second.snapshot_key, 4)
            else:
                assert answer.ok and answer.hwm == 4
    finally:
        await store.aclose()


async def _download_as(
    who: str, config: LogConfig, store: Any, table: Any, cache: Path, got: list[Any]
) -> None:
    if who == "reader":
        async with Reader.open(config, cache_dir=cache, store=store, table=table) as reader:
            ids = sorted((await reader.get(collection="words"))["ids"])
            got.append((reader.statistics().snapshot_key, ids))
        return
    async with Compactor(config, cache_dir=cache, store=store, table=table) as c:
        got.append(await (c.export(cache / "out") if who == "export" else c.verify()))


# -- a new checkpoint never blocks a reader's answer -----------------------------------


class _DownloadGate:
    """A store whose downloads, once ``armed``, wait for ``go`` (or fail with ``fail``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.armed = False
        self.fail: Exception | None = None
        self.reached, self.go = anyio.Event(), anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def download_file(self, key: str, path: Path) -> Any:
        if self.armed:
            self.reached.set()
            if self.fail is not None:
                raise self.fail
            await self.go.wait()
        return await self.inner.download_file(key, path)


async def test_a_reader_answers_from_the_checkpoint_it_holds_while_the_next_loads(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """The log is append-only: the checkpoint a snapshot reader holds plus the entries
    after it fold to the committed state at the new hwm. While the new checkpoint's
    download is held, every call answers that fold (deletes and patches of the new
    entries included); once it is let go, a call switches to it, answering the same."""
    gate = _DownloadGate(backend.store)
    async with (
        backend.open_log() as log,
        backend.compactor(cache_dir=tmp_path / "c") as c,
    ):
        await three_entries(log, rng, "a")
        first = await c.run_once()
        async with Reader.open(
            log.config, cache_dir=tmp_path / "r", store=gate, table=log.table
        ) as reader:

            async def ids() -> dict[str, list[str]]:
                with anyio.fail_after(30):  # a call waiting for the held download fails here
                    return {"words": sorted((await reader.get(collection="words"))["ids"])}

            assert await ids() == ids_of(await reference(log))
            gate.armed = True
            await three_entries(log, rng, "b")
            second = await c.run_once(checkpoint=True)
            assert second.snapshot_key != first.snapshot_key
            want = ids_of(await reference(log))
            assert await ids() == want
            stats = reader.statistics()
            assert (stats.snapshot_key, stats.hwm, stats.tail_seq) == (first.snapshot_key, 6, 6)
            with anyio.fail_after(30):
                await gate.reached.wait()
            assert await ids() == want, "still loading: answered from the one it holds"
            gate.go.set()
            with anyio.fail_after(30):
                while reader.statistics().snapshot_key != second.snapshot_key:
                    assert await ids() == want
                    await anyio.sleep(0.01)
            stats = reader.statistics()
            assert (stats.snapshot_hwm, stats.tail_entries, stats.snapshot_loads) == (6, 0, 2)
            assert await ids() == want


async def test_a_failed_background_load_is_raised_by_the_next_call(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """A checkpoint that could not be loaded behind the calls is loaded in the next call,
    whose error the caller sees (nothing is swallowed); once it loads, calls go on."""
    gate = _DownloadGate(backend.store)
    gate.fail = Unavailable("injected: the download failed")
    async with (
        backend.open_log() as log,
        backend.compactor(cache_dir=tmp_path / "c") as c,
    ):
        await three_entries(log, rng, "a")
        await c.run_once()
        async with Reader.open(
            log.config, cache_dir=tmp_path / "r", store=gate, table=log.table
        ) as reader:
            await reader.get(collection="words")
            gate.armed = True
            await three_entries(log, rng, "b")
            await c.run_once(checkpoint=True)
            await reader.get(collection="words")  # answered; the load failed behind it
            with anyio.fail_after(30):
                await gate.reached.wait()
            with pytest.raises(Unavailable, match="injected"):
                await _until_it_raises(lambda: reader.get(collection="words"))
            gate.armed = False
            got = sorted((await reader.get(collection="words"))["ids"])
            assert {"words": got} == ids_of(await reference(log))


async def _until_it_raises(call: Any) -> None:
    with anyio.fail_after(30):
        while True:
            await call()
            await anyio.sleep(0.01)


# -- one snapshot reader, concurrent calls: one complete cut --------------------------


class DimsGate:
    """A table whose first ``read_dims`` once armed waits for ``go``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.armed = False
        self.paused, self.go = anyio.Event(), anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read_dims(self, log_id: str) -> dict[str, int]:
        dims: dict[str, int] = await self.inner.read_dims(log_id)
        if self.armed:
            self.armed = False
            self.paused.set()
            with anyio.fail_after(60):
                await self.go.wait()
        return dims


async def test_a_call_pinned_before_a_refresh_never_sees_part_of_a_committed_tail(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Call A pins the snapshot at hwm 1 and waits (reading the schema of a collection
    new to it). hwm 3 is committed, a tail of two entries; call B's refresh reads
    entry 2 and finds entry 3 missing (the committed tail ends early: damage, B
    raises). A then answers: from the fold at hwm 1 (or 3), never from the fold at 2.
    """
    table = DimsGate(backend.table)
    store = FaultyStore(backend.store)
    async with backend.open_log() as log, backend.compactor(cache_dir=tmp_path / "c") as c:
        await log.append(delta(rng, "w"))
        assert (await c.run_once()).hwm_after == 1
        await log.append(delta(rng, "x", rows=1, collection="late"))
        await log.append(delta(rng, "y", rows=1, collection="late"))
        async with (
            Reader.open(backend.config, cache_dir=tmp_path / "r", store=store, table=table) as r,
            anyio.create_task_group() as tg,
        ):
            answers: list[list[str]] = []

            async def call_a() -> None:
                got = await r.query(collection="late", query_embeddings=np.ones(8), n_results=5)
                answers.append(got["ids"][0])

            table.armed = True
            tg.start_soon(call_a)
            with anyio.fail_after(60):
                await table.paused.wait()  # A pinned the snapshot at hwm 1
            assert (await c.run_once()).hwm_after == 3  # a committed tail (2, 3]
            store.vanished.add(log.keys.entry(3))
            with pytest.raises(DataError, match="seq=3"):
                await r.refresh()
            table.go.set()
        assert answers == [[]], "the fold at hwm 1: 'late' holds nothing yet"
