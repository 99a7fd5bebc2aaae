"""The storage a compactor guarantee test runs on: the memory adapters and moto's server.

Each guarantee test (fencing, crash anywhere, lost heartbeat, poison,
retention) takes ``backend`` and runs twice: on ``MemoryStore`` +
``MemoryTable`` (fast, and the place a failure is easiest to read) and on
``S3Store`` + ``DynamoTable`` over HTTP against moto's server (the real
adapters, conditional writes and all). Fault wrappers (``tests.faulty``)
wrap either.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import Any

import pytest

from compactor import Compactor
from deltalog import DeltaLog, LogConfig
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.s3 import S3Store
from deltalog.storage.store import MemoryStore, ObjectStore
from deltalog.storage.table import MemoryTable, Table

MEMORY = LogConfig(bucket="memory", table="memory", log="mem")


@dataclass(frozen=True, slots=True)
class Backend:
    """A fresh log's location and the adapters to reach it (closed by the fixture)."""

    name: str
    config: LogConfig
    store: ObjectStore
    table: Table
    lease_ttl: float
    """A lease short enough to expire within a test, long enough for this backend's
    heartbeat to renew it on a loaded machine (a request to moto takes milliseconds)."""

    def open_log(self, config: LogConfig | None = None) -> AbstractAsyncContextManager[DeltaLog]:
        return DeltaLog.open(config or self.config, store=self.store, table=self.table)

    def compactor(self, config: LogConfig | None = None, **options: Any) -> Compactor:
        """A compactor on these adapters (``store``/``table`` in ``options`` wrap them)."""
        options = {"store": self.store, "table": self.table, **options}
        return Compactor(config or self.config, **options)


@pytest.fixture(params=["memory", "moto"])
def backend_config(request: pytest.FixtureRequest) -> LogConfig:
    if request.param == "memory":
        return MEMORY
    config: LogConfig = request.getfixturevalue("config")  # starts moto's server
    return config


@pytest.fixture
async def backend(backend_config: LogConfig) -> AsyncIterator[Backend]:
    if backend_config is MEMORY:
        yield Backend("memory", MEMORY, MemoryStore(), MemoryTable(), lease_ttl=0.3)
        return
    async with AsyncExitStack() as stack:
        store = await S3Store.connect(backend_config)
        stack.push_async_callback(store.aclose)
        table = await DynamoTable.connect(backend_config)
        stack.push_async_callback(table.aclose)
        yield Backend("moto", backend_config, store, table, lease_ttl=1.5)
