"""Sharded logs on Lambda, against moto's server (S3, DynamoDB and a real SQS shard queue).

- a scheduled event on a sharded log sends one task per shard to the shard
  queue and compacts nothing itself; each task, delivered as Lambda's poller
  delivers it, compacts its shard alone (its own invocation), with EMF
  lines per log and per log and shard;
- without a shard queue the scheduled invocation compacts every shard;
- ``DELTALOG_SHARDS`` creates a new log's layout, and a changed count
  reshards the log through the same tasks, then switches;
- the query function in fan-out mode asks one invocation per shard and
  answers as one index.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compactor import Limits
from compactor.shards import ShardedCompactor
from deltalog import DeltaLog, LogConfig
from deltalog.keys import Shard
from deltalog.receipts.embed import HashingEmbedder
from deltalog.receipts.generate import generate_receipts
from deltalog.receipts.ingest import ReceiptProducer
from deltalog.receipts.model import line_records
from deltalog.shards import init_layout
from deltalog_lambda.compact import CompactHandler
from deltalog_lambda.query import QueryHandler
from deltalog_lambda.scatter import scatter
from deltalog_lambda.settings import Settings
from tests.builders import delta
from tests.deltalog_lambda.conftest import DIM
from tests.deltalog_lambda.lambda_aws import Context, Queue, emf_lines, invoke
from tests.deltalog_lambda.test_query import url_request
from tests.lambda_server import LambdaServer


async def _hwms(config: LogConfig, generation: int, shards: int) -> list[int]:
    async with DeltaLog.open(config) as log:
        keys = [log.keys.for_shard(Shard(generation, i, shards)) for i in range(shards)]
        return [(await log.table.read_state(k.log_id, sk=k.state_sk)).hwm for k in keys]


async def _sharded_log(config: LogConfig, rng: np.random.Generator, shards: int) -> int:
    async with DeltaLog.open(config) as log:
        await init_layout(log.table, log.keys, shards, now=time.time())
        for i in range(4):
            await log.append(delta(rng, f"d{i}", rows=6))
        return await log.head()


@pytest.fixture
async def shard_queue(
    lambda_env: LogConfig, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Queue]:
    async with AsyncExitStack() as stack:
        queue = await Queue.create(stack, lambda_env, f"shards-{lambda_env.log}")
        monkeypatch.setenv("DELTALOG_SHARD_QUEUE_URL", queue.url)
        yield queue


@pytest.fixture
def compact(lambda_env: LogConfig, shard_queue: Queue) -> Iterator[CompactHandler]:
    handler = CompactHandler()
    yield handler
    handler.close()


async def _run_tasks(
    compact: CompactHandler, queue: Queue, capsys: pytest.CaptureFixture[str]
) -> list[dict[str, Any]]:
    """Deliver every task as Lambda's poller does (batch size 1); each invocation's answer."""
    answers = []
    for message in await queue.receive_all():
        capsys.readouterr()
        answers.append(await invoke(compact, queue.event([message]), Context()))
        (log_line, shard_line) = emf_lines(capsys.readouterr().out)
        assert "shard" not in log_line and shard_line["shard"] == str(
            answers[-1]["results"][0]["shard"]
        )
        await queue.settle([message], {"batchItemFailures": []})
    return answers


async def test_a_scheduled_event_fans_out_one_task_per_shard(
    compact: CompactHandler,
    lambda_env: LogConfig,
    shard_queue: Queue,
    rng: np.random.Generator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    head = await _sharded_log(lambda_env, rng, 3)
    answer = await invoke(compact, {"log": lambda_env.log}, Context())
    assert answer["results"] == []
    assert answer["dispatched"] == [
        {"log": lambda_env.log, "shard": i, "generation": 1} for i in range(3)
    ]
    assert await _hwms(lambda_env, 1, 3) == [0, 0, 0], "the dispatcher compacted nothing"
    answers = await _run_tasks(compact, shard_queue, capsys)
    assert sorted(a["results"][0]["shard"] for a in answers) == [0, 1, 2]
    assert await _hwms(lambda_env, 1, 3) == [head] * 3


async def test_without_a_shard_queue_one_invocation_compacts_every_shard(
    lambda_env: LogConfig, rng: np.random.Generator
) -> None:
    head = await _sharded_log(lambda_env, rng, 2)
    handler = CompactHandler()
    try:
        answer = await invoke(handler, {"log": lambda_env.log}, Context())
    finally:
        handler.close()
    assert [r["shard"] for r in answer["results"]] == [0, 1]
    assert await _hwms(lambda_env, 1, 2) == [head, head]


async def test_the_stack_shard_count_creates_and_reshards_the_layout(
    lambda_env: LogConfig,
    shard_queue: Queue,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DELTALOG_SHARDS", "2")
    monkeypatch.setenv("DELTALOG_RESHARD_LAG", "0")
    handler = CompactHandler()
    try:
        first = await invoke(handler, {"log": lambda_env.log}, Context())
        assert len(first["dispatched"]) == 2, "a new log gets the stack's shard count"
        async with DeltaLog.open(lambda_env) as log:
            for i in range(4):
                await log.append(delta(rng, f"d{i}", rows=6))
            head = await log.head()
        await _run_tasks(handler, shard_queue, capsys)
        assert await _hwms(lambda_env, 1, 2) == [head, head]
    finally:
        handler.close()
    monkeypatch.setenv("DELTALOG_SHARDS", "3")  # the stack's parameter changed
    handler = CompactHandler()
    try:
        proposed = await invoke(handler, {"log": lambda_env.log}, Context())
        tasks = {(t["generation"], t["shard"]) for t in proposed["dispatched"]}
        assert tasks == {(1, 0), (1, 1), (2, 0), (2, 1), (2, 2)}, "old and new shards"
        await _run_tasks(handler, shard_queue, capsys)
        switched = await invoke(handler, {"log": lambda_env.log}, Context())
        assert {(t["generation"], t["shard"]) for t in switched["dispatched"]} == {
            (2, 0),
            (2, 1),
            (2, 2),
        }
        stale = await shard_queue.receive_all()  # the new generation's tasks
        assert len(stale) == 3
        for message in stale:
            await shard_queue.settle([message], {"batchItemFailures": []})
        old = json.dumps({"log": lambda_env.log, "shard": 0, "generation": 1})
        await shard_queue.send([old])
        (message,) = await shard_queue.receive_all()
        dropped = await invoke(handler, shard_queue.event([message]), Context())
        assert dropped == {"results": []}, "a task of a replaced generation is dropped"
    finally:
        handler.close()
    async with DeltaLog.open(lambda_env) as log:
        layout = await log.table.read_layout(log.keys.log_id)
        assert (layout.shards, layout.generation, layout.floor) == (3, 2, head)


async def test_the_query_fan_out_asks_one_invocation_per_shard(
    lambda_env: LogConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Through botocore's Lambda client and a local stand-in of ``Invoke``; each shard's
    invocation has its own handler (environment, ``/tmp``)."""
    receipts = list(generate_receipts(4, seed=9))
    async with DeltaLog.open(lambda_env) as log:
        await init_layout(log.table, log.keys, 3, now=time.time())
        async with ReceiptProducer(log, HashingEmbedder(DIM)) as producer:
            await producer.add_many(receipts)
    async with ShardedCompactor(lambda_env, cache_dir=tmp_path / "c", limits=Limits(3)) as c:
        await c.run_once()  # every shard at hwm 3 of 4; the cut folds the rest in
    whole = QueryHandler()  # one invocation opening every shard
    shards: dict[int, QueryHandler] = {}

    def route(event: dict[str, Any]) -> QueryHandler:
        index = event["deltalog_shard"]["shard"]
        if index not in shards:
            env = {**os.environ, "DELTALOG_CACHE_DIR": str(tmp_path / f"shard-{index}")}
            shards[index] = QueryHandler(Settings.from_env(env))
        return shards[index]

    word = receipts[1].words[2].text
    asks = [
        {"collection": "words", "query_texts": [word, "TOTAL"], "n_results": 5},
        {"collection": "words", "where": {"receipt_id": receipts[2].receipt_id}},
        {"collection": "lines", "ids": [*line_records(receipts[0]).ids[:3], "nope"], "limit": 5},
    ]
    try:
        with LambdaServer(route, Context()) as server:
            monkeypatch.setenv("DELTALOG_QUERY_FANOUT", "true")
            monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "deltalog-query")
            monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA", server.url)
            router = QueryHandler()
            try:
                for ask in asks:
                    fanned = await invoke(router, url_request(ask), Context())
                    direct = await invoke(whole, url_request(ask), Context())
                    assert fanned["statusCode"] == direct["statusCode"] == 200, fanned
                    a, b = json.loads(fanned["body"]), json.loads(direct["body"])
                    assert sorted(a["ids"]) == sorted(b["ids"]), ask
                    if "distances" in a:
                        assert a["ids"] == b["ids"] and a["distances"] == b["distances"]
            finally:
                router.close()
        shards_asked = sorted(event["deltalog_shard"]["shard"] for _, event in server.invocations)
        assert shards_asked == sorted([0, 1, 2] * len(asks)), "one invocation per shard, each"
        assert {name for name, _ in server.invocations} == {"deltalog-query"}
    finally:
        whole.close()
        for handler in shards.values():
            handler.close()


async def test_shards_that_answer_at_another_cut_are_asked_again(lambda_env: LogConfig) -> None:
    """A shard that committed past the router's cut answers at its own hwm; the others are
    asked again at it, so the merged answer is one cut."""
    async with DeltaLog.open(lambda_env) as log:
        await init_layout(log.table, log.keys, 2, now=time.time())
        asked: list[tuple[int, int]] = []

        async def shard_answers(payload: dict[str, Any]) -> dict[str, Any]:
            ask = payload["deltalog_shard"]
            asked.append((ask["shard"], ask["cut"]))
            cut = max(ask["cut"], 7 if ask["shard"] == 1 else 0)  # shard 1 committed seq 7
            row = {"ids": [[f"s{ask['shard']}@{cut}"]], "distances": [[float(ask["shard"])]]}
            answer = {**row, "documents": [[None]], "metadatas": [[None]]}
            return {"cut": cut, "answer": answer}

        merged = await scatter(log, shard_answers, {"collection": "w"}, n_results=2)
    assert sorted(asked) == [(0, 0), (0, 7), (1, 0)]
    assert merged["ids"] == [["s0@7", "s1@7"]], "both at seq 7"
