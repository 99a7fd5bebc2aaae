"""Readers against moto's server and real ChromaDB: snapshot and fresh reads."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from compactor import Compactor
from deltalog import (
    DataError,
    Delta,
    DeltaLog,
    DimensionMismatch,
    InvalidInput,
    LogConfig,
    Reader,
    UpdateMetadata,
)
from deltalog.snapshot.sink import ChromaSink
from deltalog.storage.faults import FaultProxy
from deltalog.storage.s3 import S3Store
from deltalog.storage.transfer import Transferred
from tests.builders import delete
from tests.oracle import oracle_state
from tests.reading import (
    DIM,
    assert_get_matches,
    assert_query_matches,
    basis,
    random_word_deltas,
    upsert_words,
)


async def _compacted(log: DeltaLog, config: LogConfig, tmp_path: Path, **options: Any) -> None:
    async with Compactor(config, cache_dir=tmp_path / "compactor", **options) as compactor:
        assert (await compactor.run_once()).status == "applied"


EVERY_RUN: dict[str, Any] = {"checkpoint_ratio": 0}
"""Compactor options: every run publishes a checkpoint (tests of snapshots replaced)."""


async def test_fresh_reads_see_the_tail_and_equal_snapshot_reads_after_compaction(
    log: DeltaLog, config: LogConfig, tmp_path: Path
) -> None:
    await log.append(upsert_words(["a", "b"], np.vstack([basis(0), basis(1)]), "Costco"))
    await _compacted(log, config, tmp_path)
    await log.append(upsert_words(["c"], basis(2), "Costco"))  # appended, not compacted
    await log.append(delete("b"))
    await log.append(
        Delta(
            ops=[
                UpdateMetadata(
                    collection="words", ids=["a"], metadatas=[{"merchant_name": "Target"}]
                )
            ]
        )
    )
    cache = tmp_path / "reader"
    async with Reader.open(config, consistency="fresh", cache_dir=cache) as fresh:
        near_c = await fresh.query(collection="words", query_embeddings=basis(2), n_results=3)
        assert near_c["ids"][0][0] == "c"
        assert near_c["distances"][0][0] == pytest.approx(0.0)
        assert "b" not in near_c["ids"][0], "deleted in the tail"
        costco = await fresh.get(collection="words", where={"merchant_name": "Costco"})
        assert sorted(costco["ids"]) == ["c"], "a moved to Target in the tail, b was deleted"
        target = await fresh.query(
            collection="words",
            query_embeddings=basis(0),
            n_results=5,
            where={"merchant_name": "Target"},
        )
        assert target["ids"] == [["a"]]
        assert target["metadatas"][0][0] == {"merchant_name": "Target", "n": 0}
        stats = fresh.statistics()
        assert (stats.hwm, stats.tail_seq) == (1, 4)
    async with Reader.open(config, consistency="snapshot", cache_dir=cache) as snapshot:
        before = await snapshot.get(collection="words")
        assert sorted(before["ids"]) == ["a", "b"], "snapshot reads do not see the tail"
    await _compacted(log, config, tmp_path)
    async with (
        Reader.open(config, consistency="snapshot", cache_dir=cache) as snapshot,
        Reader.open(config, consistency="fresh", cache_dir=tmp_path / "r2") as fresh,
    ):
        for q in (basis(0), basis(2), basis(1)):
            s = await snapshot.query(collection="words", query_embeddings=q, n_results=2)
            f = await fresh.query(collection="words", query_embeddings=q, n_results=2)
            assert s == f
        assert await snapshot.get(collection="words", where={"merchant_name": "Costco"}) == (
            await fresh.get(collection="words", where={"merchant_name": "Costco"})
        )


async def test_fresh_reads_without_any_snapshot(
    log: DeltaLog, config: LogConfig, tmp_path: Path
) -> None:
    await log.append(upsert_words(["x", "y"], np.vstack([basis(3), basis(4)]), "Aldi"))
    async with Reader.open(config, consistency="fresh", cache_dir=tmp_path) as reader:
        got = await reader.query(collection="words", query_embeddings=basis(4, 2.0), n_results=1)
        assert got["ids"] == [["y"]]
        assert got["distances"][0][0] == pytest.approx(1.0)
        assert (await reader.get(collection="words", ids=["x"]))["documents"] == ["doc x"]


async def test_a_reader_picks_up_new_commits(
    log: DeltaLog, config: LogConfig, tmp_path: Path
) -> None:
    await log.append(upsert_words(["a"], basis(0), "Costco"))
    await _compacted(log, config, tmp_path)
    async with Reader.open(config, cache_dir=tmp_path / "r") as reader:
        assert (await reader.get(collection="words"))["ids"] == ["a"]
        await log.append(upsert_words(["b"], basis(1), "Costco"))
        await _compacted(log, config, tmp_path)  # hwm moves, the checkpoint stays
        await log.append(upsert_words(["late"], basis(3), "Costco"))  # past hwm: not seen
        assert sorted((await reader.get(collection="words"))["ids"]) == ["a", "b"]
        stats = reader.statistics()
        assert (stats.hwm, stats.snapshot_hwm, stats.tail_entries, stats.snapshot_loads) == (
            2,
            1,
            1,
            1,
        )
        await log.append(upsert_words(["c"], basis(2), "Costco"))
        await _compacted(log, config, tmp_path, **EVERY_RUN)  # a new checkpoint
        # answered from the checkpoint it holds, its tail folded up to the new hwm, while
        # the new one loads behind the call; a later call switches to it
        assert sorted((await reader.get(collection="words"))["ids"]) == ["a", "b", "c", "late"]
        stats = reader.statistics()
        assert (stats.hwm, stats.snapshot_hwm, stats.snapshot_loads) == (4, 1, 1)
        assert await _until_switched(reader, 2) == ["a", "b", "c", "late"]
        stats = reader.statistics()
        assert (stats.hwm, stats.snapshot_hwm, stats.tail_entries, stats.snapshot_loads) == (
            4,
            4,
            0,
            2,
        )


async def test_bad_queries_are_refused(log: DeltaLog, config: LogConfig, tmp_path: Path) -> None:
    await log.append(upsert_words(["a"], basis(0), "Costco"))
    async with Reader.open(config, consistency="fresh", cache_dir=tmp_path) as reader:
        with pytest.raises(DimensionMismatch) as mismatch:
            await reader.query(collection="words", query_embeddings=np.ones((1, 3), np.float32))
        assert (mismatch.value.known, mismatch.value.got) == (DIM, 3)
        for words in (f"holds {DIM}-dimensional", "the query has 3", "new log", "rebuild"):
            assert words in str(mismatch.value)
        with pytest.raises(InvalidInput, match="no vectors"):
            await reader.query(collection="nothing", query_embeddings=basis(0))
        with pytest.raises(InvalidInput, match="NaN"):
            await reader.query(collection="words", query_embeddings=basis(0) * np.nan)
        with pytest.raises(InvalidInput, match="operator"):
            await reader.get(collection="words", where={"n": {"$regex": "x"}})
    with pytest.raises(InvalidInput, match="consistency"):
        async with Reader.open(config, consistency="eventual", cache_dir=tmp_path):  # type: ignore[arg-type]
            pass


async def test_a_fresh_read_with_nothing_new_costs_two_requests_over_http(
    log: DeltaLog, config: LogConfig, tmp_path: Path
) -> None:
    """One state read and one listing, counted on the wire to moto's server: the
    counter is not read, the snapshot is not downloaded again."""
    await log.append(upsert_words(["a"], basis(0), "Costco"))
    await _compacted(log, config, tmp_path)
    await log.append(upsert_words(["b"], basis(1), "Costco"))  # a tail
    assert config.endpoint_url is not None
    async with FaultProxy(config.endpoint_url) as proxy:
        via_proxy = replace(config, endpoint_url=proxy.url)
        async with Reader.open(via_proxy, consistency="fresh", cache_dir=tmp_path / "r") as reader:
            assert await _ids(reader) == ["a", "b"]
            before = Counter(proxy.statistics().operations)
            assert await _ids(reader) == ["a", "b"]
            spent = Counter(proxy.statistics().operations) - before
    assert spent == {"GetItem": 1, "ListObjectsV2": 1}


async def test_fresh_and_snapshot_reads_while_a_tail_exists(
    log: DeltaLog, config: LogConfig, tmp_path: Path, rng: np.random.Generator
) -> None:
    """With a committed snapshot and a tail after it, a snapshot read is the fold
    at hwm and a fresh read the fold at the head, for get and query alike."""
    for delta in random_word_deltas(rng, 12):
        await log.append(delta)
    await _compacted(log, config, tmp_path)
    for delta in random_word_deltas(rng, 12):
        await log.append(delta)
    entries = [item async for item in log.read()]
    at_hwm, at_head = oracle_state(entries[:12]), oracle_state(entries)
    queries = rng.uniform(-1, 1, (3, DIM)).astype(np.float32)
    async with (
        Reader.open(config, cache_dir=tmp_path / "s") as snapshot,
        Reader.open(config, consistency="fresh", cache_dir=tmp_path / "f") as fresh,
    ):
        for reader, want in ((snapshot, at_hwm), (fresh, at_head)):
            records = want.get("words", {})
            assert_get_matches(await reader.get(collection="words"), records, reader.consistency)
            for n in (1, 3, 12):
                got = await reader.query(collection="words", query_embeddings=queries, n_results=n)
                assert_query_matches(got, records, queries, n, f"{reader.consistency} n={n}")
        assert (snapshot.statistics().hwm, fresh.statistics().tail_seq) == (12, 24)


async def test_a_query_drops_snapshot_hits_the_tail_deleted_or_replaced(
    log: DeltaLog, config: LogConfig, tmp_path: Path
) -> None:
    """The snapshot holds a, b, c; the tail deletes b and moves a far away. Near
    where a and b were, the query must skip both snapshot hits, still return
    n_results records, and show a once, at its new place."""
    await log.append(upsert_words(["a", "b", "c"], np.vstack([basis(0), basis(1), basis(2)]), "X"))
    await _compacted(log, config, tmp_path)
    await log.append(delete("b"))
    await log.append(upsert_words(["a"], basis(5, 10.0), "Y"))
    near_a_and_b = (basis(0) + basis(1)) / 2
    async with Reader.open(config, consistency="fresh", cache_dir=tmp_path / "r") as reader:
        two = await reader.query(collection="words", query_embeddings=near_a_and_b, n_results=2)
        assert two["ids"] == [["c", "a"]]
        assert two["distances"][0] == pytest.approx([1.5, 100.5])
        assert two["metadatas"][0][1] == {"merchant_name": "Y", "n": 0}
        one = await reader.query(collection="words", query_embeddings=basis(1), n_results=1)
        assert one["ids"] == [["c"]], "b is deleted in the tail"
        old_place = await reader.query(
            collection="words",
            query_embeddings=basis(0),
            n_results=3,
            where={"merchant_name": "X"},
        )
        assert old_place["ids"] == [["c"]], "a moved to Y in the tail"


# -- one Reader shared by concurrent calls ----------------------------------------


class Gate:
    """Holds one call of a ``ChromaSink`` read until the test opens the gate.

    ``after=True`` holds it once Chroma has answered, before the caller
    resumes: the moment a call is "waiting on Chroma" in a worker thread.
    """

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        method: str,
        when: Callable[..., bool],
        *,
        after: bool,
    ) -> None:
        self.reached, self.opened = anyio.Event(), anyio.Event()
        self._armed = True
        original = getattr(ChromaSink, method)
        gate = self

        async def held(sink: ChromaSink, *args: Any, **kwargs: Any) -> Any:
            hold = gate._armed and when(*args)
            gate._armed = gate._armed and not hold
            if hold and not after:
                await gate.hold()
            result = await original(sink, *args, **kwargs)
            if hold and after:
                await gate.hold()
            return result

        monkeypatch.setattr(ChromaSink, method, held)

    async def hold(self) -> None:
        self.reached.set()
        await self.opened.wait()


async def _ids(reader: Reader) -> list[str]:
    return sorted((await reader.get(collection="words"))["ids"])


async def _until_switched(reader: Reader, loads: int) -> list[str]:
    """Calls until one answers from a checkpoint loaded behind the calls (the reader's
    ``loads``-th load); its ids."""
    with anyio.fail_after(60):
        while True:
            ids = await _ids(reader)
            if reader.statistics().snapshot_loads >= loads:
                return ids
            await anyio.sleep(0.01)


def _work_copies(config: LogConfig, cache: Path) -> list[Path]:
    """The reader's working copies: one per snapshot it holds open."""
    return list((cache / config.keys.cache_name / "work").iterdir())


