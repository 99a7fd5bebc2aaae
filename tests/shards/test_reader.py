"""Reading a sharded log as one index (DESIGN.md "Shards": consistent reads, fan-out).

On the memory adapters and on moto's server, with real Chroma: a reader of a
3-shard log answers ``get`` and ``query`` as a reader of the same deltas in
one index does; snapshot reads show every shard at one cut (the greatest
committed shard hwm) whatever order the shards commit in; fresh reads go
to the head; shards are opened and queried concurrently, at most
``concurrency`` at once; ``get(ids)`` asks only the ids' shards.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from compactor import Compactor, Limits
from deltalog import DeltaLog, Reader
from deltalog.keys import Shard, shard_of
from deltalog.shards import init_layout
from deltalog.snapshot.sink import ChromaSink
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import MemoryTable
from tests.builders import delete
from tests.compaction import log_entries
from tests.compactor.conftest import Backend
from tests.oracle import oracle_state
from tests.reading import (
    DIM,
    assert_get_matches,
    assert_query_matches,
    random_word_deltas,
    upsert_words,
)

SHARDS = 3


async def _append(log: DeltaLog, rng: np.random.Generator, count: int) -> None:
    for delta in random_word_deltas(rng, count):
        await log.append(delta)


async def _shard(backend: Backend, tmp_path: Path, index: int, **options: Any) -> Compactor:
    return Compactor(
        backend.config,
        shard=Shard(1, index, SHARDS),
        store=backend.store,
        table=backend.table,
        cache_dir=tmp_path / "compactor",
        **options,
    )


def _reader(backend: Backend, tmp_path: Path, consistency: str = "snapshot", **kw: Any) -> Any:
    return Reader.open(
        backend.config,
        consistency=consistency,  # type: ignore[arg-type]
        cache_dir=tmp_path / f"reader-{consistency}",
        store=backend.store,
        table=backend.table,
        **kw,
    )


async def _model(log: DeltaLog, seq: int) -> dict[str, Any]:
    return oracle_state(await log_entries(log, seq)).get("words", {})


async def _check(reader: Reader, want: dict[str, Any], rng: np.random.Generator) -> None:
    assert_get_matches(await reader.get(collection="words"), want, "get")
    if want:
        queries = rng.uniform(-1, 1, (2, DIM)).astype(np.float32)
        got = await reader.query(collection="words", query_embeddings=queries, n_results=3)
        assert_query_matches(got, want, queries, 3, "query")


async def test_snapshot_reads_show_every_shard_at_the_greatest_committed_hwm(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Shards commit in any order (0 to 8, 2 to 16, 1 never): reads show the fold at 16."""
    await init_layout(backend.table, backend.config.keys, SHARDS, now=time.time())
    async with backend.open_log() as log:
        await _append(log, rng, 20)
        for index, entries in ((0, 8), (2, 16)):
            async with await _shard(backend, tmp_path, index, limits=Limits(entries)) as c:
                assert (await c.run_once()).hwm_after == entries
        async with (
            _reader(backend, tmp_path) as snapshot,
            _reader(backend, tmp_path, "fresh") as fresh,
        ):
            stats = snapshot.statistics()
            assert (stats.hwm, stats.shards) == (16, SHARDS)
            await _check(snapshot, await _model(log, 16), rng)
            await _check(fresh, await _model(log, 20), rng)
            assert fresh.statistics().tail_seq == 20


