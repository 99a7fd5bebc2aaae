"""One fresh ``Reader`` shared by concurrent calls while appends and compactions run.

On moto's server with real Chroma: two writers append, a compactor commits
whenever something new arrived, and several tasks call ``get`` on one
reader (``get``, and ``query`` for every record, whose distances show the
vectors), all at once. Every answer must be the oracle's fold at one seq
(not a mix of two), and each task's answers move forward. Once the writes
stop, every task's ``get`` and ``query`` equal the oracle at the head.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np
import pytest

from compactor import Compactor
from deltalog import Delta, DeltaLog, LogConfig, Reader
from deltalog.entry import Metadata
from deltalog.fold import Record
from deltalog.reader import GetResult, QueryResult
from tests.oracle import OracleState, nearest, oracle_state
from tests.reading import (
    ABS,
    DIM,
    REL,
    assert_get_matches,
    assert_query_matches,
    basis,
    random_word_deltas,
    upsert_words,
)

WRITES = 40
CALLERS = 4

Answer = tuple[tuple[str, str | None, tuple[tuple[str, object], ...]], ...]
Seen = tuple[Answer, dict[str, float]]
"""An answer's rows, and the distance of each id from ``QUERY`` (a ``get``: none)."""

ALL = 6  # random_word_deltas touches six ids: a query for six returns every record


def _rows(ids: list[str], documents: list[str | None], metadatas: list[Metadata | None]) -> Answer:
    rows = zip(ids, documents, metadatas, strict=True)
    return tuple(sorted((i, d, tuple(sorted((m or {}).items()))) for i, d, m in rows))


def _of_get(got: GetResult) -> Seen:
    return _rows(got["ids"], got["documents"], got["metadatas"]), {}


def _of_query(got: QueryResult) -> Seen:
    rows = _rows(got["ids"][0], got["documents"][0], got["metadatas"][0])
    return rows, dict(zip(got["ids"][0], got["distances"][0], strict=True))


def _of_records(records: dict[str, Record]) -> Answer:
    ids = list(records)
    return _rows(ids, [records[i].document for i in ids], [records[i].metadata for i in ids])


class _Changes:
    """Wakes a waiting task when something happened (an append, a call)."""

    def __init__(self) -> None:
        self.event = anyio.Event()

    def happened(self) -> None:
        self.event.set()

    async def wait(self) -> None:
        await self.event.wait()
        self.event = anyio.Event()


async def test_concurrent_calls_on_one_reader_while_appends_and_compactions_run(
    log: DeltaLog, config: LogConfig, tmp_path: Path, rng: np.random.Generator
) -> None:
    deltas = random_word_deltas(rng, WRITES)
    seen: list[list[Seen]] = [[] for _ in range(CALLERS)]
    query = rng.uniform(-1, 1, (1, DIM)).astype(np.float32)
    writes_done, changes, called = anyio.Event(), _Changes(), _Changes()
    compactions = 0

    async def write(part: list[Delta]) -> None:
        for delta in part:
            await log.append(delta)
            changes.happened()
            await called.wait()  # let the callers see it: writes interleave with calls

    async def compact() -> None:
        nonlocal compactions
        async with Compactor(config, cache_dir=tmp_path / "compactor", grace=3600) as c:
            while not writes_done.is_set():
                with anyio.move_on_after(60):  # or the writes ended meanwhile
                    await changes.wait()
                compactions += (await c.run_once()).status == "applied"

    await log.append(upsert_words(["a"], basis(0), "X"))  # queries need a dimension
    async with Reader.open(config, consistency="fresh", cache_dir=tmp_path / "r") as reader:

        async def call(task: int) -> None:
            while not writes_done.is_set():
                if len(seen[task]) % 2:
                    got = await reader.query(
                        collection="words", query_embeddings=query, n_results=ALL
                    )
                    seen[task].append(_of_query(got))
                else:
                    seen[task].append(_of_get(await reader.get(collection="words")))
                called.happened()

        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                tg.start_soon(compact)
                for task in range(CALLERS):
                    tg.start_soon(call, task)
                async with anyio.create_task_group() as writers:
                    writers.start_soon(write, deltas[::2])
                    writers.start_soon(write, deltas[1::2])
                writes_done.set()
                changes.happened()
        folds = await _folds(log)
        head = folds[-1].get("words", {})
        queries = rng.uniform(-1, 1, (3, DIM)).astype(np.float32)

        async def final(task: int) -> None:
            assert_get_matches(await reader.get(collection="words"), head, f"task {task}")
            got = await reader.query(collection="words", query_embeddings=queries, n_results=4)
            assert_query_matches(got, head, queries, 4, f"task {task}")

        async with anyio.create_task_group() as tg:
            for task in range(CALLERS):
                tg.start_soon(final, task)
    _assert_each_answer_is_one_fold_and_moves_forward(seen, folds, query[0])
    print(f"compactions: {compactions}, calls: {sum(len(s) for s in seen)}")
    assert compactions >= 1


async def _folds(log: DeltaLog) -> list[OracleState]:
    """The oracle's state at every seq, from 0 to the head."""
    states: list[OracleState] = [{}]
    async for seq, entry in log.read():
        states.append(oracle_state([(seq, entry)], states[-1]))
    return states


def _assert_each_answer_is_one_fold_and_moves_forward(
    seen: list[list[Seen]], folds: list[OracleState], query: np.ndarray
) -> None:
    at: dict[Answer, list[int]] = {}
    for seq, state in enumerate(folds):
        at.setdefault(_of_records(state.get("words", {})), []).append(seq)
    for task, answers in enumerate(seen):
        floor = 0
        for n, (rows, distances) in enumerate(answers):
            seqs = [
                s
                for s in at.get(rows, [])
                if s >= floor and _same_distances(distances, folds[s].get("words", {}), query)
            ]
            assert seqs, f"task {task}, call {n}: the fold at no seq from {floor} on: {rows}"
            floor = seqs[0]


def _same_distances(got: dict[str, float], records: dict[str, Record], query: np.ndarray) -> bool:
    want = {id_: d for d, id_ in nearest(records, query, len(records))}
    return all(d == pytest.approx(want[id_], rel=REL, abs=ABS) for id_, d in got.items())
