"""``deltalog soak``: the protocol under faults, crashes and pauses, for N minutes.

- **producers**: tasks in this process append mixed deltas (upserts, deletes
  and metadata patches over a bounded id space, in two collections) through
  group-commit producers; a **ledger** records what each was told: the seq
  it is durable at, or a failure.
- **compactors**: two ``deltalog compact --follow`` child processes with a
  short lease; **chaos** kills one at random (``kill -9``, then a restart)
  or pauses one past its lease (``SIGSTOP``, later ``SIGCONT``).
- **faults**: every request of producers and compactors goes through a
  ``deltalog.faults.FaultProxy`` with a seeded policy.

Then chaos and faults stop, a last compaction seals what is left, and the
log is held against the ledger: every acknowledged delta exactly once, at
its seq (else it is **lost**); no delta twice (**duplicated**); seqs dense;
``verify`` equal; the committed snapshot equal to a plain-Python reference
fold; hwm never went back. The exit status is 1 if any of that fails.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import anyio
import numpy as np

from deltalog.config import LogConfig
from deltalog.entry import (
    Delete,
    Delta,
    Entry,
    MetadataPatch,
    Seal,
    UpdateMetadata,
    Upsert,
)
from deltalog.errors import Conflict, Unavailable
from deltalog.fold import State, reference_state, state_differences
from deltalog.log import DeltaLog
from deltalog.producer import Producer
from deltalog.storage.create import ensure_storage
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.endpoint import FAKE_CREDENTIALS, EmbeddedEndpoint
from deltalog.storage.faults import FaultPolicy, FaultProxy, FaultStatistics

if TYPE_CHECKING:
    from compactor.runner import Compactor

__all__ = [
    "ChildProcess",
    "ChildProcesses",
    "Ledger",
    "compactor_argv",
    "compactor_errors",
    "produce",
    "random_delta",
    "register",
]

DIM = 8
ID_SPACE = 400
COLLECTIONS = ("words", "lines")
RUN_ENTRIES = 50
"""Entries per compaction run: short runs commit between the kills and pauses."""
PRODUCER_PAUSE = 0.2
"""Seconds between two deltas of a producer task: the embedded endpoint serves
requests one at a time, and a saturated one would starve the compactors'
heartbeats, which is not what the soak is about."""
"""Entries per compaction run: short runs commit between the kills and pauses."""


# -- child processes ----------------------------------------------------------------


class ChildProcess:
    """A child process whose output goes to files; killed, paused and awaited from async code."""

    def __init__(self, name: str, argv: list[str], *, logs: Path, env: dict[str, str]) -> None:
        self.name = name
        self.out_path = logs / f"{name}.out"
        self.err_path = logs / f"{name}.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env
            )
        self.paused = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def signal(self, signum: signal.Signals) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.signal(signal.SIGCONT)
        self.paused = False

    async def exited(self) -> int:
        """The exit status, once the process has exited (wrap it in ``anyio.fail_after``)."""
        while True:
            code = self.popen.poll()
            if code is not None:
                return code
            await anyio.sleep(0.02)

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")


class ChildProcesses:
    """Starts children and, on exit, kills every one still running: no strays, ever."""

    def __init__(self, logs: Path, env: dict[str, str] | None = None) -> None:
        self.logs = logs
        self.env = {**os.environ, **(env or {})}
        self.started: list[ChildProcess] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str]) -> ChildProcess:
        child = ChildProcess(f"{name}-{len(self.started)}", argv, logs=self.logs, env=self.env)
        self.started.append(child)
        return child

    def close(self) -> None:
        for child in self.started:
            if child.popen.poll() is None:
                child.popen.kill()
        for child in self.started:
            child.popen.wait()

    def __enter__(self) -> ChildProcesses:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def compactor_argv(
    config: LogConfig,
    *,
    cache_dir: Path,
    lease_ttl: float,
    grace: float,
    follow: bool = True,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """``python -m deltalog compact`` for ``config``'s log."""
    argv = [sys.executable, "-m", "deltalog", "compact", "--json"]
    argv += ["--bucket", config.bucket, "--table", config.table, "--log", config.log]
    if config.endpoint_url:
        argv += ["--endpoint-url", config.endpoint_url]
    argv += ["--cache-dir", str(cache_dir), "--lease-ttl", str(lease_ttl), "--grace", str(grace)]
    if follow:
        argv += ["--follow", "--poll-min", "0.1", "--poll-max", "1"]
    return argv + list(extra)


