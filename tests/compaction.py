"""Helpers for compactor tests: reading committed state, comparing states, fault seams,
and holding a child process at a chosen request (so a pause lands there every time)."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import numpy as np

from compactor import CompactionResult, Compactor
from compactor.publish import publish_snapshot
from deltalog import DeltaLog, LogConfig
from deltalog.cli.soak import ChildProcess
from deltalog.entry import Entry
from deltalog.errors import LeaseBusy
from deltalog.fold import FoldPlan, Record
from deltalog.keys import STATE_SK
from deltalog.snapshot.sink import ChromaSink, Sink
from deltalog.storage.faults import Fault, FaultProxy, Request
from deltalog.storage.s3 import S3Store
from deltalog.storage.store import MemoryStore, ObjectStore
from deltalog.storage.table import Commit, LogState, MemoryTable, Table
from tests.oracle import oracle_state

State = dict[str, dict[str, Record]]


class Crash(Exception):
    """Stands for a process dying at a chosen step."""


async def committed_state(compactor: Compactor) -> State:
    """Every record of the committed state (the checkpoint plus the committed tail, as
    ``export`` writes it), read with a real Chroma client."""
    out = Path(tempfile.mkdtemp(prefix="export-", dir=compactor.cache.scratch)) / "chroma"
    try:
        await compactor.export(out)
        return await sink_state(out, compactor.cache.working_copy)
    finally:
        shutil.rmtree(out.parent)


async def until_not_busy(compactor: Compactor) -> CompactionResult:
    """Run until the lease is free (another holder released it or it expired)."""
    with anyio.fail_after(60):
        while (result := await compactor.run_once()).status == "busy":  # noqa: ASYNC110
            await anyio.sleep(0.05)
    return result


async def until_state(log: DeltaLog, holds: Callable[[LogState], bool]) -> LogState:
    """Poll the log's state item until ``holds`` (another task or process moves it)."""
    with anyio.fail_after(60):
        while not holds(state := await log.table.read_state(log.keys.log_id)):  # noqa: ASYNC110
            await anyio.sleep(0.02)
    return state


async def snapshot_state(compactor: Compactor, key: str, sha256: str) -> State:
    path = await compactor.cache.committed(compactor.store, key, sha256, log=compactor.config.log)
    return await sink_state(path, compactor.cache.working_copy)


async def sink_state(path: Path, copy: Callable[[Path | None], Path]) -> State:
    work = copy(path)
    try:
        sink = await ChromaSink.open(work)
        try:
            return {c: {r.id: r for r in await sink.records(c)} for c in await sink.collections()}
        finally:
            await sink.aclose()
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def log_entries(log: DeltaLog, to_seq: int | None = None) -> list[tuple[int, Entry]]:
    return [item async for item in log.read(after=0, to_seq=to_seq)]


async def reference(log: DeltaLog, to_seq: int | None = None) -> State:
    """The log applied op by op by the test oracle (``tests.oracle``), empty collections dropped."""
    return {
        c: dict(records)
        for c, records in oracle_state(await log_entries(log, to_seq)).items()
        if records
    }


def assert_states_equal(got: State, want: State) -> None:
    """Same collections, ids, bit-identical vectors, documents and metadata."""
    got = {c: r for c, r in got.items() if r}
    want = {c: r for c, r in want.items() if r}
    assert sorted(got) == sorted(want)
    for collection, records in want.items():
        assert sorted(got[collection]) == sorted(records), collection
        for id_, record in records.items():
            other = got[collection][id_]
            assert other.embedding.dtype == np.float32
            assert other.embedding.tobytes() == record.embedding.tobytes(), (collection, id_)
            assert other.document == record.document, (collection, id_)
            assert (other.metadata or None) == (record.metadata or None), (collection, id_)


