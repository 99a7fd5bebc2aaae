"""Creating a log's storage: the bucket and the table, if missing."""

from __future__ import annotations

from deltalog.config import LogConfig
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.s3 import S3Store

__all__ = ["ensure_storage"]


async def ensure_storage(config: LogConfig) -> tuple[bool, bool]:
    """Create the bucket and the table if missing; whether each was created.

    ``deltalog init`` does the same and also probes the store's conditional
    writes; this is for an endpoint known to honour them (the embedded one).
    """
    store = await S3Store.connect(config)
    try:
        bucket_created = await store.ensure_bucket()
    finally:
        await store.aclose()
    table = await DynamoTable.connect(config)
    try:
        table_created = await table.ensure_table()
    finally:
        await table.aclose()
    return bucket_created, table_created