# -- the ledger and the producers ----------------------------------------------------


@dataclass
class Ledger:
    """What producers were told, by ``delta_id``."""

    acked: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def audit(self, entries: list[tuple[int, Entry]]) -> tuple[list[str], list[str]]:
        """The lost deltas (acknowledged, not exactly once at their seq) and the duplicated."""
        found: dict[str, list[int]] = {}
        for seq, entry in entries:
            for delta in entry.deltas:
                found.setdefault(delta.delta_id, []).append(seq)
        lost = [d for d, seq in self.acked.items() if found.get(d) != [seq]]
        duplicated = [d for d, seqs in found.items() if len(seqs) > 1]
        return lost, duplicated


def random_delta(rng: np.random.Generator, *, key: str | None = None) -> Delta:
    """An upsert, a delete or a metadata patch over a small id space."""
    collection = COLLECTIONS[int(rng.integers(len(COLLECTIONS)))]
    ids = [f"r{n}" for n in rng.choice(ID_SPACE, size=int(rng.integers(1, 4)), replace=False)]
    kind = rng.random()
    if kind < 0.7:
        op: Upsert | Delete | UpdateMetadata = Upsert(
            collection=collection,
            ids=ids,
            embeddings=rng.standard_normal((len(ids), DIM), dtype=np.float32),
            documents=[f"doc {i}" for i in ids],
            metadatas=[{"n": int(rng.integers(100)), "x": round(float(rng.random()), 3)}]
            * len(ids),
        )
    elif kind < 0.85:
        op = Delete(collection=collection, ids=ids)
    else:
        patch: MetadataPatch = {"label": str(rng.choice(["TOTAL", "TAX", "DATE"])), "n": None}
        op = UpdateMetadata(collection=collection, ids=ids, metadatas=[patch] * len(ids))
    return Delta(ops=[op], idempotency_key=key)


async def produce(
    producer: Producer,
    ledger: Ledger,
    rng: np.random.Generator,
    stop: anyio.Event,
    *,
    keyed: str | None = None,
    pause: float = 0.0,
) -> None:
    """Append until ``stop``, ``pause`` s apart; a keyed producer retries a failure once."""
    n = 0
    while not stop.is_set():
        await anyio.sleep(pause)
        n += 1
        delta = random_delta(rng, key=f"{keyed}-{n}" if keyed else None)
        for attempt in range(2 if keyed else 1):
            try:
                ledger.acked[delta.delta_id] = await producer.submit(delta)
                ledger.failed.pop(delta.delta_id, None)
                break
            except (Unavailable, Conflict) as exc:
                ledger.failed[delta.delta_id] = f"{type(exc).__name__} (attempt {attempt + 1})"


# -- chaos ----------------------------------------------------------------------------


@dataclass
class Tally:
    crashes: int = 0
    pauses: int = 0
    hwm_samples: int = 0
    hwm_advances: int = 0
    hwm_regressions: int = 0
    max_hwm: int = 0
    unexpected_exits: list[str] = field(default_factory=list)


class CompactorSlot:
    """One compactor that chaos kills (then restarts) or pauses; its cache outlives it."""

    def __init__(self, name: str, children: ChildProcesses, argv: list[str]) -> None:
        self.name = name
        self.children = children
        self.argv = argv
        self.child = children.start(name, argv)
        self.generations = [self.child]

    def restart(self) -> None:
        self.child = self.children.start(self.name, self.argv)
        self.generations.append(self.child)


async def chaos(
    slots: list[CompactorSlot], rng: np.random.Generator, ttl: float, tally: Tally
) -> None:
    """Every 3-9 s, kill a compactor (and restart it) or pause it for 1.5-3 lease ttls.

    Never two pauses at once: a pause is there to let the other one take over.
    """
    async with anyio.create_task_group() as tg:
        while True:
            await anyio.sleep(float(rng.uniform(3.0, 9.0)))
            for slot in slots:
                if slot.child.returncode is not None:
                    tally.unexpected_exits.append(
                        f"{slot.child.name}: {_tail(slot.child.stderr())}"
                    )
                    slot.restart()
            slot = slots[int(rng.integers(len(slots)))]
            if slot.child.paused:
                continue
            if any(s.child.paused for s in slots) or rng.random() < 0.5:
                slot.child.kill()
                with anyio.fail_after(10):
                    await slot.child.exited()
                tally.crashes += 1
                slot.restart()
            else:
                slot.child.pause()
                tally.pauses += 1
                tg.start_soon(_resume_later, slot.child, float(rng.uniform(1.5, 3.0)) * ttl)