class FaultyTable:
    """A table (``inner``, a memory one by default) that fails on a chosen method, once.

    - ``crash_on``: ``before-commit``, ``after-commit`` or ``release`` raises ``Crash``
      there (after the commit landed, for ``after-commit``); ``before-checkpoint-commit``
      and ``after-checkpoint-commit`` only around a commit that switches the
      checkpoint (a run that publishes one commits hwm alone first);
    - ``lost_commit_answers``: the next N commits land, then their answer is lost:
      ``after_commit`` runs (a successor taking over, say) and the commit is sent
      again, as botocore retries, and that retry's answer is what the caller sees
      (with ``lose_checkpoint_answers_only``, the next N checkpoint switches).

    Every other call passes straight through.
    """

    def __init__(self, inner: Table | None = None) -> None:
        self.inner: Table = inner if inner is not None else MemoryTable()
        self.crash_on: str | None = None
        self.lost_commit_answers = 0
        self.lose_checkpoint_answers_only = False
        self.after_commit: Callable[[], Awaitable[None]] | None = None
        self.refused = anyio.Event()
        """Set once an ``acquire`` found the lease busy."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read_state(self, log_id: str, *, sk: str = STATE_SK) -> LogState:
        return await self.inner.read_state(log_id, sk=sk)

    def _maybe_crash(self, method: str) -> None:
        if self.crash_on == method:
            self.crash_on = None
            raise Crash(f"crash in {method}")

    async def commit(
        self,
        log_id: str,
        owner: str,
        token: int,
        *,
        prev_hwm: int,
        commit: Commit,
        now: float,
        sk: str = STATE_SK,
    ) -> LogState:
        self._maybe_crash("before-commit")
        if commit.snapshot_key is not None:
            self._maybe_crash("before-checkpoint-commit")
        state = await self.inner.commit(
            log_id, owner, token, prev_hwm=prev_hwm, commit=commit, now=now, sk=sk
        )
        self._maybe_crash("after-commit")
        if commit.snapshot_key is not None:
            self._maybe_crash("after-checkpoint-commit")
        losable = commit.snapshot_key is not None or not self.lose_checkpoint_answers_only
        if self.lost_commit_answers and losable:
            self.lost_commit_answers -= 1
            if self.after_commit is not None:
                await self.after_commit()
            return await self.inner.commit(
                log_id, owner, token, prev_hwm=prev_hwm, commit=commit, now=now, sk=sk
            )
        return state

    async def acquire(
        self, log_id: str, owner: str, *, ttl: float, now: float, sk: str = STATE_SK
    ) -> LogState:
        try:
            return await self.inner.acquire(log_id, owner, ttl=ttl, now=now, sk=sk)
        except LeaseBusy:
            self.refused.set()
            raise

    async def release(
        self, log_id: str, owner: str, token: int, *, last_run: str = "", sk: str = STATE_SK
    ) -> bool:
        self._maybe_crash("release")
        return await self.inner.release(log_id, owner, token, last_run=last_run, sk=sk)


class FaultySink:
    """Wraps a real sink; crashes before or after its n-th apply."""

    def __init__(
        self,
        inner: Sink,
        *,
        before: int | None = None,
        after: int | None = None,
        gate: anyio.Event | None = None,
        entered: anyio.Event | None = None,
    ) -> None:
        self.inner = inner
        self.before = before
        self.after = after
        self.applies = 0
        self.entered = entered or anyio.Event()
        self.gate = gate

    async def apply(self, plan: FoldPlan) -> object:
        self.applies += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.before == self.applies:
            raise Crash("crash before apply")
        stats = await self.inner.apply(plan)
        if self.after == self.applies:
            raise Crash("crash after apply")
        return stats

    async def counts(self) -> dict[str, int]:
        return await self.inner.counts()

    async def records(self, collection: str) -> list[Record]:
        return await self.inner.records(collection)

    async def collections(self) -> list[str]:
        return await self.inner.collections()

    async def aclose(self) -> None:
        await self.inner.aclose()


def faulty_sinks(
    *,
    before: int | None = None,
    after: int | None = None,
    gate: anyio.Event | None = None,
    entered: anyio.Event | None = None,
) -> tuple[list[FaultySink], Callable[[Path], Awaitable[Sink]]]:
    """A sink factory whose sinks crash (or wait for ``gate``) as told; the list collects them."""
    made: list[FaultySink] = []

    async def factory(path: Path) -> Sink:
        inner = await ChromaSink.open(path)
        sink = FaultySink(inner, before=before, after=after, gate=gate, entered=entered)
        made.append(sink)
        return sink  # type: ignore[return-value]

    return made, factory


class StalledRenewTable:
    """The table ``inner``, but renewals hang once ``stalled`` is set: a paused process's heartbeat.

    Until then renewals go through, so the run reaches the point where the test
    pauses it however slowly it gets there.
    """

    def __init__(self, inner: Table, stalled: anyio.Event) -> None:
        self.inner = inner
        self.stalled = stalled

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def renew(
        self, log_id: str, owner: str, token: int, *, ttl: float, now: float, sk: str = STATE_SK
    ) -> None:
        if self.stalled.is_set():
            await anyio.sleep_forever()
        await self.inner.renew(log_id, owner, token, ttl=ttl, now=now, sk=sk)


# -- holding a child process at a chosen request -------------------------------------

Match = Callable[[Request], bool]
"""Picks a request out of what a proxy sees."""


def entry_read(request: Request) -> bool:
    return request.operation == "GetObject" and "/entries/" in request.path


def state_read(request: Request) -> bool:
    if request.operation != "GetItem":
        return False
    return bool(json.loads(request.body)["Key"]["sk"]["S"] == "state")


def snapshot_listing(request: Request) -> bool:
    prefix = parse_qs(request.query).get("prefix", [""])[0]
    return request.operation == "ListObjectsV2" and prefix.endswith("/snapshots/")


def lease_acquire(request: Request) -> bool:
    if request.operation != "UpdateItem":
        return False
    return "ADD #token" in json.loads(request.body).get("UpdateExpression", "")


@asynccontextmanager
async def held_once(
    config: LogConfig, match: Match
) -> AsyncIterator[tuple[str, anyio.Event, anyio.Event]]:
    """A proxy to ``config``'s endpoint that holds the first request ``match`` accepts.

    Yields the proxy's url, an event set when that request arrives, and one
    to set to let it through: a child process pointed at the proxy stops
    exactly there, every time, so a pause (SIGSTOP) lands where a test needs it.
    """
    reached, go = anyio.Event(), anyio.Event()

    def arrived(request: Request) -> bool:
        if not match(request):
            return False
        reached.set()
        return True

    assert config.endpoint_url is not None
    async with FaultProxy(config.endpoint_url) as proxy:
        proxy.script(Fault.DELAY, when=arrived, until=go.wait)
        yield proxy.url, reached, go
        go.set()


async def until_reached(reached: anyio.Event, child: ChildProcess) -> None:
    """Until ``reached`` is set; ``child`` (which sets it, through a proxy) must not die."""
    with anyio.fail_after(60):
        while not reached.is_set():
            assert child.returncode is None, child.stderr()
            await anyio.sleep(0.02)


def is_stopped(pid: int) -> bool:
    """Whether the kernel has stopped process ``pid`` (its state in ``/proc/PID/stat`` is T)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


