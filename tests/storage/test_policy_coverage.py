"""The IAM policies cover what the DynamoDB adapter writes.

``deltalog policy --role producer|compactor`` confines ``UpdateItem`` to a
list of attribute names (``dynamodb:Attributes``). An attribute the adapter
starts writing without being listed there works everywhere but on AWS with
the policy (``AccessDeniedException``), which no moto test would see. So
this test records every update the producer's and the compactor's
``DynamoTable`` send (through botocore's parameter events, against moto)
while they do all they do (append with idempotency keys and a new
collection; seal an old hole, commit, release, renew) and checks each
attribute it names against the role's policy.
"""

from __future__ import annotations

import fnmatch
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from compactor import Compactor
from compactor.lease import LeaseKeeper
from deltalog import DeltaLog, LogConfig
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.policy import render
from tests.builders import delta

_NAME = re.compile(r"(?<![:\w#])#?[A-Za-z_]\w*")
_WORDS = {
    "SET", "REMOVE", "ADD", "DELETE", "AND", "OR", "NOT", "IN", "BETWEEN",
    "if_not_exists", "attribute_not_exists", "attribute_exists", "attribute_type",
    "list_append", "begins_with", "contains", "size",
}  # fmt: skip


def _attributes(update: dict[str, Any]) -> set[str]:
    """The attribute names an update (its update and condition expressions, its key) names."""
    names = update.get("ExpressionAttributeNames", {})
    found = set(update.get("Key", {}))
    for field in ("UpdateExpression", "ConditionExpression"):
        for token in _NAME.findall(update.get(field, "")):
            if token not in _WORDS:
                found.add(names.get(token, token))
    return found


def _recording(deltalog: DeltaLog | DynamoTable) -> list[dict[str, Any]]:
    """Every update a table sends from now on (UpdateItem, transactions)."""
    updates: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        if "TransactItems" in params:
            updates.extend(i["Update"] for i in params["TransactItems"] if "Update" in i)
        elif "UpdateExpression" in params:
            updates.append(params)

    table = deltalog.table if isinstance(deltalog, DeltaLog) else deltalog
    client = table._db  # type: ignore[attr-defined]
    client.meta.events.register("provide-client-params.dynamodb.UpdateItem", record)
    client.meta.events.register("provide-client-params.dynamodb.TransactWriteItems", record)
    return updates


def _writable(role: str, config: LogConfig) -> list[str]:
    document = render(role, bucket=config.bucket, table=config.table, log=config.log)
    (update,) = [s for s in document["Statement"] if s["Action"] == "dynamodb:UpdateItem"]
    for condition in update["Condition"].values():
        if "dynamodb:Attributes" in condition:
            patterns: list[str] = condition["dynamodb:Attributes"]
            return patterns
    raise AssertionError(f"the {role} policy does not confine the attributes")


def _uncovered(updates: list[dict[str, Any]], patterns: list[str]) -> set[str]:
    named = set().union(*(_attributes(u) for u in updates))
    return {a for a in named if not any(fnmatch.fnmatchcase(a, p) for p in patterns)}


async def test_the_producer_policy_lists_every_attribute_a_producer_writes(
    config: LogConfig, rng: np.random.Generator
) -> None:
    table = await DynamoTable.connect(config)
    updates = _recording(table)  # from the first open: it records the log's identity
    async with DeltaLog.open(config, table=table) as log:
        await log.append(delta(rng, "a", idempotency_key="k1"))  # counter, schema, claim
        await log.append(delta(rng, "b", collection="lines", idempotency_key="k2"))
        async with log.producer(linger_ms=5) as producer:
            await producer.submit(delta(rng, "c", idempotency_key="k3"))
    await table.aclose()
    assert any(u["Key"]["sk"]["S"] == "identity" for u in updates)
    assert len(updates) >= 7
    assert _uncovered(updates, _writable("producer", config)) == set()


async def test_the_compactor_policy_lists_every_attribute_a_compactor_writes(
    config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    table = await DynamoTable.connect(config)
    updates = _recording(table)  # the compactor opens the log first: it records its identity
    async with Compactor(config, cache_dir=tmp_path, grace=0, table=table) as compactor:
        async with DeltaLog.open(config) as log:
            await log.append(delta(rng, "a"))
            await log.table.reserve(log.keys.log_id)  # a hole, sealed at once (grace 0)
            await log.append(delta(rng, "b"))
        result = await compactor.run_once()  # acquire, note the hole, commit, release
        keeper = LeaseKeeper(compactor.table, compactor.keys.log_id, ttl=30)
        lease = await keeper.acquire()
        await compactor.table.renew(
            compactor.keys.log_id, lease.owner, lease.token, ttl=30, now=time.time()
        )
        await keeper.release(lease)
    await table.aclose()
    assert any(u["Key"]["sk"]["S"] == "identity" for u in updates)
    assert (result.status, result.seals_written) == ("applied", 1)
    assert _uncovered(updates, _writable("compactor", config)) == set()


def test_the_recorder_finds_an_attribute_the_policy_does_not_list() -> None:
    """The check can fail: an update naming an unlisted attribute is caught."""
    update = {
        "Key": {"pk": {"S": "x"}, "sk": {"S": "state"}},
        "UpdateExpression": "SET hwm = :h, #o = :o, brand_new = :n ADD #t :one",
        "ConditionExpression": "attribute_not_exists(hwm) OR hwm = :p",
        "ExpressionAttributeNames": {"#o": "owner", "#t": "token"},
    }
    assert _attributes(update) == {"pk", "sk", "hwm", "owner", "brand_new", "token"}
    assert _uncovered([update], ["pk", "sk", "hwm", "owner", "token"]) == {"brand_new"}
