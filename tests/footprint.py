"""What is on an S3 + DynamoDB endpoint, seen with plain aioboto3 clients.

A *footprint* is what a write could have changed: the names of every bucket
and table, the object keys of the buckets watched and the items of the log
partitions watched. Tests take one before and after an action and compare:
an action that must write nothing leaves the footprint equal, one that may
write a little (a reserved seq) changes exactly that.

It reads the endpoint with its own clients instead of deltalog's adapters,
so a bug in an adapter cannot hide what the adapter wrote.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aioboto3

__all__ = ["Footprint", "take_footprint"]

Items = dict[str, dict[str, Any]]
"""A partition's items: sort key -> the item's attributes in DynamoDB's wire form."""


@dataclass(frozen=True)
class Footprint:
    buckets: frozenset[str]
    tables: frozenset[str]
    objects: dict[str, frozenset[str]] = field(default_factory=dict)
    """bucket -> the keys it holds, for each watched bucket that exists."""
    items: dict[tuple[str, str], Items] = field(default_factory=dict)
    """(table, partition) -> its items, for each watched partition whose table exists."""


async def take_footprint(
    endpoint: str,
    *,
    buckets: Iterable[str] = (),
    partitions: Iterable[tuple[str, str]] = (),
) -> Footprint:
    """The buckets and tables, the keys of ``buckets`` and the items of ``partitions``."""
    session = aioboto3.Session(region_name="us-east-1")
    async with (
        session.client("s3", endpoint_url=endpoint) as s3,
        session.client("dynamodb", endpoint_url=endpoint) as db,
    ):
        names = frozenset(b["Name"] for b in (await s3.list_buckets())["Buckets"])
        tables = frozenset(await _tables(db))
        objects = {b: await _keys(s3, b) for b in buckets if b in names}
        items = {(t, pk): await _items(db, t, pk) for t, pk in partitions if t in tables}
    return Footprint(names, tables, objects, items)


async def _tables(db: Any) -> list[str]:
    names: list[str] = []
    async for page in db.get_paginator("list_tables").paginate():
        names.extend(page["TableNames"])
    return names


async def _keys(s3: Any, bucket: str) -> frozenset[str]:
    keys: set[str] = set()
    async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.update(o["Key"] for o in page.get("Contents", []))
    return frozenset(keys)


async def _items(db: Any, table: str, partition: str) -> Items:
    found: Items = {}
    pages = db.get_paginator("query").paginate(
        TableName=table,
        KeyConditionExpression="pk = :pk",
        ExpressionAttributeValues={":pk": {"S": partition}},
        ConsistentRead=True,
    )
    async for page in pages:
        found.update((raw["sk"]["S"], raw) for raw in page["Items"])
    return found
