"""The mirror against a real ``chroma run`` server, the log on moto's server.

The server's state is read back with a plain ``chromadb.HttpClient`` and
compared with the test oracle (``tests.oracle``): the log applied op by op in Python,
independently of the fold and of the mirror.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from compactor import Compactor
from compactor.mirror import CONTROL_COLLECTION, Mirror, MirrorResult
from deltalog import Delete, Delta, DeltaLog, LogConfig, UpdateMetadata, Upsert
from deltalog.cli import main
from deltalog.cli.soak import ChildProcess, ChildProcesses
from deltalog.errors import ConfigurationError, Fenced, IdentityMismatch, LeaseLost
from deltalog.fold import CollectionPlan, FoldPlan, Record, State, apply_to_state
from deltalog.snapshot.server import ChromaServerSink, ChromaTarget
from deltalog.snapshot.sink import ApplyStats
from deltalog.storage.endpoint import FAKE_CREDENTIALS
from tests.builders import delete, delta
from tests.chroma_server import ChromaServer, free_port
from tests.commands import where
from tests.compaction import assert_states_equal, held_download, reference

DIMS = {"words": 8, "lines": 4}


@pytest.fixture(scope="module")
def chroma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    with ChromaServer(tmp_path_factory.mktemp("chroma") / "db") as server:
        yield server


@pytest.fixture
def target(chroma: ChromaServer) -> ChromaTarget:
    return ChromaTarget(chroma.url, database=chroma.new_database())


def random_delta(rng: np.random.Generator, pool: int = 40) -> Delta:
    """Upserts (with and without documents and metadata), deletes and patches."""
    ops: list[Upsert | Delete | UpdateMetadata] = []
    for _ in range(int(rng.integers(1, 4))):
        collection = str(rng.choice(list(DIMS)))
        ids = sorted({f"{collection[0]}{int(i)}" for i in rng.integers(0, pool, 6)})
        kind = rng.random()
        if kind < 0.55:
            n = len(ids)
            ops.append(
                Upsert(
                    collection,
                    ids,
                    rng.standard_normal((n, DIMS[collection]), dtype=np.float32),
                    documents=[f"doc {i} {rng.integers(100)}" for i in ids]
                    if rng.random() < 0.7
                    else None,
                    metadatas=[{"k": int(rng.integers(5)), "s": "x", "f": 0.25} for _ in ids]
                    if rng.random() < 0.7
                    else None,
                )
            )
        elif kind < 0.75:
            ops.append(Delete(collection, ids))
        else:
            patches: list[dict[str, Any]] = [
                {"k": None, "p": int(rng.integers(9))} if rng.random() < 0.5 else {"s": None}
                for _ in ids
            ]
            ops.append(UpdateMetadata(collection, ids, patches))
    return Delta(ops=ops)


def server_state(chroma: ChromaServer, target: ChromaTarget) -> State:
    """Every record on the server, read with a plain chromadb client (control excluded)."""
    state: State = {}
    with chroma.client(target.database) as client:
        for collection in client.list_collections():
            if collection.name == CONTROL_COLLECTION:
                continue
            got = collection.get(include=["embeddings", "documents", "metadatas"])
            vectors = np.asarray(got["embeddings"], dtype=np.float64).astype(np.float32)
            state[collection.name] = {
                id_: Record(id_, vectors[i], got["documents"][i], got["metadatas"][i] or None)
                for i, id_ in enumerate(got["ids"])
            }
    return state


def position(chroma: ChromaServer, target: ChromaTarget) -> dict[str, Any] | None:
    with chroma.client(target.database) as client:
        names = [c.name for c in client.list_collections()]
        if CONTROL_COLLECTION not in names:
            return None
        return dict(client.get_collection(CONTROL_COLLECTION).metadata or {})


async def seq_on(chroma: ChromaServer, target: ChromaTarget) -> int:
    """The position on the server (0 without one), read in a worker thread."""
    control = await anyio.to_thread.run_sync(position, chroma, target)
    return int((control or {}).get("seq", 0))


async def until_seq(
    chroma: ChromaServer, target: ChromaTarget, seq: int, child: ChildProcess | None = None
) -> None:
    """Until the server's position is at least ``seq`` (bounded)."""
    with anyio.fail_after(60):
        while await seq_on(chroma, target) < seq:
            assert child is None or child.returncode is None, child and child.stderr()
            await anyio.sleep(0.01)


async def append_random(log: DeltaLog, rng: np.random.Generator, n: int) -> None:
    for _ in range(n):
        await log.append(random_delta(rng))