async def until_stopped(pid: int) -> None:
    """Until process ``pid`` is stopped for good (SIGSTOP is delivered asynchronously)."""
    with anyio.fail_after(10):
        while not is_stopped(pid):  # noqa: ASYNC110 (another process's state)
            await anyio.sleep(0.005)


async def commit_altered_snapshot(
    config: LogConfig,
    cache: Path,
    alter: Callable[[Path], Awaitable[None]],
    **options: Any,
) -> None:
    """Commit, at the same hwm, the committed snapshot as ``alter`` leaves its directory:
    what a compactor bug would commit. Checksums are all right; only verify shows it."""
    async with Compactor(config, cache_dir=cache, **options) as c:
        state = await c.table.read_state(c.keys.log_id)
        assert state.snapshot_key is not None and state.snapshot_sha256 is not None
        base = await c.cache.committed(
            c.store, state.snapshot_key, state.snapshot_sha256, log=config.log
        )
        work = await anyio.to_thread.run_sync(c.cache.working_copy, base)
        await alter(work)
        async with await ChromaSink.open(work) as sink:
            counts = await sink.counts()
        published = await publish_snapshot(
            c.store, c.keys, work, hwm=state.hwm, token=state.token, counts=counts
        )
        lease = await c.table.acquire(c.keys.log_id, "tamper", ttl=30, now=time.time())
        commit = Commit(state.hwm, published.key, published.sha256, published.size)
        await c.table.commit(
            c.keys.log_id, "tamper", lease.token, prev_hwm=state.hwm, commit=commit, now=time.time()
        )
        assert await c.table.release(c.keys.log_id, "tamper", lease.token)


@asynccontextmanager
async def held_download(
    config: LogConfig, store: ObjectStore, key: str
) -> AsyncIterator[tuple[ObjectStore, anyio.Event, anyio.Event]]:
    """A store for a downloader whose download of ``key`` stops after its first range.

    Yields that store, an event set when the download reached its second range,
    and one to set to let it go on. On the memory store it is ``store`` itself
    (its ``on_range`` hook); on S3 a store reaching the endpoint through a proxy
    that holds the first ranged ``GetObject`` of ``key`` past byte 0.
    """
    if isinstance(store, MemoryStore):
        reached, go = anyio.Event(), anyio.Event()

        async def hold(got: str, start: int) -> None:
            if got == key and start > 0 and not reached.is_set():
                reached.set()
                await go.wait()

        store.on_range = hold
        try:
            yield store, reached, go
        finally:
            store.on_range = None
        return

    def later_range(request: Request) -> bool:
        return (
            request.operation == "GetObject"
            and request.path.endswith(key)
            and not request.headers.get("range", "bytes=0-").startswith("bytes=0-")
        )

    async with held_once(config, later_range) as (url, reached, go):
        proxied = await S3Store.connect(replace(config, endpoint_url=url))
        try:
            yield proxied, reached, go
        finally:
            go.set()
            await proxied.aclose()


def saved_seq_ids(path: Path, collection: str) -> tuple[int | None, int | None]:
    """The last write Chroma's HNSW index of ``collection`` in the directory ``path``
    saved to disk, and the last write it took in (its metadata segment): Chroma's
    own bookkeeping in its SQLite file (``deltalog.snapshot.hnsw``)."""
    with contextlib.closing(sqlite3.connect(path / "chroma.sqlite3")) as db:
        rows = db.execute(
            "SELECT s.scope, m.seq_id FROM segments s JOIN collections c ON c.id = s.collection "
            "LEFT JOIN max_seq_id m ON m.segment_id = s.id WHERE c.name = ?",
            (collection,),
        ).fetchall()
    seq = dict(rows)
    return seq.get("VECTOR"), seq.get("METADATA")