async def _resume_later(child: ChildProcess, after: float) -> None:
    try:
        await anyio.sleep(after)
    finally:
        child.resume()


async def watch_hwm(table: DynamoTable, log_id: str, tally: Tally) -> None:
    """Sample the committed hwm until cancelled; count any step back."""
    while True:
        hwm = (await table.read_state(log_id)).hwm
        tally.hwm_samples += 1
        tally.hwm_regressions += hwm < tally.max_hwm
        tally.hwm_advances += hwm > tally.max_hwm
        tally.max_hwm = max(tally.max_hwm, hwm)
        await anyio.sleep(0.2)


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


# -- the run ------------------------------------------------------------------------------


@dataclass
class Outcome:
    acknowledged: int
    failed: int
    failed_in_log: int
    lost: list[str]
    duplicated: list[str]
    head: int
    hwm: int
    entries: int
    seals: int
    dense: bool
    verify_ok: bool
    verify_records: int
    reference_differences: list[str]
    faults: FaultStatistics
    tally: Tally
    compactor_errors: dict[str, int]
    seconds: float

    @property
    def ok(self) -> bool:
        return (
            not self.lost
            and not self.duplicated
            and self.dense
            and self.verify_ok
            and not self.reference_differences
            and self.hwm == self.head
            and self.tally.hwm_regressions == 0
            and not self.tally.unexpected_exits
        )


async def cmd_soak(args: argparse.Namespace) -> int:
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    with ExitStack() as stack:
        url = args.endpoint_url
        if not url:
            for name, value in FAKE_CREDENTIALS.items():
                os.environ.setdefault(name, value)
            url = stack.enter_context(EmbeddedEndpoint()).url
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deltalog-soak-")))
        children = stack.enter_context(ChildProcesses(work / "logs"))
        nonce = uuid.uuid4().hex[:8]
        config = LogConfig(
            bucket=args.bucket, table=f"{args.table}-{nonce}", log=f"soak-{nonce}", endpoint_url=url
        )
        outcome = await _soak(args, config, work, children)
    _report(args, config, outcome)
    return 0 if outcome.ok else 1


async def _soak(
    args: argparse.Namespace, config: LogConfig, work: Path, children: ChildProcesses
) -> Outcome:
    await ensure_storage(config)
    rng = np.random.default_rng(args.seed)
    policy = FaultPolicy(rate=args.fault_rate, ambiguous=args.ambiguous)
    ledger, tally = Ledger(), Tally()
    started = time.monotonic()
    async with AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(
            FaultProxy(config.endpoint_url or "", seed=args.seed)
        )
        faulty = replace(config, endpoint_url=proxy.url)
        table = await DynamoTable.connect(config)
        stack.push_async_callback(table.aclose)
        slots = [
            CompactorSlot(
                name,
                children,
                compactor_argv(
                    faulty,
                    cache_dir=work / name,
                    lease_ttl=args.lease_ttl,
                    grace=1.0,
                    extra=("--max-entries", str(RUN_ENTRIES)),
                ),
            )
            for name in ("compactor-a", "compactor-b")
        ]
        proxy.policy = policy
        print(
            f"soak: {args.minutes:g} min, seed {args.seed}, {args.producers} producer tasks, "
            f"{args.fault_rate:.0%} of requests faulted ({args.ambiguous:.0%} ambiguous), "
            f"lease ttl {args.lease_ttl:g}s; log {config.log}",
            flush=True,
        )
        await _run_chaos(args, faulty, slots, ledger, tally, rng, table)
        proxy.policy = None
        faults = proxy.statistics()
        await _stop_compactors(slots, config, table)
    return await _final_check(config, work, ledger, tally, faults, slots, started)