async def test_reads_stay_consistent_while_shards_commit_in_any_order(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    await init_layout(backend.table, backend.config.keys, SHARDS, now=time.time())
    async with backend.open_log() as log, _reader(backend, tmp_path) as reader:
        cut = 0
        for step in range(6):
            await _append(log, rng, 3)
            index = int(rng.integers(SHARDS))
            entries = int(rng.integers(1, 6))
            async with await _shard(backend, tmp_path, index, limits=Limits(entries)) as c:
                cut = max(cut, (await c.run_once()).hwm_after)
            await _check(reader, await _model(log, cut), rng)
            assert reader.statistics().hwm == cut, step


async def test_a_sharded_log_reads_like_the_same_deltas_in_one_index(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Same ids, documents, metadata and distances (an exact index at this size)."""
    one = replace(backend.config, log=f"{backend.config.log}-one")
    one_backend = replace(backend, config=one)
    await init_layout(backend.table, backend.config.keys, SHARDS, now=time.time())
    deltas = random_word_deltas(rng, 24)
    async with backend.open_log() as log, one_backend.open_log() as plain:
        for delta in deltas:
            await log.append(delta)
            await plain.append(delta)
    for index in range(SHARDS):
        async with await _shard(backend, tmp_path, index, limits=Limits(5 * index + 3)) as c:
            await c.run_once()
    async with one_backend.compactor(cache_dir=tmp_path / "one", limits=Limits(13)) as c:
        await c.run_once()
    queries = rng.uniform(-1, 1, (3, DIM)).astype(np.float32)
    for consistency in ("snapshot", "fresh"):
        async with (
            _reader(backend, tmp_path, consistency) as sharded,
            Reader.open(
                one,
                consistency=consistency,
                cache_dir=tmp_path / f"one-{consistency}",
                store=backend.store,
                table=backend.table,
            ) as single,
        ):
            if consistency == "snapshot":  # the one index at the same seq as the shards' cut
                assert sharded.statistics().hwm == 13 == single.statistics().hwm
            for where in (None, {"merchant_name": "X"}):
                a = await sharded.query(
                    collection="words", query_embeddings=queries, n_results=4, where=where
                )
                b = await single.query(
                    collection="words", query_embeddings=queries, n_results=4, where=where
                )
                assert a["ids"] == b["ids"] and a["documents"] == b["documents"]
                assert a["metadatas"] == b["metadatas"]
                assert np.allclose(a["distances"], b["distances"], rtol=1e-5, atol=1e-5)
                got_a = await sharded.get(collection="words", where=where)
                got_b = await single.get(collection="words", where=where)
                assert sorted(zip(got_a["ids"], got_a["documents"], strict=True)) == sorted(
                    zip(got_b["ids"], got_b["documents"], strict=True)
                )
            ids = ["b", "zz", "a", "e"]
            by_ids = await sharded.get(collection="words", ids=ids)
            assert sorted(by_ids["ids"]) == sorted(
                (await single.get(collection="words", ids=ids))["ids"]
            )


class Gate:
    """Holds each call until ``expect`` calls are in flight at once (or 10 s pass),
    and records the most seen at once."""

    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.now = self.most = 0
        self.everyone = anyio.Event()

    async def through(self, call: Callable[[], Awaitable[Any]]) -> Any:
        self.now += 1
        self.most = max(self.most, self.now)
        if self.now >= self.expect:
            self.everyone.set()
        try:
            with anyio.move_on_after(10):
                await self.everyone.wait()
            return await call()
        finally:
            self.now -= 1


def _gate_open(monkeypatch: pytest.MonkeyPatch, gate: Gate) -> None:
    open_ = ChromaSink.open

    async def gated(cls: type[ChromaSink], *args: Any, **kwargs: Any) -> ChromaSink:
        sink: ChromaSink = await gate.through(lambda: open_(*args, **kwargs))
        return sink

    monkeypatch.setattr(ChromaSink, "open", classmethod(gated))


def _gate_query(monkeypatch: pytest.MonkeyPatch, gate: Gate) -> None:
    query = ChromaSink.query

    async def gated(self: ChromaSink, *args: Any, **kwargs: Any) -> Any:
        return await gate.through(lambda: query(self, *args, **kwargs))

    monkeypatch.setattr(ChromaSink, "query", gated)


@pytest.mark.parametrize("concurrency", [2, 8])
async def test_shards_are_opened_and_queried_concurrently_within_the_bound(
    concurrency: int,
    rng: np.random.Generator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, table = MemoryStore(), MemoryTable()
    backend = Backend("memory", _memory_config(), store, table, lease_ttl=0.3)
    await init_layout(table, backend.config.keys, SHARDS, now=time.time())
    async with backend.open_log() as log:
        await _append(log, rng, 12)
    for index in range(SHARDS):
        async with await _shard(backend, tmp_path, index) as c:
            await c.run_once()
    expect = min(concurrency, SHARDS)
    opened, queried = Gate(expect), Gate(expect)
    _gate_open(monkeypatch, opened)
    _gate_query(monkeypatch, queried)
    started = time.monotonic()
    async with _reader(backend, tmp_path, concurrency=concurrency) as reader:
        assert opened.most == expect
        await reader.query(collection="words", query_embeddings=np.ones((1, DIM)), n_results=2)
        assert queried.most == expect
    assert time.monotonic() - started < 10, "no call waited for a gate that never opened"


def _memory_config() -> Any:
    from tests.compactor.conftest import MEMORY

    return MEMORY


async def test_get_by_ids_asks_only_their_shards(
    rng: np.random.Generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, table = MemoryStore(), MemoryTable()
    backend = Backend("memory", _memory_config(), store, table, lease_ttl=0.3)
    await init_layout(table, backend.config.keys, SHARDS, now=time.time())
    async with backend.open_log() as log:
        await _append(log, rng, 12)
    for index in range(SHARDS):
        async with await _shard(backend, tmp_path, index) as c:
            await c.run_once()
    asked: list[str] = []
    select = ChromaSink.select

    async def recording(self: ChromaSink, collection: str, ids: Any, *rest: Any) -> Any:
        asked.append(str(self.path))
        return await select(self, collection, ids, *rest)

    async with _reader(backend, tmp_path) as reader:
        monkeypatch.setattr(ChromaSink, "select", recording)
        await reader.get(collection="words", ids=["a"])
        shard = shard_of("words", "a", SHARDS)
        (path,) = asked
        assert f"/{backend.config.keys.cache_name}#g1-s{shard}/" in path, path
        asked.clear()
        await reader.get(collection="words", where={"merchant_name": "X"})
        assert len(asked) == SHARDS


async def test_a_call_answers_every_shard_at_the_cut_it_pinned(
    rng: np.random.Generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Call A pins the three shards at seq 2 and is held building shard 0's view (one
    shard at a time); call B folds seq 3 into every shard and answers; A then builds
    shards 1 and 2 from what it pinned, not from seq 3: one cut for every shard."""
    store, table = MemoryStore(), MemoryTable()
    backend = Backend("memory", _memory_config(), store, table, lease_ttl=0.3)
    await init_layout(table, backend.config.keys, SHARDS, now=time.time())
    ids = [f"w{i}" for i in range(12)]
    async with backend.open_log() as log:
        await log.append(upsert_words(ids, rng.uniform(-1, 1, (12, DIM)).astype(np.float32), "X"))
        for index in range(SHARDS):
            async with await _shard(backend, tmp_path, index) as c:
                await c.run_once()
        await log.append(delete(*ids[:6]))  # seq 2, in the tail of every shard
        assert {shard_of("words", i, SHARDS) for i in ids[:6]} == set(range(SHARDS))
        held, opened = anyio.Event(), anyio.Event()
        select = ChromaSink.select

        async def gated(self: ChromaSink, collection: str, chosen: Any, *rest: Any) -> Any:
            rows = await select(self, collection, chosen, *rest)
            if chosen and not held.is_set():  # the first view build's lookup
                held.set()
                await opened.wait()
            return rows

        answers: dict[str, list[str]] = {}
        async with _reader(backend, tmp_path, "fresh", concurrency=1) as reader:
            monkeypatch.setattr(ChromaSink, "select", gated)

            async def call_a() -> None:
                answers["A"] = sorted((await reader.get(collection="words"))["ids"])

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call_a)
                    await held.wait()
                    await log.append(delete(*ids[6:]))  # seq 3: every shard again
                    answers["B"] = sorted((await reader.get(collection="words"))["ids"])
                    opened.set()
    assert answers == {"A": sorted(ids[6:]), "B": []}


async def test_a_shards_new_checkpoint_loads_behind_while_every_shard_answers(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """While shard 1's new checkpoint download is held, calls answer the fold at the new
    cut from the checkpoint it holds plus the log after it; once let go, it switches."""
    from tests.compactor.test_checkpoints import _DownloadGate

    await init_layout(backend.table, backend.config.keys, SHARDS, now=time.time())
    gate = _DownloadGate(backend.store)
    async with backend.open_log() as log:
        await _append(log, rng, 6)
        for index in range(SHARDS):
            async with await _shard(backend, tmp_path, index) as c:
                await c.run_once()
        async with Reader.open(
            backend.config, cache_dir=tmp_path / "r", store=gate, table=backend.table
        ) as reader:
            await _check(reader, await _model(log, 6), rng)
            loads = reader.statistics().snapshot_loads
            gate.armed = True
            await _append(log, rng, 4)
            async with await _shard(backend, tmp_path, 1) as c:
                assert (await c.run_once(checkpoint=True)).checkpoint == "requested"
            with anyio.fail_after(30):  # a call waiting for the held download fails here
                await _check(reader, await _model(log, 10), rng)
                await gate.reached.wait()
                await _check(reader, await _model(log, 10), rng)
            assert reader.statistics().snapshot_loads == loads, "still the one it holds"
            gate.go.set()
            with anyio.fail_after(30):
                while reader.statistics().snapshot_loads == loads:
                    await _check(reader, await _model(log, 10), rng)
                    await anyio.sleep(0.01)
            await _check(reader, await _model(log, 10), rng)
