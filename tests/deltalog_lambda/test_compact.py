"""The compactor handler, called as Lambda calls it, against moto's server.

Scheduled events are the rule's input (``{"log": ...}``) or EventBridge's
own "Scheduled Event"; notification batches are the real messages moto's
S3 sends to a real SQS queue when deltalog writes an entry.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import fields
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from compactor import Compactor
from compactor.lease import LeaseKeeper
from compactor.metrics import FIGURES
from compactor.runner import CompactionResult
from deltalog import DeltaLog, LogConfig
from deltalog.errors import (
    ConfigurationError,
    CorruptEntry,
    InvalidInput,
    LeaseLost,
    Unavailable,
)
from deltalog.snapshot.sink import ChromaSink, Sink
from deltalog.storage.aws import client
from deltalog.storage.faults import Fault, FaultProxy, Request
from deltalog.storage.table import LogState
from deltalog_lambda.budget import need
from deltalog_lambda.compact import CompactHandler
from tests.builders import delta
from tests.deltalog_lambda.conftest import NAMESPACE
from tests.deltalog_lambda.lambda_aws import Context, Queue, emf_lines, invoke

SCHEDULED_EVENT = {
    "version": "0",
    "id": "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa",
    "detail-type": "Scheduled Event",
    "source": "aws.events",
    "account": "123456789012",
    "time": "2026-11-30T12:00:00Z",
    "region": "us-east-1",
    "resources": ["arn:aws:events:us-east-1:123456789012:rule/deltalog-compact"],
    "detail": {},
}


@pytest.fixture
def compact(lambda_env: LogConfig) -> Iterator[CompactHandler]:
    handler = CompactHandler()
    yield handler
    handler.close()


async def append(config: LogConfig, rng: np.random.Generator, count: int) -> int:
    """Append ``count`` deltas, one entry each; the head."""
    async with DeltaLog.open(config) as log:
        for i in range(count):
            await log.append(delta(rng, f"d{i}"))
        return await log.head()


async def state_of(config: LogConfig) -> LogState:
    async with DeltaLog.open(config) as log:
        return await log.table.read_state(log.keys.log_id)


def held_sink(opened: threading.Event, gate: threading.Event) -> Callable[[Path], Awaitable[Sink]]:
    """A sink factory that holds the run, under its lease, until ``gate`` opens."""

    async def open_(path: Path) -> Sink:
        opened.set()
        await anyio.to_thread.run_sync(gate.wait)
        return await ChromaSink.open(path)

    return open_


async def test_a_scheduled_event_compacts_its_log_and_answers_the_result(
    compact: CompactHandler,
    lambda_env: LogConfig,
    rng: np.random.Generator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The answer is the result; the result is also logged at INFO (a scheduled invocation's
    answer goes nowhere), its fields as the record's ``run`` extra."""
    head = await append(lambda_env, rng, 3)
    with caplog.at_level(logging.INFO, logger="deltalog_lambda"):
        answer = await invoke(compact, {"log": lambda_env.log}, Context())
    (record,) = [r for r in caplog.records if hasattr(r, "run")]
    assert (record.levelno, record.run, record.__dict__["lag"]) == (logging.INFO, answer, 0)
    assert record.getMessage().startswith(f"{lambda_env.log}: applied 3 entries")
    assert set(answer) == {f.name for f in fields(CompactionResult)}
    assert (answer["status"], answer["log"], answer["hwm_after"]) == (
        "applied",
        lambda_env.log,
        head,
    )
    assert json.loads(json.dumps(answer)) == answer, "plain JSON"
    state = await state_of(lambda_env)
    assert (state.hwm, state.snapshot_key, state.owner) == (head, answer["snapshot_key"], None)
    # EventBridge's own scheduled event names no log: every log served.
    await append(lambda_env, rng, 1)
    again = await invoke(compact, SCHEDULED_EVENT, Context())
    assert (again["status"], again["hwm_after"]) == ("applied", head + 1)