async def _run_chaos(
    args: argparse.Namespace,
    faulty: LogConfig,
    slots: list[CompactorSlot],
    ledger: Ledger,
    tally: Tally,
    rng: np.random.Generator,
    table: DynamoTable,
) -> None:
    stop = anyio.Event()
    async with (
        DeltaLog.open(faulty) as one,
        DeltaLog.open(faulty) as two,
        one.producer(linger_ms=20, max_deltas=32) as first,
        two.producer(linger_ms=20, max_deltas=32) as second,
        anyio.create_task_group() as producers,
    ):
        for task in range(args.producers):
            keyed = f"k{task}" if task == 0 else None
            run = functools.partial(produce, keyed=keyed, pause=PRODUCER_PAUSE)
            producers.start_soon(run, (first, second)[task % 2], ledger, rng, stop)
        async with anyio.create_task_group() as background:
            background.start_soon(chaos, slots, rng, args.lease_ttl, tally)
            background.start_soon(watch_hwm, table, faulty.keys.log_id, tally)
            background.start_soon(_progress, ledger, tally, args.minutes * 60)
            await anyio.sleep(args.minutes * 60)
            background.cancel_scope.cancel()
        stop.set()


async def _progress(ledger: Ledger, tally: Tally, seconds: float) -> None:
    start = time.monotonic()
    while True:
        await anyio.sleep(15)
        print(
            f"  t={time.monotonic() - start:.0f}/{seconds:.0f}s: {len(ledger.acked)} acknowledged, "
            f"hwm {tally.max_hwm}, {tally.crashes} crashes, {tally.pauses} pauses",
            flush=True,
        )


async def _stop_compactors(
    slots: list[CompactorSlot], config: LogConfig, table: DynamoTable
) -> None:
    """Let the compactors catch up without faults (a minute at most), then stop them."""
    for slot in slots:
        slot.child.resume()
        if slot.child.returncode is not None:
            slot.restart()
    with anyio.move_on_after(60):
        while True:
            head = await table.read_head(config.keys.log_id)
            if (await table.read_state(config.keys.log_id)).hwm >= head:
                break
            await anyio.sleep(0.5)
    for slot in slots:
        slot.child.signal(signal.SIGTERM)
    for slot in slots:
        with anyio.move_on_after(20) as waited:
            await slot.child.exited()
        if waited.cancelled_caught:
            slot.child.kill()


async def _final_check(
    config: LogConfig,
    work: Path,
    ledger: Ledger,
    tally: Tally,
    faults: FaultStatistics,
    slots: list[CompactorSlot],
    started: float,
) -> Outcome:
    from compactor.runner import Compactor

    async with Compactor(config, cache_dir=work / "final", grace=0, lease_ttl=10) as compactor:
        for _ in range(100):
            result = await compactor.run_once()
            if result.status != "busy" and result.hwm_after == await compactor.log.head():
                break
            await anyio.sleep(0.5)
        head = await compactor.log.head()
        reader = compactor.log.read()
        entries = [item async for item in reader]
        hwm = (await compactor.table.read_state(config.keys.log_id)).hwm
        verified = await compactor.verify()
        committed = await _committed_state(compactor)
    lost, duplicated = ledger.audit(entries)
    in_log = {d.delta_id for _, e in entries for d in e.deltas}
    expected = {c: r for c, r in reference_state(entries).items() if r}
    outputs = [child for slot in slots for child in slot.generations]
    return Outcome(
        acknowledged=len(ledger.acked),
        failed=len(ledger.failed),
        failed_in_log=len(in_log & set(ledger.failed)),
        lost=lost,
        duplicated=duplicated,
        head=head,
        hwm=hwm,
        entries=len(entries),
        seals=sum(isinstance(e, Seal) for _, e in entries),
        dense=[seq for seq, _ in entries] == list(range(1, head + 1)),
        verify_ok=verified.ok,
        verify_records=verified.records,
        reference_differences=state_differences(expected, committed)[:10],
        faults=faults,
        tally=tally,
        compactor_errors=compactor_errors(child.stderr() for child in outputs),
        seconds=time.monotonic() - started,
    )


async def _committed_state(compactor: Compactor) -> State:
    """The committed state: the checkpoint plus the committed tail, as ``export`` writes it."""
    from compactor.verify import sink_state
    from deltalog.snapshot.sink import ChromaSink

    scratch = compactor.cache.scratch
    tmp = Path(await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(dir=scratch)))
    try:
        exported = await compactor.export(tmp / "chroma")
        sink = await ChromaSink.open(exported.path)
        try:
            return {c: r for c, r in (await sink_state(sink)).items() if r}
        finally:
            await sink.aclose()
    finally:
        await anyio.to_thread.run_sync(shutil.rmtree, tmp)