async def _w_x_then_delete_x(log: DeltaLog, config: LogConfig, tmp_path: Path) -> None:
    """S1 at hwm 1 holds W and X; seq 2 deletes X (the tail)."""
    await log.append(upsert_words(["W", "X"], np.vstack([basis(0), basis(1)]), "Costco"))
    await _compacted(log, config, tmp_path)
    await log.append(delete("X"))


def _held_on_shadowed_x(monkeypatch: pytest.MonkeyPatch) -> Gate:
    """Holds the view build of a call whose tail deletes X, once Chroma answered."""
    return Gate(monkeypatch, "select", lambda _c, ids, *_: ids == ["X"], after=True)


async def _while_a_waits(
    reader: Reader, gate: Gate, meanwhile: Callable[[], Awaitable[None]]
) -> dict[str, list[str]]:
    """Call A runs until the gate holds it; ``meanwhile`` runs, then call B; then A
    goes on; call C comes after both."""
    answers: dict[str, list[str]] = {}

    async def call_a() -> None:
        answers["A"] = await _ids(reader)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call_a)
            await gate.reached.wait()
            await meanwhile()
            answers["B"] = await _ids(reader)
            gate.opened.set()
    answers["C"] = await _ids(reader)
    return answers


async def test_a_call_that_built_its_view_before_a_commit_stores_no_stale_view(
    log: DeltaLog, config: LogConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10, bug 1: call A builds its view of the tail (seq 2 deletes X) on S1;
    a commit of S2 at hwm 3 (X re-added, Y added) lands and call B switches to it;
    A must neither answer ['W', 'Y'] nor leave its S1-era view for later calls."""
    await _w_x_then_delete_x(log, config, tmp_path)
    gate = _held_on_shadowed_x(monkeypatch)

    async def commit_s2() -> None:
        await log.append(upsert_words(["X", "Y"], np.vstack([basis(1), basis(2)]), "Aldi"))
        await _compacted(log, config, tmp_path, **EVERY_RUN)

    async with Reader.open(config, consistency="fresh", cache_dir=tmp_path / "r") as reader:
        answers = await _while_a_waits(reader, gate, commit_s2)
        assert reader.statistics().hwm == 3
    assert answers == {"A": ["W"], "B": ["W", "X", "Y"], "C": ["W", "X", "Y"]}


async def test_a_call_that_built_its_view_before_a_new_entry_hides_no_later_write(
    log: DeltaLog, config: LogConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10, bug 1 without a commit: A's view of seq 2 must not replace the
    view B built after folding seq 3, or a producer does not see its own write."""
    await _w_x_then_delete_x(log, config, tmp_path)
    gate = _held_on_shadowed_x(monkeypatch)

    async def append_z() -> None:
        await log.append(upsert_words(["Z"], basis(3), "Costco"))  # our own write

    async with Reader.open(config, consistency="fresh", cache_dir=tmp_path / "r") as reader:
        answers = await _while_a_waits(reader, gate, append_z)
        assert reader.statistics().tail_seq == 3
    assert answers == {"A": ["W"], "B": ["W", "Z"], "C": ["W", "Z"]}


async def test_a_snapshot_stays_open_until_the_calls_using_it_return(
    log: DeltaLog, config: LogConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call still querying S1 while another call switches to S2 finishes on S1;
    S1's Chroma client and working copy go once it returns."""
    await log.append(upsert_words(["W", "X"], np.vstack([basis(0), basis(1)]), "Costco"))
    await _compacted(log, config, tmp_path)
    cache = tmp_path / "reader"
    gate = Gate(monkeypatch, "query", lambda *_: True, after=False)
    answers: dict[str, list[str]] = {}
    async with Reader.open(config, cache_dir=cache) as reader:

        async def call_a() -> None:
            got = await reader.query(collection="words", query_embeddings=basis(1), n_results=5)
            answers["A"] = sorted(got["ids"][0])

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call_a)
                await gate.reached.wait()
                await log.append(delete("X"))
                await _compacted(log, config, tmp_path, **EVERY_RUN)
                answers["B"] = await _until_switched(reader, 2)
                assert len(_work_copies(config, cache)) == 2, "S1 is still in use"
                gate.opened.set()
        assert len(_work_copies(config, cache)) == 1, "S1 was closed by the last call out"
        assert reader.statistics().snapshot_loads == 2
    assert answers == {"A": ["W", "X"], "B": ["W"]}
    assert _work_copies(config, cache) == []


async def test_a_snapshot_that_chroma_cannot_open_leaves_no_working_copy(
    log: DeltaLog, config: LogConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await log.append(upsert_words(["W"], basis(0), "Costco"))
    await _compacted(log, config, tmp_path)

    async def refuse(path: Path, **_: Any) -> ChromaSink:
        raise DataError(f"chroma could not open {path}: injected")

    monkeypatch.setattr(ChromaSink, "open", refuse)
    with pytest.raises(DataError, match="injected"):
        async with Reader.open(config, cache_dir=tmp_path / "r"):
            pass
    assert _work_copies(config, tmp_path / "r") == []


# -- readers and retention ---------------------------------------------------------


class _PrunedBeforeDownload:
    """An S3 store on which something happens just before a chosen download."""

    def __init__(self, inner: S3Store, key: str, before: Callable[[], Awaitable[None]]) -> None:
        self.inner, self._key, self._before = inner, key, before
        self.downloads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def download_file(self, key: str, path: Path) -> Transferred | None:
        self.downloads.append(key)
        if key == self._key:
            await self._before()
        return await self.inner.download_file(key, path)


async def test_a_snapshot_pruned_before_its_download_sends_the_reader_to_the_newer_one(
    log: DeltaLog, config: LogConfig, tmp_path: Path
) -> None:
    """Retention deletes S1 between the reader's state read and its download: not
    corruption, the state has moved on to S2, which the reader loads instead."""
    await log.append(upsert_words(["W"], basis(0), "Costco"))
    await _compacted(log, config, tmp_path)
    first = await log.table.read_state(log.keys.log_id)
    assert first.snapshot_key is not None

    async def commit_s2_and_prune_s1() -> None:
        await log.append(upsert_words(["X"], basis(1), "Costco"))
        await _compacted(log, config, tmp_path, retain=1, **EVERY_RUN)
        assert await log.store.get(first.snapshot_key or "") is None, "retention deleted S1"

    store = _PrunedBeforeDownload(
        await S3Store.connect(config), first.snapshot_key, commit_s2_and_prune_s1
    )
    try:
        async with Reader.open(config, cache_dir=tmp_path / "r", store=store) as reader:
            assert await _ids(reader) == ["W", "X"]
            stats = reader.statistics()
            assert (stats.hwm, stats.snapshot_loads) == (2, 1)
            assert stats.snapshot_key != first.snapshot_key
    finally:
        await store.inner.aclose()
    assert store.downloads == [first.snapshot_key, stats.snapshot_key]


async def test_a_committed_snapshot_that_is_missing_is_a_data_error(
    log: DeltaLog, config: LogConfig, tmp_path: Path
) -> None:
    """Still referenced by the state item: that is data loss, and no retry loop."""
    await log.append(upsert_words(["W"], basis(0), "Costco"))
    await _compacted(log, config, tmp_path)
    state = await log.table.read_state(log.keys.log_id)
    assert state.snapshot_key is not None
    await log.store.delete(state.snapshot_key)
    with pytest.raises(DataError, match="missing") as caught:
        async with Reader.open(config, cache_dir=tmp_path / "r"):
            pass
    assert caught.value.key == state.snapshot_key