async def test_the_server_equals_the_reference_fold_from_a_bootstrap_and_on(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    await append_random(log, rng, 25)
    async with Compactor(config, cache_dir=tmp_path / "c") as compactor:
        assert (await compactor.run_once()).status == "applied"
    await append_random(log, rng, 15)  # a tail the snapshot does not hold
    # the compactor's cache: its copy of the snapshot was adopted from its run, no sidecar
    async with Mirror(config, target, cache_dir=tmp_path / "c", chunk_entries=4) as mirror:
        first = await mirror.run_once()
        assert first.status == "applied"
        assert first.bootstrapped > 0, "an empty server is filled from the snapshot"
        assert (first.position_before, first.position_after) == (25, 40)
        assert_states_equal(server_state(chroma, target), await reference(log))
        await append_random(log, rng, 20)
        second = await mirror.run_once()
        assert (second.position_before, second.position_after, second.bootstrapped) == (40, 60, 0)
        assert_states_equal(server_state(chroma, target), await reference(log))
        assert (await mirror.run_once()).status == "nothing"
        stats = mirror.statistics()
        assert (stats.position, stats.lag) == (60, 0)
        assert stats.batches >= 8 and stats.vectors_per_second > 0
    control = position(chroma, target)
    assert control is not None
    assert (control["seq"], control["phase"], control["log"]) == (60, "following", config.log)
    lease = await log.table.read_lease(log.keys.log_id, f"mirror:{target.id}")
    assert lease.owner is None, "the lease is released"


async def test_a_bootstrap_behind_a_committed_tail_replays_the_tail(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    """The checkpoint holds seq 10 and the committed tail goes to 15: the bootstrap's
    position is the checkpoint's seq, so the mirror goes on to apply 11-15 itself."""
    await append_random(log, rng, 10)
    async with Compactor(config, cache_dir=tmp_path / "c", checkpoint_ratio=1e6) as compactor:
        assert (await compactor.run_once()).checkpoint == "first"
        await append_random(log, rng, 5)
        assert (await compactor.run_once()).checkpoint == ""
    state = await log.table.read_state(log.keys.log_id)
    assert (state.checkpoint_hwm, state.hwm) == (10, 15)
    async with Mirror(config, target, cache_dir=tmp_path / "m") as mirror:
        first = await mirror.run_once()
    assert first.bootstrapped > 0
    assert (first.position_before, first.position_after) == (10, 15)
    assert await seq_on(chroma, target) == 15
    assert_states_equal(server_state(chroma, target), await reference(log))


async def test_an_empty_log_bootstraps_nothing_and_later_entries_arrive(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    async with Mirror(config, target, cache_dir=tmp_path) as mirror:
        assert (await mirror.run_once()).status == "nothing"
        assert position(chroma, target) is not None
        await append_random(log, rng, 10)
        assert (await mirror.run_once()).position_after == 10
    assert_states_equal(server_state(chroma, target), await reference(log))


async def test_kill_9_mid_batch_then_a_restart_converges(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    """About 25 s: the restart waits for the dead mirror's lease to expire (8 s), then
    for its requests that may still land (its ttl plus its request timeout, 10 s)."""
    await append_random(log, rng, 120)
    argv = [
        *_cli(config, target, tmp_path / "child"),
        "--once",
        "--lease-ttl",
        "8",  # long enough for moto under a loaded machine (the heartbeat tries for ttl/3)
        "--request-timeout",
        "2",
        "--batch-entries",
        "2",
        "-q",
    ]
    with ChildProcesses(tmp_path / "logs", env=FAKE_CREDENTIALS) as children:
        child = children.start("mirror", [sys.executable, "-m", "deltalog", *argv])
        await until_seq(chroma, target, 20, child)  # until a few batches have landed
        child.kill()  # kill -9, in the middle of its batches
        with anyio.fail_after(10):
            await child.exited()
    killed_at = (position(chroma, target) or {})["seq"]
    assert 20 <= killed_at < 120, "the kill must land before the mirror finished"
    again = Mirror(config, target, cache_dir=tmp_path / "again", lease_ttl=8, request_timeout=2)
    async with again as mirror:
        with anyio.fail_after(60):  # the dead mirror's lease expires by itself
            while (result := await mirror.run_once()).status == "busy":
                assert result.stopped, "busy names the holder"
                await anyio.sleep(0.2)
    assert result.position_before == killed_at and result.position_after == 120
    assert_states_equal(server_state(chroma, target), await reference(log))


def _cli(config: LogConfig, target: ChromaTarget, cache: Path) -> list[str]:
    server = ["--chroma-url", target.url, "--database", target.database]
    return ["mirror", *where(config), *server, "--cache-dir", str(cache)]


async def test_a_second_mirror_of_the_same_target_exits_busy(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await append_random(log, rng, 5)
    async with (
        Mirror(config, target, cache_dir=tmp_path / "a") as first,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(lambda: first.follow(poll_min=0.05, poll_max=0.2))
        await until_seq(chroma, target, 5)
        args = [*_cli(config, target, tmp_path / "b"), "--once"]
        code = await anyio.to_thread.run_sync(main, args)
        assert code == 3
        assert "lease busy" in capsys.readouterr().out
        await append_random(log, rng, 3)  # the first one keeps following
        await until_seq(chroma, target, 8)
        tg.cancel_scope.cancel()
    assert_states_equal(server_state(chroma, target), await reference(log))
    lease = await log.table.read_lease(log.keys.log_id, f"mirror:{target.id}")
    assert lease.owner is None, "a cancelled follow releases its lease"


async def test_an_unreachable_server_is_a_typed_error_and_changes_nothing(
    log: DeltaLog, config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    await append_random(log, rng, 3)
    target = ChromaTarget(f"http://127.0.0.1:{free_port()}")
    async with Mirror(config, target, cache_dir=tmp_path) as mirror:
        with pytest.raises(ConfigurationError, match="cannot use the Chroma server"):
            await mirror.run_once()
    lease = await log.table.read_lease(log.keys.log_id, f"mirror:{target.id}")
    assert (lease.owner, lease.token) == (None, 1), "taken, then given back"


async def test_a_collection_of_another_dimension_is_refused_and_nothing_changes(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    await log.append(delta(rng, "w", dim=8))  # fixes words' dimension, whatever follows
    await append_random(log, rng, 5)
    with chroma.client(target.database) as client:
        words = client.create_collection("words", embedding_function=None)
        words.add(ids=["mine"], embeddings=np.ones((1, 3), np.float32), documents=["kept"])
    before = server_state(chroma, target)
    async with Mirror(config, target, cache_dir=tmp_path) as mirror:
        with pytest.raises(ConfigurationError, match=r"3-dimensional.*log's are 8"):
            await mirror.run_once()
    assert position(chroma, target) is None
    assert_states_equal(server_state(chroma, target), before)
    with chroma.client(target.database) as client:
        assert [c.name for c in client.list_collections()] == ["words"]


async def test_a_server_that_holds_foreign_records_is_refused(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    await append_random(log, rng, 2)
    with chroma.client(target.database) as client:
        other = client.create_collection("other", embedding_function=None)
        other.add(ids=["x"], embeddings=np.ones((1, 3), np.float32))
    async with Mirror(config, target, cache_dir=tmp_path) as mirror:
        with pytest.raises(ConfigurationError, match=r"holds records no mirror wrote: other \(1\)"):
            await mirror.run_once()
    assert position(chroma, target) is None


async def test_a_server_ahead_of_the_mirror_stops_it(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    await append_random(log, rng, 4)
    async with Mirror(config, target, cache_dir=tmp_path, chunk_entries=1) as mirror:
        await mirror.run_once()
        set_seq(chroma, target, 9)  # another writer, or another log's mirror
        await append_random(log, rng, 2)
        with pytest.raises(Fenced, match="ahead of the log"):
            await mirror.run_once()
    assert (position(chroma, target) or {})["seq"] == 9, "the mirror wrote nothing more"


def set_seq(chroma: ChromaServer, target: ChromaTarget, seq: int) -> None:
    set_position(chroma, target, seq=seq)


def set_position(chroma: ChromaServer, target: ChromaTarget, **changes: object) -> None:
    with chroma.client(target.database) as client:
        control = client.get_collection(CONTROL_COLLECTION)
        control.modify(metadata={**(control.metadata or {}), **changes})


async def test_a_target_mirroring_another_buckets_log_of_that_name_is_refused(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    """Issue 19 item 2: the position names the log's bucket, not only its id."""
    await append_random(log, rng, 2)
    async with Mirror(config, target, cache_dir=tmp_path) as mirror:
        await mirror.run_once()
    assert (position(chroma, target) or {})["identity"] == config.keys.identity
    elsewhere = f"s3://elsewhere/{config.keys.log_id}"
    set_position(chroma, target, identity=elsewhere)  # another bucket's log of this name
    await append_random(log, rng, 1)
    async with Mirror(config, target, cache_dir=tmp_path) as mirror:
        with pytest.raises(IdentityMismatch, match=f"mirrors the log '{elsewhere}'"):
            await mirror.run_once()
    assert (position(chroma, target) or {})["seq"] == 2, "the mirror wrote nothing"


async def test_a_position_written_before_identities_takes_the_mirrors(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await append_random(log, rng, 2)
    async with Mirror(config, target, cache_dir=tmp_path) as mirror:
        await mirror.run_once()
    set_position(chroma, target, identity="")  # as the version before identities wrote it
    await append_random(log, rng, 1)
    with caplog.at_level(logging.WARNING, logger="compactor.mirror"):
        async with Mirror(config, target, cache_dir=tmp_path) as mirror:
            await mirror.run_once()
    assert "written before identities" in caplog.text
    control = position(chroma, target) or {}
    assert (control["seq"], control["identity"]) == (3, config.keys.identity)


class Tampered(Mirror):
    """A mirror whose target is moved by someone else just before its second batch."""

    batches = 0
    chroma: ChromaServer

    async def apply_batch(self, session: Any, plan: FoldPlan) -> ApplyStats:
        self.batches += 1
        if self.batches == 2:
            assert plan.last_seq is not None
            await anyio.to_thread.run_sync(set_seq, self.chroma, self.target, plan.last_seq)
        return await super().apply_batch(session, plan)


async def test_a_position_moved_under_the_mirror_stops_it_before_the_next_batch(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    await append_random(log, rng, 4)
    async with Tampered(config, target, cache_dir=tmp_path, chunk_entries=1) as mirror:
        mirror.chroma = chroma
        with pytest.raises(Fenced, match="server is ahead of this mirror"):
            await mirror.run_once()
    assert mirror.statistics().batches == 1
    assert (position(chroma, target) or {})["seq"] == 2, "the mirror wrote nothing more"


async def test_an_interrupted_bootstrap_starts_again_from_scratch(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    await append_random(log, rng, 6)
    async with Compactor(config, cache_dir=tmp_path / "c") as compactor:
        await compactor.run_once()
    with chroma.client(target.database) as client:
        stray = client.create_collection("lines", embedding_function=None)
        stray.add(ids=["half-copied"], embeddings=np.ones((1, 4), np.float32))
        client.create_collection(
            CONTROL_COLLECTION, metadata={"log": config.log, "seq": 0, "phase": "bootstrapping"}
        )
    async with Mirror(config, target, cache_dir=tmp_path / "m") as mirror:
        assert (await mirror.run_once()).position_after == 6
    assert_states_equal(server_state(chroma, target), await reference(log))


async def test_the_cloud_client_path_takes_the_key_from_the_environment(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``CHROMA_API_KEY`` set: chromadb's ``CloudClient`` (here against ``chroma run``).

    The client asks the server which databases the key may use: a local server
    answers with its default database, the one test here that writes there.
    """
    monkeypatch.setenv("CHROMA_API_KEY", "ck-test")
    target = ChromaTarget(chroma.url)
    await append_random(log, rng, 3)
    async with Mirror(config, target, cache_dir=tmp_path) as mirror:
        await mirror.run_once()
    assert_states_equal(server_state(chroma, target), await reference(log))


async def test_follow_stops_cleanly_on_sigterm(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    await append_random(log, rng, 4)
    argv = [sys.executable, "-m", "deltalog", *_cli(config, target, tmp_path), "--poll-max", "0.5"]
    with ChildProcesses(tmp_path / "logs", env=FAKE_CREDENTIALS) as children:
        child = children.start("mirror", argv)
        await until_seq(chroma, target, 4, child)
        await append_random(log, rng, 3)
        await until_seq(chroma, target, 7, child)
        child.popen.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            assert await child.exited() == 0, child.stderr()
    assert "stopped at position 7 (lag 0); lease released" in child.stderr()
    lease = await log.table.read_lease(log.keys.log_id, f"mirror:{target.id}")
    assert lease.owner is None
    assert_states_equal(server_state(chroma, target), await reference(log))


# -- a takeover: the superseded holder's writes never land --------------------------


class StallingTable:
    """The log's table for mirror A: once ``stall`` is set, its heartbeat's renewals
    wait for ``heartbeat`` (a paused process's heartbeat, frozen: not even its
    timeout fires), then go through (and find the lease taken)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.stall = False
        self.heartbeat = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def renew_lease(self, *args: Any, **kwargs: Any) -> None:
        if self.stall and (anyio.get_current_task().name or "").endswith(".heartbeat"):
            with anyio.CancelScope(shield=True):
                await self.heartbeat.wait()
        await self.inner.renew_lease(*args, **kwargs)


class PausedAfterCheck(Mirror):
    """Mirror A: stalls right after its position check for the batch of seq 2, its
    heartbeat with it; once resumed, its batch goes on before its heartbeat does (a
    process whose event loop was blocked runs the code it was in first)."""

    table: StallingTable
    paused: anyio.Event
    resume: anyio.Event

    async def _check_position(self, session: Any) -> None:
        await super()._check_position(session)
        if session.position is not None and session.position.seq == 1:
            self.table.stall = True
            self.paused.set()
            await self.resume.wait()

    async def apply_batch(self, session: Any, plan: FoldPlan) -> ApplyStats:
        try:
            return await super().apply_batch(session, plan)
        finally:
            if self.table.stall:
                self.table.heartbeat.set()


class Settling(Mirror):
    """Mirror B: records how long after its acquire it let itself send requests."""

    settled_after: float | None = None

    async def _settle(self, session: Any) -> None:
        await super()._settle(session)
        if self.settled_after is None:
            self.settled_after = time.monotonic() - session.taken_at


async def until_taken(mirror: Mirror) -> MirrorResult:
    """Run until the lease is free or expired (its holder stalled)."""
    while (result := await mirror.run_once()).status == "busy":  # noqa: ASYNC110
        await anyio.sleep(0.1)
    return result


def words(rng: np.random.Generator, id_: str, document: str) -> Delta:
    vector = rng.standard_normal((1, DIMS["words"]), dtype=np.float32)
    return Delta(ops=[Upsert("words", [id_], vector, documents=[document])])


async def test_a_stalled_mirror_resuming_after_a_takeover_writes_nothing(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    """Seqs 1 ``other``, 2 ``w0=OLD``, 3 ``w0=NEW``; ttl 1.5 s, one entry per batch.

    Mirror A passes its position check for seq 2, then stalls (its heartbeat too).
    Mirror B takes the expired lease, applies 2-3 and writes position 3. A resumes,
    its batch first: none of its writes may land, so ``w0`` holds NEW, the position
    stays B's, and the server equals the reference fold.
    """
    for id_, document in (("other", "other"), ("w0", "OLD"), ("w0", "NEW")):
        await log.append(words(rng, id_, document))
    table = StallingTable(log.table)
    options: Any = {"lease_ttl": 1.5, "chunk_entries": 1, "request_timeout": 1.0}
    async with (
        DeltaLog.open(config, store=log.store, table=table) as a_log,
        PausedAfterCheck(
            config, target, cache_dir=tmp_path / "a", log_handle=a_log, **options
        ) as a,
        Settling(config, target, cache_dir=tmp_path / "b", **options) as b,
        anyio.create_task_group() as tg,
    ):
        a.table, a.paused, a.resume = table, anyio.Event(), anyio.Event()
        outcome: list[BaseException | MirrorResult] = []

        async def run_a() -> None:
            try:
                outcome.append(await a.run_once())
            except Exception as exc:
                outcome.append(exc)

        tg.start_soon(run_a)
        with anyio.fail_after(60):
            await a.paused.wait()
            taken = await until_taken(b)
        assert (taken.position_before, taken.position_after) == (1, 3)
        # A's last request may land until its lease's end plus its request timeout:
        # B, which took the lease unreleased, waited that long before writing.
        assert b.settled_after is not None and b.settled_after >= 1.5 + 1.0
        a.resume.set()
    (a_result,) = outcome
    assert isinstance(a_result, LeaseLost), a_result
    w0 = server_state(chroma, target)["words"]["w0"]
    assert w0.document == "NEW", "the stalled mirror's batch landed"
    control = position(chroma, target) or {}
    assert (control["seq"], control["token"]) == (3, 2)
    assert_states_equal(server_state(chroma, target), await reference(log))


# -- a put on the server replaces its record in place ------------------------------


class Cut(Exception):
    """A writer stopped between two requests."""


def old_and_new(rng: np.random.Generator, n: int) -> tuple[list[Record], list[Record]]:
    """Records already on the server, and the puts that replace them: fewer metadata
    keys, no metadata, a new document, and no document over one (the case ``upsert``
    cannot express)."""
    vectors = rng.standard_normal((2 * n, 4), dtype=np.float32)
    old = [Record(f"r{i}", vectors[i], f"old {i}", {"a": i, "b": "x"}) for i in range(n)]
    metadatas: list[dict[str, Any] | None] = [{"a": 100}, None, {"c": True}, {"a": 1, "b": "y"}]
    documents = [f"new {i}" if i % 4 != 3 else None for i in range(n)]
    new = [Record(f"r{i}", vectors[n + i], documents[i], metadatas[i % 4]) for i in range(n)]
    return old, new


def cut_after(allowed: int) -> Any:
    """A fence that lets ``allowed`` requests through, then cuts the writer off."""
    sent = 0

    def fence() -> None:
        nonlocal sent
        sent += 1
        if sent > allowed:
            raise Cut

    return fence


async def test_a_put_on_the_server_replaces_records_in_place_and_never_leaves_one_absent(
    chroma: ChromaServer, target: ChromaTarget, rng: np.random.Generator
) -> None:
    """Cut the writer after each of its requests in turn: every record is then whole,
    the old one or the new one (never absent, never merged), except a put that takes
    a document away (a delete then an add). Uncut, the server holds the puts exactly,
    as the fold's own ``apply_to_state`` does (measured against Chroma's semantics)."""
    old, new = old_and_new(rng, 8)
    sink = await ChromaServerSink.connect(target, control=CONTROL_COLLECTION)
    try:
        await sink.add("lines", old)
        plan = FoldPlan({"lines": CollectionPlan(puts={r.id: r for r in new})})
        for allowed in range(6):  # 4 requests: read the old records, upsert, delete, add
            sink.fence = cut_after(allowed)
            with contextlib.suppress(Cut):
                await sink.apply(plan)
            sink.fence = None
            held = {r.id: r for r in await sink.records("lines")}
            for before, after in zip(old, new, strict=True):
                got = held.get(before.id)
                if after.document is None:  # the exception: a delete then an add
                    continue
                assert got is not None, f"{before.id} absent after {allowed} requests"
                whole = [(r.document, r.metadata, r.embedding.tobytes()) for r in (before, after)]
                assert (got.document, got.metadata, got.embedding.tobytes()) in whole, got
            await sink.add("lines", [r for r in old if r.id not in held])  # as before
            await sink.apply(FoldPlan({"lines": CollectionPlan(puts={r.id: r for r in old})}))
        await sink.apply(plan)
        want: State = {"lines": {r.id: r for r in old}}
        apply_to_state(want, plan)
        assert_states_equal({"lines": {r.id: r for r in await sink.records("lines")}}, want)
    finally:
        await sink.aclose()


# -- the bootstrap, fenced page by page ---------------------------------------------


def two_collections(rng: np.random.Generator, tag: str) -> Delta:
    ops: list[Upsert | Delete | UpdateMetadata] = [
        Upsert(name, [f"{tag}{i}" for i in range(3)], rng.standard_normal((3, dim), np.float32))
        for name, dim in DIMS.items()
    ]
    return Delta(ops=ops)


class PagePaused(Mirror):
    """Mirror A: ``after_first_page`` runs once its first bootstrap page reached the
    server; its frozen heartbeat (``table``, if stalling) resumes once the copy ends."""

    after_first_page: Callable[[], Awaitable[None]]
    table: StallingTable | None = None

    async def _open_session(self) -> Any:
        session = await super()._open_session()
        add, pages = session.sink.add, []

        async def add_then_pause(name: str, records: list[Record]) -> None:
            await add(name, records)
            if records:
                pages.append(name)
                if len(pages) == 1:
                    await self.after_first_page()

        session.sink.add = add_then_pause  # type: ignore[method-assign]
        return session

    async def _copy(self, session: Any, snapshot: Any) -> None:
        try:
            await super()._copy(session, snapshot)
        finally:
            if self.table is not None:
                self.table.heartbeat.set()


async def run_into(mirror: Mirror, outcome: list[BaseException | MirrorResult]) -> None:
    try:
        outcome.append(await mirror.run_once())
    except Exception as exc:
        outcome.append(exc)


async def test_a_stalled_bootstrapper_writes_no_older_page_into_the_new_holders_target(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    """Mirror A bootstraps from checkpoint K1 and stalls after its first page (its
    heartbeat with it). An id is deleted and K2 published; mirror B takes the expired
    lease and bootstraps again, from K2. A resumes with K1's next page: none of it
    may land (the deleted id would come back)."""
    await log.append(two_collections(rng, "a"))
    table = StallingTable(log.table)
    options: Any = {"lease_ttl": 1.5, "request_timeout": 1.0}
    paused, resume = anyio.Event(), anyio.Event()

    async def stall() -> None:
        table.stall = True
        paused.set()
        await resume.wait()

    async with (
        Compactor(config, cache_dir=tmp_path / "c", checkpoint_ratio=0) as compactor,
        DeltaLog.open(config, store=log.store, table=table) as a_log,
        PagePaused(config, target, cache_dir=tmp_path / "a", log_handle=a_log, **options) as a,
        Mirror(config, target, cache_dir=tmp_path / "b", **options) as b,
    ):
        await compactor.run_once()
        a.after_first_page, a.table = stall, table
        outcome: list[BaseException | MirrorResult] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_into, a, outcome)
            with anyio.fail_after(60):
                await paused.wait()
                await log.append(delete("a1"))
                await compactor.run_once()  # K2, without words' a1
                taken = await until_taken(b)
            assert (taken.bootstrapped, taken.position_after) == (5, 2)
            resume.set()  # its page first: a process whose event loop was blocked
    (a_result,) = outcome
    assert isinstance(a_result, LeaseLost), a_result
    assert_states_equal(server_state(chroma, target), await reference(log))
    control = position(chroma, target) or {}
    assert (control["seq"], control["token"]) == (2, 2)


async def test_a_position_moved_under_a_bootstrapping_mirror_stops_it_before_its_next_page(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    await log.append(two_collections(rng, "a"))
    async with (
        Compactor(config, cache_dir=tmp_path / "c") as compactor,
        PagePaused(config, target, cache_dir=tmp_path / "a", max_batch_size=2) as a,
    ):
        await compactor.run_once()

        async def another_writer() -> None:
            await anyio.to_thread.run_sync(set_token, chroma, target, 99)

        a.after_first_page = another_writer
        with pytest.raises(Fenced, match="another writer changed it"):
            await a.run_once()
    with chroma.client(target.database) as client:
        counts = {c.name: c.count() for c in client.list_collections()}
    assert counts == {CONTROL_COLLECTION: 0, "lines": 2}, "nothing after the first page"


def set_token(chroma: ChromaServer, target: ChromaTarget, token: int) -> None:
    with chroma.client(target.database) as client:
        control = client.get_collection(CONTROL_COLLECTION)
        control.modify(metadata={**(control.metadata or {}), "token": token})


# -- a forced rebuild reaches the mirror; a checkpoint pruned while it downloads ------


async def test_a_forced_rebuild_makes_the_mirror_bootstrap_again(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    """The target holds something the log never said (a stray record, standing in for
    whatever a repair is for). ``rebuild --publish --force`` starts a new lineage: the
    mirror's next run bootstraps again from the rebuilt checkpoint."""
    await append_random(log, rng, 6)
    async with (
        Compactor(config, cache_dir=tmp_path / "c") as compactor,
        Mirror(config, target, cache_dir=tmp_path / "m") as mirror,
    ):
        await compactor.run_once()
        assert (await mirror.run_once()).position_after == 6
        with chroma.client(target.database) as client:
            words = client.get_collection("words", embedding_function=None)
            words.add(ids=["stray"], embeddings=np.ones((1, DIMS["words"]), np.float32))
        await compactor.rebuild(publish=True, force=True)
        await append_random(log, rng, 2)
        again = await mirror.run_once()
    assert again.bootstrapped > 0 and again.position_after == 8
    assert_states_equal(server_state(chroma, target), await reference(log))
    lineage = (await log.table.read_state(log.keys.log_id)).lineage
    assert (position(chroma, target) or {})["lineage"] == lineage != ""


async def test_a_checkpoint_pruned_while_the_bootstrap_downloads_it_is_read_again(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    """4 KiB parts; after the bootstrap's first range a compactor (retain 1) commits a
    newer checkpoint and deletes that one: the bootstrap reads the state again."""
    config = replace(config, part_size=4096, transfer_concurrency=2)
    await log.append(delta(rng, "big", rows=40, dim=DIMS["words"]))
    async with Compactor(
        config, cache_dir=tmp_path / "c", retain=1, orphan_grace=0, checkpoint_ratio=0
    ) as compactor:
        first = await compactor.run_once()
        assert first.snapshot_key is not None and first.snapshot_size > 4 * 4096
        async with (
            held_download(config, log.store, first.snapshot_key) as (held, reached, go),
            DeltaLog.open(config, store=held, table=log.table) as m_log,
            Mirror(config, target, cache_dir=tmp_path / "m", log_handle=m_log) as mirror,
            anyio.create_task_group() as tg,
        ):
            results: list[MirrorResult] = []

            async def bootstrap() -> None:
                results.append(await mirror.run_once())

            tg.start_soon(bootstrap)
            with anyio.fail_after(60):
                await reached.wait()
            await log.append(delete("big#3"))
            second = await compactor.run_once()
            go.set()
    (result,) = results
    assert result.position_after == 2
    assert (position(chroma, target) or {})["snapshot_key"] == second.snapshot_key
    assert_states_equal(server_state(chroma, target), await reference(log))


async def test_collections_record_the_embedder_through_snapshot_bootstrap_and_follow(
    log: DeltaLog,
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    """Upserts that name their embedder: the snapshot's collections record it, the mirror's
    bootstrap copies it to the server, and following records a later one (a plain client
    reads it in the collection's metadata). A collection whose upserts name none has none."""

    def upsert(collection: str, ids: list[str], embedder: str | None) -> Delta:
        vectors = rng.standard_normal((len(ids), DIMS[collection]), dtype=np.float32)
        return Delta(ops=[Upsert(collection, ids, vectors, embedder=embedder)])

    await log.append(upsert("words", ["w1", "w2"], "model-a:8"))
    await log.append(upsert("lines", ["l1"], None))
    async with Compactor(config, cache_dir=tmp_path / "c") as compactor:
        assert (await compactor.run_once()).status == "applied"
        exported = await compactor.export(tmp_path / "export")
    import chromadb
    from chromadb.config import Settings

    plain: Any = chromadb.PersistentClient(
        str(exported.path), settings=Settings(anonymized_telemetry=False)
    )
    try:
        assert plain.get_collection("words").metadata == {"deltalog:embedder": "model-a:8"}
        assert not plain.get_collection("lines").metadata
    finally:
        plain.close()

    def embedders() -> dict[str, Any]:
        with chroma.client(target.database) as client:
            return {
                c.name: (c.metadata or {}).get("deltalog:embedder")
                for c in client.list_collections()
                if c.name != CONTROL_COLLECTION
            }

    progress: list[tuple[int, int]] = []
    async with Mirror(
        config,
        target,
        cache_dir=tmp_path / "m",
        progress=lambda s: progress.append((s.bootstrap_copied, s.bootstrap_total)),
    ) as mirror:
        first = await mirror.run_once()
        assert first.bootstrapped == 3
        assert embedders() == {"words": "model-a:8", "lines": None}, "copied from the snapshot"
        assert progress and all(total == 3 for _, total in progress if total)
        assert (3, 3) in progress, "the bootstrap's progress counts the records it copies"
        await log.append(upsert("words", ["w3"], "model-b:8"))
        await log.append(upsert("lines", ["l2"], "model-b:4"))
        await mirror.run_once()
        assert mirror.statistics().bootstrap_total == 0, "not bootstrapping any more"
    assert embedders() == {"words": "model-b:8", "lines": "model-b:4"}, "recorded by follow"


async def test_the_commands_progress_counts_the_bootstrap_records_then_the_seqs(
    log: DeltaLog,
    config: LogConfig,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``deltalog mirror --once`` (stderr a pipe: plain lines): the bootstrap counts the
    snapshot's records against their total, then the seqs after it against the lag."""
    await append_random(log, rng, 6)
    async with Compactor(config, cache_dir=tmp_path / "c") as compactor:
        assert (await compactor.run_once()).status == "applied"
    records = sum((await compactor_counts(config, tmp_path / "c")).values())
    await append_random(log, rng, 3)
    code = await anyio.to_thread.run_sync(main, [*_cli(config, target, tmp_path / "m"), "--once"])
    assert code == 0
    err = capsys.readouterr().err.splitlines()
    boot = [line for line in err if line.startswith("mirror bootstrap: ")]
    assert boot and boot[-1].startswith(f"mirror bootstrap: {records}/{records} records ("), err
    follow = [line for line in err if line.startswith("mirror: ")]
    assert follow and follow[-1].startswith("mirror: 3/3 seqs ("), err


async def compactor_counts(config: LogConfig, cache: Path) -> dict[str, int]:
    async with Compactor(config, cache_dir=cache) as compactor:
        exported = await compactor.export(cache.parent / "counted")
    return exported.counts