def compactor_errors(stderrs: Iterable[str]) -> dict[str, int]:
    """The errors ``compact --follow`` reported and survived, by class (``log: Class: ...``)."""
    found: Counter[str] = Counter()
    for text in stderrs:
        for line in text.splitlines():
            parts = line.split(": ", 2)
            if len(parts) == 3 and parts[1].isidentifier() and parts[1][0].isupper():
                found[parts[1]] += 1
    return dict(found)


def _report(
    args: argparse.Namespace, config: LogConfig, o: Outcome, out: IO[str] | None = None
) -> None:
    faults = ", ".join(f"{kind} {n}" for kind, n in sorted(o.faults.faults.items())) or "none"
    errors = ", ".join(f"{kind} {n}" for kind, n in sorted(o.compactor_errors.items()))
    services = ", ".join(f"{s} {n}" for s, n in sorted(o.faults.by_service.items()))
    rows = [
        ("deltas acknowledged", f"{o.acknowledged}"),
        ("deltas failed", f"{o.failed} (told so; {o.failed_in_log} of them in the log once)"),
        ("lost", f"{len(o.lost)}" + (f"  e.g. {o.lost[:3]}" if o.lost else "")),
        (
            "duplicated",
            f"{len(o.duplicated)}" + (f"  e.g. {o.duplicated[:3]}" if o.duplicated else ""),
        ),
        ("entries", f"{o.entries} at seqs 1..{o.head} ({o.seals} seals), dense: {o.dense}"),
        ("requests", f"{o.faults.requests} through the proxy"),
        ("faults injected", f"{o.faults.injected} ({o.faults.ambiguous} ambiguous): {faults}"),
        ("faults by service", services or "none"),
        ("compactor crashes", f"{o.tally.crashes} (kill -9), all restarted"),
        ("compactor pauses", f"{o.tally.pauses} (SIGSTOP for 1.5-3 lease ttls), all resumed"),
        ("unexpected exits", f"{len(o.tally.unexpected_exits)}"),
        ("compactor errors", errors or "none"),
        ("commits", f"hwm advanced {o.tally.hwm_advances} times (sampled every 0.2 s)"),
        (
            "hwm",
            f"{o.hwm} (head {o.head}); {o.tally.hwm_regressions} regressions in "
            f"{o.tally.hwm_samples} samples",
        ),
        ("verify", f"{'ok' if o.verify_ok else 'DIFFERENT'} ({o.verify_records} records)"),
        ("reference fold", "equal" if not o.reference_differences else "DIFFERENT"),
        ("seconds", f"{o.seconds:.0f}"),
    ]
    stream = out or sys.stdout
    for name, value in rows:
        print(f"{name:<20} {value}", file=stream)
    for line in o.tally.unexpected_exits + o.reference_differences:
        print(f"  {line}", file=stream)
    print(f"soak {'passed' if o.ok else 'FAILED'} (seed {args.seed})", file=stream, flush=True)


def register(commands: Any) -> None:
    """Add ``soak`` to the ``deltalog`` parser."""
    soak = commands.add_parser(
        "soak", help="producers, a killed and paused compactor and network faults for N minutes"
    )
    soak.add_argument("--minutes", type=float, default=5.0, help="how long the chaos lasts")
    soak.add_argument("--seed", type=int, help="replay a run (default: random, printed)")
    soak.add_argument("--producers", type=int, default=8, help="producer tasks")
    soak.add_argument("--fault-rate", type=float, default=0.1, help="share of requests faulted")
    soak.add_argument("--ambiguous", type=float, default=0.5, help="share of faults ambiguous")
    soak.add_argument("--lease-ttl", type=float, default=3.0, help="the compactors' lease (s)")
    soak.add_argument("--endpoint-url", help="an S3 + DynamoDB endpoint (default: embedded)")
    soak.add_argument("--bucket", default="deltalog-soak", help="bucket (created if missing)")
    soak.add_argument("--table", default="deltalog-soak", help="table name prefix")
    soak.set_defaults(run=cmd_soak)
