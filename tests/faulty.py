"""Seam-level faults: real adapters wrapped to fail the way networks do.

Each wrapper implements its seam's protocol by doing the real operation on
the adapter it wraps (moto-backed or in memory) and then, when told to,
failing the way the network can: a write that lands while the caller sees an
error (ambiguous), a request refused before it is sent (not ambiguous).
Everything not overridden passes straight through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any, Literal

import anyio

from deltalog import DeltaLog, LogConfig
from deltalog.errors import Unavailable
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.s3 import S3Store
from deltalog.storage.store import ObjectStore, StoredObject
from deltalog.storage.table import Claim, Table


class FaultyStore:
    """An ``ObjectStore`` that injects faults into ``put_if_absent`` and ``get``."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.lost_answers = 0
        """The next N puts write, then raise ``Unavailable(ambiguous=True)``."""
        self.lost_requests = 0
        """The next N puts write nothing and raise ``Unavailable(ambiguous=True)``."""
        self.refuse_puts = False
        """Every put writes nothing and raises a non-ambiguous ``Unavailable``."""
        self.broken_gets: set[str] = set()
        """Keys whose ``get`` raises a non-ambiguous ``Unavailable``."""
        self.vanished: set[str] = set()
        """Keys whose ``get`` answers None although they are listed."""
        self.hang_puts: Literal["before", "after"] | None = None
        """Every put hangs until ``release`` is set: before it is sent, or after it landed."""
        self.hung = anyio.Event()
        """Set when a put hangs."""
        self.release = anyio.Event()
        self.refuse_deletes = False
        """Every delete deletes nothing and raises a non-ambiguous ``Unavailable``."""
        self.puts: list[str] = []
        self.faults: list[Unavailable] = []
        self.before_put: dict[str, bytes] = {}
        """key -> bytes another writer puts there just before our put (a late write)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _fault(self, message: str, key: str, *, ambiguous: bool) -> Unavailable:
        fault = Unavailable(f"injected: {message}", ambiguous=ambiguous, key=key)
        self.faults.append(fault)
        return fault

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        self.puts.append(key)
        if key in self.before_put:
            await self.inner.put_if_absent(key, self.before_put.pop(key))
        if self.hang_puts == "before":
            await self._hang()
        if self.hang_puts == "after":
            written = await self.inner.put_if_absent(key, data)
            await self._hang()
            return written
        if self.refuse_puts:
            raise self._fault("put refused", key, ambiguous=False)
        if self.lost_requests:
            self.lost_requests -= 1
            raise self._fault("request lost before it arrived", key, ambiguous=True)
        written = await self.inner.put_if_absent(key, data)
        if self.lost_answers:
            self.lost_answers -= 1
            raise self._fault(f"answer lost (written: {written})", key, ambiguous=True)
        return written

    async def _hang(self) -> None:
        self.hung.set()
        await self.release.wait()

    async def delete(self, key: str) -> None:
        if self.refuse_deletes:
            raise self._fault("delete refused", key, ambiguous=False)
        await self.inner.delete(key)

    async def get(self, key: str) -> StoredObject | None:
        if key in self.broken_gets:
            raise self._fault("get failed", key, ambiguous=False)
        if key in self.vanished:
            return None
        return await self.inner.get(key)


class FaultyTable:
    """A ``Table`` whose ``reserve`` and ``replace_claim`` can lose their answers."""

    def __init__(self, inner: Table) -> None:
        self.inner = inner
        self.lost_reserve_answers = 0
        """The next N reserves add one to the counter, then raise (ambiguous)."""
        self.lost_replace_answers = 0
        """The next N claim replacements happen, then raise (ambiguous)."""
        self.reserved: list[int] = []
        self.hold_reserves: anyio.Event | None = None
        """When an event, every reserve waits for it (``reserving`` is set first)."""
        self.reserving = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def reserve(self, log_id: str) -> int:
        if self.hold_reserves is not None:
            self.reserving.set()
            await self.hold_reserves.wait()
        seq = await self.inner.reserve(log_id)
        self.reserved.append(seq)
        if self.lost_reserve_answers:
            self.lost_reserve_answers -= 1
            raise Unavailable(f"injected: reserve answer lost (seq {seq})", ambiguous=True)
        return seq

    async def replace_claim(self, log_id: str, old: Claim, new: Claim) -> bool:
        replaced = await self.inner.replace_claim(log_id, old, new)
        if self.lost_replace_answers:
            self.lost_replace_answers -= 1
            raise Unavailable(f"injected: replace answer lost ({replaced})", ambiguous=True)
        return replaced


@asynccontextmanager
async def faulty_memory_log(
    config: LogConfig, store: ObjectStore, table: Table
) -> AsyncIterator[tuple[DeltaLog, FaultyStore, FaultyTable]]:
    """A log on in-memory adapters (shared with other logs) through the same wrappers."""
    faulty_store, faulty_table = FaultyStore(store), FaultyTable(table)
    async with DeltaLog.open(config, store=faulty_store, table=faulty_table) as log:
        yield log, faulty_store, faulty_table


@asynccontextmanager
async def faulty_log(
    config: LogConfig, **changes: Any
) -> AsyncIterator[tuple[DeltaLog, FaultyStore, FaultyTable]]:
    """A log on moto's server through fault-injecting wrappers of the real adapters."""
    config = replace(config, **changes)
    async with AsyncExitStack() as stack:
        store = await S3Store.connect(config)
        stack.push_async_callback(store.aclose)
        table = await DynamoTable.connect(config)
        stack.push_async_callback(table.aclose)
        faulty_store, faulty_table = FaultyStore(store), FaultyTable(table)
        log = await stack.enter_async_context(
            DeltaLog.open(config, store=faulty_store, table=faulty_table)
        )
        yield log, faulty_store, faulty_table