async def test_with_little_time_left_the_run_ends_early_and_commits_what_it_applied(
    lambda_env: LogConfig, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """9 s left, 5 s kept to commit: 4 s for the run, less than a publish keeps (at least
    5 s): the replay stops after its first entry, the first checkpoint is deferred and hwm
    is committed alone; the next invocation, with time, does the rest and publishes."""
    head = await append(lambda_env, rng, 30)
    monkeypatch.setenv("DELTALOG_TIME_MARGIN", "5")
    handler = CompactHandler()
    try:
        short = await invoke(handler, {"log": lambda_env.log}, Context(remaining_ms=9_000))
        assert (short["status"], short["stopped"], short["checkpoint"]) == ("applied", "limit", "")
        assert 1 <= short["hwm_after"] < head
        assert (await state_of(lambda_env)).hwm == short["hwm_after"], "committed"
        rest = await invoke(handler, {"log": lambda_env.log}, Context())
    finally:
        handler.close()
    assert (rest["hwm_before"], rest["hwm_after"], rest["checkpoint"]) == (
        short["hwm_after"],
        head,
        "first",
    )


async def test_the_checkpoint_download_counts_against_the_invocation_deadline(
    lambda_env: LogConfig,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A cold run whose checkpoint download alone outlasts the old budget (the remaining time
    less the margin, counted from the replay's start): the run stops at the deadline with an
    ``Unavailable`` naming the download, inside the invocation, and commits nothing; the
    next invocation commits everything.

    Measured on the invocation's own clock (the context); about 6 s of it is the held
    download, the time the test is about.
    """
    assert lambda_env.endpoint_url is not None
    await append(lambda_env, rng, 2)
    async with Compactor(lambda_env, cache_dir=tmp_path / "first", checkpoint_ratio=0) as first:
        await first.run_once()
    head = await append(lambda_env, rng, 30)
    monkeypatch.setenv("DELTALOG_TIME_MARGIN", "3")
    context = Context(remaining_ms=8_000)  # deadline 5 s after the start; old budget 5 s

    async def past_the_old_budget() -> None:  # held until 5.5 s of the 8 s have passed
        await anyio.sleep(context.get_remaining_time_in_millis() / 1000 - 2.5)

    async with FaultProxy(lambda_env.endpoint_url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)

        def snapshots(r: Request) -> bool:
            return "/snapshots/" in r.path

        def entries(r: Request) -> bool:
            return "/entries/" in r.path

        proxy.script(Fault.DELAY, operation="GetObject", when=snapshots, until=past_the_old_budget)
        proxy.script(Fault.DELAY, operation="GetObject", when=entries, delay=0.25, times=200)
        handler = CompactHandler(compactor_options={"prefetch": 1})  # a replay of ~7 s
        try:
            with pytest.raises(Unavailable, match="deadline passed while getting the working"):
                await invoke(handler, {"log": lambda_env.log}, context)
            assert context.get_remaining_time_in_millis() > 0, "stopped inside the invocation"
            assert (await state_of(lambda_env)).hwm == 2
            proxy._script.clear()
            answer = await invoke(handler, {"log": lambda_env.log}, Context())
        finally:
            handler.close()
    assert (answer["status"], answer["hwm_after"]) == ("applied", head)


async def test_the_checkpoint_policy_comes_from_the_environment(
    lambda_env: LogConfig, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default a small run commits a tail; ``DELTALOG_CHECKPOINT_RATIO=0`` publishes every
    run; a bad value is a ``ConfigurationError`` naming the variable."""
    await append(lambda_env, rng, 2)
    handler = CompactHandler()
    try:
        first = await invoke(handler, {"log": lambda_env.log}, Context())
        await append(lambda_env, rng, 1)
        tail = await invoke(handler, {"log": lambda_env.log}, Context())
    finally:
        handler.close()
    assert (first["checkpoint"], tail["checkpoint"], tail["tail_entries"]) == ("first", "", 1)
    assert tail["working_copy"] == "warm", "the live copy stayed in /tmp between invocations"
    monkeypatch.setenv("DELTALOG_CHECKPOINT_RATIO", "0")
    monkeypatch.setenv("DELTALOG_MAX_TAIL_BYTES", "64MiB")
    await append(lambda_env, rng, 1)
    every = CompactHandler()
    try:
        assert every.settings.max_tail_bytes == 64 * 2**20
        published = await invoke(every, {"log": lambda_env.log}, Context())
    finally:
        every.close()
    assert (published["checkpoint"], published["tail_entries"]) == ("ratio", 0)
    for name, value in (("DELTALOG_CHECKPOINT_RATIO", "-1"), ("DELTALOG_MAX_TAIL_ENTRIES", "x")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigurationError, match=name):
            CompactHandler()
        monkeypatch.delenv(name)


async def test_no_time_left_at_all_is_a_configuration_error(
    compact: CompactHandler, lambda_env: LogConfig, rng: np.random.Generator
) -> None:
    await append(lambda_env, rng, 1)
    with pytest.raises(ConfigurationError, match="raise the function's timeout"):
        await invoke(compact, {"log": lambda_env.log}, Context(remaining_ms=10_000))
    assert (await state_of(lambda_env)).token == 0, "the lease was never taken"


async def test_the_lease_heartbeat_runs_during_a_handler_call(
    lambda_env: LogConfig, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A run held past its lease's ttl keeps the lease: renewals, and a rival finds it busy."""
    ttl = 0.9
    monkeypatch.setenv("DELTALOG_LEASE_TTL", str(ttl))
    head = await append(lambda_env, rng, 2)
    opened, gate = threading.Event(), threading.Event()
    handler = CompactHandler(compactor_options={"sink_factory": held_sink(opened, gate)})
    answers: list[dict[str, Any]] = []

    async def call() -> None:
        answers.append(await invoke(handler, {"log": lambda_env.log}, Context()))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            try:  # the gate opens whatever happens, or the call never returns
                first, renewed = await _renewals(lambda_env, opened, ttl)
                assert (renewed.owner, renewed.token) == (first.owner, first.token)
                async with Compactor(lambda_env, cache_dir=tmp_path / "rival") as rival:
                    assert (await rival.run_once()).status == "busy"
            finally:
                gate.set()
    finally:
        handler.close()
    (answer,) = answers
    assert (answer["status"], answer["hwm_after"], answer["token"]) == (
        "applied",
        head,
        first.token,
    )


async def _renewals(
    config: LogConfig, opened: threading.Event, ttl: float
) -> tuple[LogState, LogState]:
    """The state when the run took its lease, and once past its first expiry and renewed."""
    with anyio.fail_after(30):
        await anyio.to_thread.run_sync(opened.wait)
    first = renewed = await state_of(config)
    assert first.owner is not None
    with anyio.fail_after(30):
        while time.time() <= first.expires_at or renewed.expires_at <= first.expires_at + ttl / 3:
            await anyio.sleep(ttl / 6)
            renewed = await state_of(config)
    return first, renewed


async def test_a_busy_lease_is_a_success(
    compact: CompactHandler,
    lambda_env: LogConfig,
    rng: np.random.Generator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await append(lambda_env, rng, 1)
    async with DeltaLog.open(lambda_env) as log:
        keeper = LeaseKeeper(log.table, log.keys.log_id, ttl=60, owner="elsewhere")
        lease = await keeper.acquire()
        try:
            capsys.readouterr()
            answer = await invoke(compact, {"log": lambda_env.log}, Context())
        finally:
            await keeper.release(lease)
    assert answer["status"] == "busy"
    (emf,) = emf_lines(capsys.readouterr().out)
    assert (emf["BusyRuns"], emf["EntriesApplied"], emf["Lag"]) == ([1], [0], [1])


async def test_a_poison_entry_raises_and_is_counted(
    compact: CompactHandler,
    lambda_env: LogConfig,
    rng: np.random.Generator,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = await append(lambda_env, rng, 2)
    async with DeltaLog.open(lambda_env) as log:
        seq = await log.table.reserve(log.keys.log_id)
        assert await log.store.put_if_absent(log.keys.entry(seq), b"not an entry at all")
    capsys.readouterr()
    with pytest.raises(CorruptEntry), caplog.at_level(logging.INFO, logger="deltalog_lambda"):
        await invoke(compact, {"log": lambda_env.log}, Context())
    (record,) = [r for r in caplog.records if hasattr(r, "error")]
    assert (record.levelno, record.error["type"]) == (logging.ERROR, "CorruptEntry")
    assert (await state_of(lambda_env)).hwm == good, "what came before the poison is committed"
    (emf,) = emf_lines(capsys.readouterr().out)
    assert (emf["PoisonEntries"], emf["LostLeases"], emf["Lag"]) == ([1], [0], [1])


async def test_a_lost_lease_raises_and_is_counted(
    lambda_env: LogConfig,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DELTALOG_LEASE_TTL", "1.5")
    await append(lambda_env, rng, 2)
    opened, gate = threading.Event(), threading.Event()
    handler = CompactHandler(compactor_options={"sink_factory": held_sink(opened, gate)})
    errors: list[BaseException] = []

    async def call() -> None:
        try:
            await invoke(handler, {"log": lambda_env.log}, Context())
        except LeaseLost as exc:
            errors.append(exc)

    capsys.readouterr()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            try:
                with anyio.fail_after(30):
                    await anyio.to_thread.run_sync(opened.wait)
                async with DeltaLog.open(lambda_env) as log:  # a takeover, as after a long pause
                    later = time.time() + 3600
                    await log.table.acquire(log.keys.log_id, "thief", ttl=60, now=later)
            finally:
                gate.set()
    finally:
        handler.close()
    assert len(errors) == 1
    assert (await state_of(lambda_env)).hwm == 0, "nothing committed"
    (emf,) = emf_lines(capsys.readouterr().out)
    assert (emf["LostLeases"], emf["PoisonEntries"]) == ([1], [0])


async def test_a_log_not_served_is_refused(compact: CompactHandler, lambda_env: LogConfig) -> None:
    with pytest.raises(InvalidInput, match="not one this deployment serves"):
        await invoke(compact, {"log": "elsewhere"}, Context())


async def test_the_metrics_are_emf_lines_with_every_compaction_figure(
    compact: CompactHandler,
    lambda_env: LogConfig,
    rng: np.random.Generator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    head = await append(lambda_env, rng, 3)
    capsys.readouterr()
    answer = await invoke(compact, {"log": lambda_env.log}, Context())
    (emf,) = emf_lines(capsys.readouterr().out)
    (directive,) = emf["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == NAMESPACE
    assert directive["Dimensions"] == [["log"]]
    names = {m["Name"]: m["Unit"] for m in directive["Metrics"]}
    assert names == {f.name: f.unit for f in FIGURES}
    assert emf["log"] == lambda_env.log
    assert emf["EntriesApplied"] == [head]
    assert emf["VectorsApplied"] == [answer["vectors_upserted"]]
    assert emf["BytesPublished"] == [answer["snapshot_size"]] and answer["snapshot_size"] > 0
    assert emf["Lag"] == [0]
    assert emf["RunSeconds"] == [pytest.approx(answer["seconds"])]


async def test_warm_invocations_reuse_the_snapshot_cache(
    lambda_env: LogConfig,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A warm environment downloads no snapshot (its live copy is in /tmp); a cold one
    (empty /tmp) downloads the checkpoint."""
    assert lambda_env.endpoint_url is not None
    async with FaultProxy(lambda_env.endpoint_url) as proxy:  # counts requests, injects nothing
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)

        async def gets_of_a_run(handler: CompactHandler) -> int:
            await append(lambda_env, rng, 1)
            before = proxy.statistics().operations.get("GetObject", 0)
            answer = await invoke(handler, {"log": lambda_env.log}, Context())
            assert answer["status"] == "applied"
            return proxy.statistics().operations["GetObject"] - before

        warm = CompactHandler()
        try:
            await gets_of_a_run(warm)
            compactor = warm.compactor(lambda_env.log)
            assert await gets_of_a_run(warm) == 1, "the new entry only: the snapshot was in /tmp"
            assert warm.compactor(lambda_env.log) is compactor, "kept open across invocations"
        finally:
            warm.close()
        live = [p async for p in anyio.Path(warm.settings.cache_dir).rglob("live/live.json")]
        assert live, "the live copy is kept under DELTALOG_CACHE_DIR (/tmp)"
        monkeypatch.setenv("DELTALOG_CACHE_DIR", str(tmp_path / "cold"))
        cold = CompactHandler()
        try:
            assert await gets_of_a_run(cold) > 1, "a cold /tmp downloads the snapshot"
        finally:
            cold.close()


async def test_warm_invocations_apply_into_the_index_held_open_since_the_last_one(
    lambda_env: LogConfig, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compactor, kept per execution environment, keeps its live copy's Chroma client
    and index open between invocations (its warm sink); a reset, as after a failed call,
    closes it and leaves the live copy in /tmp, which the next invocation opens again."""
    monkeypatch.setenv("DELTALOG_CHECKPOINT_RATIO", "1000")  # the first checkpoint only
    await append(lambda_env, rng, 2)
    handler = CompactHandler()
    try:
        runs = []
        for _ in range(3):
            runs.append(await invoke(handler, {"log": lambda_env.log}, Context()))
            await append(lambda_env, rng, 1)
        held = handler.compactor(lambda_env.log).warm_sink.statistics()
        assert held.at == runs[-1]["hwm_after"] and held.path is not None
        handler.runtime.reset()
        assert not held.path.exists(), "closed and parked as the live copy"
        runs.append(await invoke(handler, {"log": lambda_env.log}, Context()))
    finally:
        handler.close()
    assert [(r["checkpoint"], r["working_copy"], r["warm_sink"]) for r in runs] == [
        ("first", "empty", False),
        ("", "warm", False),  # the live copy, opened again after the first checkpoint
        ("", "warm", True),  # the index held open since the invocation before
        ("", "warm", False),  # after the reset: the live copy from /tmp, opened again
    ]


# -- S3 notifications through SQS ---------------------------------------------------------


async def test_entry_notifications_through_sqs_wake_the_compactor_of_their_log(
    compact: CompactHandler, lambda_env: LogConfig, rng: np.random.Generator
) -> None:
    async with AsyncExitStack() as stack:
        queue = await Queue.create(stack, lambda_env, f"notify-{lambda_env.log}")
        s3 = await client(stack, lambda_env, "s3")
        config = {
            "QueueConfigurations": [{"QueueArn": queue.arn, "Events": ["s3:ObjectCreated:*"]}]
        }
        await s3.put_bucket_notification_configuration(
            Bucket=lambda_env.bucket, NotificationConfiguration=config
        )
        try:
            head = await append(lambda_env, rng, 3)
            messages = await queue.receive_all()
        finally:
            await s3.put_bucket_notification_configuration(
                Bucket=lambda_env.bucket, NotificationConfiguration={}
            )
        bodies = [json.loads(m["Body"]) for m in messages]
        assert any(b.get("Event") == "s3:TestEvent" for b in bodies)
        answer = await invoke(compact, queue.event(messages), Context())
        assert (answer["status"], answer["hwm_after"]) == ("applied", head)
        # The compactor's own snapshot upload notifies too, and wakes nothing.
        snapshot_only = queue.event(
            [
                {
                    **messages[-1],
                    "Body": json.dumps(_created(lambda_env.bucket, answer["snapshot_key"])),
                }
            ]
        )
        assert await invoke(compact, snapshot_only, Context()) == {"results": []}


def _created(bucket: str, key: str) -> dict[str, Any]:
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": bucket}, "object": {"key": key.replace("/", "%2F")}},
            }
        ]
    }


async def test_every_answer_of_the_handler_is_plain_json(
    lambda_env: LogConfig, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One invocation for three logs served: one applied, one with nothing new, one
    whose lease another compactor holds. The answer is what Lambda's runtime can send:
    plain JSON (no NaN, no value JSON does not have), each log's whole result."""
    idle, held = f"{lambda_env.log}-idle", f"{lambda_env.log}-held"
    monkeypatch.setenv("DELTALOG_LOGS", ",".join((lambda_env.log, idle, held)))
    head = await append(lambda_env, rng, 2)
    async with DeltaLog.open(lambda_env.with_log(held)) as log:
        await log.table.acquire(log.keys.log_id, "another-host", ttl=60, now=time.time())
    handler = CompactHandler()
    try:
        answer = await invoke(handler, SCHEDULED_EVENT, Context())
    finally:
        handler.close()
    assert json.loads(json.dumps(answer, allow_nan=False)) == answer
    results = {r["log"]: r for r in answer["results"]}
    assert {r["status"] for r in results.values()} == {"applied", "nothing", "busy"}
    assert (results[lambda_env.log]["status"], results[lambda_env.log]["hwm_after"]) == (
        "applied",
        head,
    )
    assert (results[idle]["status"], results[held]["status"]) == ("nothing", "busy")
    assert "another-host" in results[held]["stopped"]
    for result in results.values():
        assert set(result) == {f.name for f in fields(CompactionResult)}


# -- /tmp shared by several logs ----------------------------------------------------------


async def test_tmp_is_shared_by_logs_and_a_budget_evicts_the_least_recently_used(
    lambda_env: LogConfig,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three logs, one function: with room for all, each log's cache stays (warm); with a
    budget that holds the current run and not the others, the least recently used log's
    cache is evicted first (its compactor closed, its directory removed) and the runs go on."""
    a, b, c = (lambda_env.log, f"{lambda_env.log}-b", f"{lambda_env.log}-c")
    monkeypatch.setenv("DELTALOG_LOGS", f"{a},{b},{c}")
    for name in (a, b, c):
        await append(lambda_env.with_log(name), rng, 2)

    async def compact_each(handler: CompactHandler, names: tuple[str, ...]) -> None:
        for name in names:
            answer = await invoke(handler, {"log": name}, Context())
            assert answer["status"] == "applied"

    roomy = CompactHandler()
    try:
        await compact_each(roomy, (a, b, c))
        units = {n: roomy.cache_root / lambda_env.with_log(n).keys.cache_name for n in (a, b, c)}
        assert all(u.is_dir() for u in units.values()), "room for every log: all stay"
        sizes = {n: _tree_size(u) for n, u in units.items()}
    finally:
        roomy.close()
    # Room for one more run beside two caches: compacting c again evicts a (used longest ago).
    room = sizes[b] + sizes[c] + need(await state_of(lambda_env.with_log(c))) - sizes[c]
    monkeypatch.setenv("DELTALOG_CACHE_BYTES", str(room + 1024))
    tight = CompactHandler()
    try:
        kept = tight.compactor(a)
        await append(lambda_env.with_log(c), rng, 1)
        await compact_each(tight, (c,))
        assert not units[a].exists(), "the least recently used cache went"
        assert units[b].is_dir() and units[c].is_dir()
        assert tight.compactor(a) is not kept, "its compactor was closed, a new one opened"
        await append(lambda_env, rng, 1)
        await compact_each(tight, (a,))  # and a runs again, from its checkpoint
    finally:
        tight.close()


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
