"""What a receipt and a compaction cost in S3 and DynamoDB requests (the README's cost section).

The handlers run through ``FaultProxy``, which forwards every request to
moto's server untouched and counts them by operation. The figures are
printed (``pytest -s``) and bounded here; the README's estimate uses them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack

import pytest

from deltalog import LogConfig
from deltalog.receipts.generate import generate_receipts
from deltalog.receipts.model import encode_receipt
from deltalog.storage.faults import FaultProxy
from deltalog_lambda.compact import CompactHandler
from deltalog_lambda.ingest import IngestHandler
from tests.deltalog_lambda.lambda_aws import Context, Queue, invoke

BATCH = 10
BATCHES = 6


@pytest.fixture
async def proxy(
    lambda_env: LogConfig, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FaultProxy]:
    assert lambda_env.endpoint_url is not None
    async with FaultProxy(lambda_env.endpoint_url) as counting:
        monkeypatch.setenv("AWS_ENDPOINT_URL", counting.url)
        yield counting


def _since(proxy: FaultProxy, before: dict[str, int]) -> Counter[str]:
    now = proxy.statistics().operations
    return Counter({op: n - before.get(op, 0) for op, n in now.items() if n - before.get(op, 0)})


async def test_requests_per_receipt_and_per_compaction(
    proxy: FaultProxy, lambda_env: LogConfig
) -> None:
    bodies = [encode_receipt(r).decode() for r in generate_receipts(BATCH * (BATCHES + 2), seed=5)]
    batches = [bodies[i : i + BATCH] for i in range(0, len(bodies), BATCH)]
    ingest, compact = IngestHandler(), CompactHandler()
    try:
        async with AsyncExitStack() as stack:
            queue = await Queue.create(stack, lambda_env, f"cost-{lambda_env.log}")

            async def add(batch: list[str]) -> None:
                await queue.send(batch)
                response = await invoke(ingest, queue.event(await queue.receive_all()), Context())
                assert response == {"batchItemFailures": []}

            async def counted(step: Awaitable[object]) -> Counter[str]:
                before = proxy.statistics().operations
                await step
                return _since(proxy, before)

            await add(batches[0])  # opens the clients, reads the schema once
            ingested: Counter[str] = Counter()
            for batch in batches[1 : BATCHES + 1]:
                ingested += await counted(add(batch))
            await invoke(compact, {"log": lambda_env.log}, Context())
            await add(batches[-1])
            warm = await counted(invoke(compact, {"log": lambda_env.log}, Context()))
            nothing = await counted(invoke(compact, {"log": lambda_env.log}, Context()))
    finally:
        ingest.close()
        compact.close()
    entries = ingested["PutObject"]
    per_receipt = sum(ingested.values()) / (BATCH * BATCHES)
    print(f"ingest, {BATCHES} batches of {BATCH}: {dict(ingested)}; {per_receipt:.2f}/receipt")
    print(f"a warm compaction of one batch: {dict(warm)}; nothing new: {dict(nothing)}")
    # One entry write, one counter update and one claims transaction per entry;
    # group commit puts several receipts in an entry.
    assert ingested["UpdateItem"] == ingested["TransactWriteItems"] == entries
    # How many receipts share an entry depends on timing (0.17 entries per receipt
    # on an idle machine, the README's figure); never more than one entry each.
    assert entries <= BATCH * BATCHES
    assert ingested["BatchGetItem"] <= BATCH * BATCHES, "claims looked up in batches"
    assert ingested["GetItem"] <= BATCHES, "the schema, checked once per invocation"
    steady = {"PutObject", "UpdateItem", "TransactWriteItems", "BatchGetItem", "GetItem"}
    # Anything else is a rare retry path (a read-back after a slow answer, say).
    assert sum(n for op, n in ingested.items() if op not in steady) <= BATCHES
    assert per_receipt <= 3 + 1 + 1 / BATCH + 1 / BATCH
    assert sum(warm.values()) <= 30
    assert sum(nothing.values()) <= 5, "acquire, read the head, release"
