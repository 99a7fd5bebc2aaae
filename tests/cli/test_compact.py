"""The compactor's commands, run as ``python -m deltalog`` processes against moto's server.

``compact`` (one run, and ``--follow`` as a daemon stopped by a signal),
``rebuild``, ``verify``, ``quarantine`` and the compactor's side of
``status``, with their exit statuses: 0 done, 1 an error, 3 lease busy, 4
``verify`` found differences.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import numpy as np
import pytest

from compactor import Compactor
from deltalog import Batch, DeltaLog, LogConfig
from deltalog.cli.soak import ChildProcesses, compactor_argv
from deltalog.codec import FLAG_SIGNED, decode_entry
from deltalog.entry import Seal
from deltalog.errors import UntrustedEntry
from deltalog.fold import fold
from deltalog.snapshot.sink import ChromaSink
from deltalog.storage.faults import Fault, FaultProxy, Request
from deltalog.storage.table import LogState
from tests.builders import delete, delta, patch
from tests.commands import Run, cli_env
from tests.compaction import (
    assert_states_equal,
    commit_altered_snapshot,
    committed_state,
    entry_read,
    held_once,
    lease_acquire,
    reference,
    state_read,
    until_reached,
    until_stopped,
)


def _where(config: LogConfig, log: str | None = None) -> list[str]:
    assert config.endpoint_url is not None
    return [
        "--bucket",
        config.bucket,
        "--table",
        config.table,
        "--log",
        log or config.log,
        "--endpoint-url",
        config.endpoint_url,
    ]


@dataclass(frozen=True)
class Cli:
    """Runs deltalog commands on one log, each compaction command with the same cache."""

    config: LogConfig
    cache: Path

    def argv(self, command: str, *args: str) -> list[str]:
        cache = [] if command in ("status", "quarantine") else ["--cache-dir", str(self.cache)]
        return [sys.executable, "-m", "deltalog", command, *_where(self.config), *cache, *args]

    async def __call__(
        self,
        command: str,
        *args: str,
        env: dict[str, str] | None = None,
        config: LogConfig | None = None,
    ) -> Run:
        """Run ``command``; ``env`` adds to the environment, ``config`` says where (a proxy)."""
        argv = replace(self, config=config or self.config).argv(command, *args)
        done = await anyio.run_process(argv, env=cli_env(**(env or {})), check=False)
        return Run(done.returncode, done.stdout.decode(), done.stderr.decode())

    async def status(self) -> dict[str, Any]:
        run = await self("status", "--json")
        assert run.code == 0, run.err
        status: dict[str, Any] = json.loads(run.out)
        return status


@pytest.fixture
def cli(config: LogConfig, tmp_path: Path) -> Cli:
    return Cli(config, tmp_path / "cache")


async def _state(log: DeltaLog) -> LogState:
    return await log.table.read_state(log.keys.log_id)


async def _compact_in_process(config: LogConfig, cache: Path) -> None:
    """Compaction where the command under test is another one (cheaper than a process)."""
    async with Compactor(config, cache_dir=cache) as compactor:
        assert (await compactor.run_once()).status == "applied"


async def test_compact_applies_then_has_nothing_to_do_and_status_json_shows_it(
    cli: Cli, log: DeltaLog, rng: np.random.Generator
) -> None:
    name = log.config.log
    await log.append(delta(rng, "a", rows=3))
    await log.append(delete("a#1"))
    await log.append(patch(["a#0"], [{"label": "TOTAL", "n": None}]))
    run = await cli("compact")
    assert run.code == 0, run.err
    state = await _state(log)
    assert state.snapshot_key is not None
    # The figures are the snapshot's net change: a#1, put and deleted in this run, was
    # never in it, so nothing was deleted from it.
    assert run.out.splitlines() == [
        f"{name}: applied 3 entries (hwm 0 -> 3): 2 vectors upserted, 0 deleted, 0 patched, "
        f"0 holes sealed in {_seconds(run.out)}s; checkpoint {state.snapshot_key} published "
        f"({state.snapshot_size} bytes, first)"
    ]
    again = await cli("compact")
    assert (again.code, again.out) == (0, f"{name}: nothing to do at hwm 3\n"), again.err

    status = await cli.status()
    assert (status["hwm"], status["lag"], status["head"]) == (3, 0, 3)
    assert status["state"]["snapshot_key"] == state.snapshot_key
    assert status["state"]["snapshot_size"] == state.snapshot_size > 0
    assert (status["state"]["owner"], status["state"]["token"]) == (None, 2)
    assert status["last_run"]["status"] == "nothing"
    assert (status["last_run"]["hwm_before"], status["last_run"]["hwm_after"]) == (3, 3)

    await log.append(delete("a#0", "a#1", "never-was"))  # one of the three is there
    third = await cli("compact", "--json")
    assert third.code == 0, third.err
    assert json.loads(third.out)["ids_deleted"] == 1, "only what was there is counted"
    assert (status["snapshot_hwm"], status["snapshot_bytes"]) == (3, state.snapshot_size)
    assert (status["tail_entries"], status["tail_bytes"]) == (0, 0)


async def test_a_run_commits_the_tail_and_status_shows_it_until_a_checkpoint(
    cli: Cli, log: DeltaLog, rng: np.random.Generator
) -> None:
    name = log.config.log
    await log.append(delta(rng, "a", rows=3))
    assert (await cli("compact")).code == 0
    checkpoint = await _state(log)
    await log.append(delta(rng, "b"))
    await log.append(delete("a#1"))
    tail_bytes = sum(
        [info.size async for info in log.store.list_after(log.keys.entries_prefix)][1:]
    )
    run = await cli("compact")
    assert run.code == 0, run.err
    assert run.out.splitlines() == [
        f"{name}: applied 2 entries (hwm 1 -> 3): 2 vectors upserted, 1 deleted, 0 patched, "
        f"0 holes sealed in {_seconds(run.out)}s; tail of 2 entries ({tail_bytes} bytes) after "
        f"checkpoint {checkpoint.snapshot_key} at seq 1"
    ]
    status = await cli.status()
    assert (status["hwm"], status["snapshot_hwm"], status["snapshot_bytes"]) == (
        3,
        1,
        checkpoint.snapshot_size,
    )
    assert (status["tail_entries"], status["tail_bytes"]) == (2, tail_bytes)
    assert status["state"]["snapshot_key"] == checkpoint.snapshot_key
    human = await cli("status")
    assert f"2 entries, {tail_bytes:,} bytes (seqs 2-3" in human.out
    assert "holds seq 1" in human.out

    forced = await cli("compact", "--checkpoint", "--json")
    assert forced.code == 0, forced.err
    result = json.loads(forced.out)
    assert (result["status"], result["checkpoint"], result["hwm_after"]) == (
        "checkpointed",
        "requested",
        3,
    )
    status = await cli.status()
    assert (status["snapshot_hwm"], status["tail_entries"], status["tail_bytes"]) == (3, 0, 0)
    assert status["state"]["snapshot_key"] == result["snapshot_key"] != checkpoint.snapshot_key


async def test_export_writes_a_plain_chroma_directory_at_the_committed_hwm(
    cli: Cli, log: DeltaLog, rng: np.random.Generator, tmp_path: Path
) -> None:
    """The checkpoint plus the committed tail, nothing past hwm; read with chromadb alone."""
    await log.append(delta(rng, "a", rows=3))
    assert (await cli("compact")).code == 0  # the first checkpoint, at seq 1
    await log.append(delta(rng, "b", rows=2))
    await log.append(delete("a#1"))
    await log.append(patch(["a#0"], [{"label": "TOTAL"}]))
    tail = await cli("compact", "--checkpoint-ratio", "1000")  # a committed tail of 3
    assert tail.code == 0, tail.err
    await log.append(delta(rng, "c"))  # past hwm: not exported
    state = await _state(log)
    assert (state.hwm, state.checkpoint_hwm) == (4, 1)

    out = tmp_path / "exported"
    run = await cli("export", "--out", str(out), "--json")
    assert run.code == 0, run.err
    record = json.loads(run.out)
    assert (record["hwm"], record["snapshot_hwm"], record["tail_entries"]) == (4, 1, 3)
    assert record["snapshot_key"] == state.snapshot_key
    want = await reference(log, to_seq=4)
    assert _plain_chroma(out) == {
        c: {i: (r.metadata or {}).get("label") for i, r in records.items()}
        for c, records in want.items()
    }
    assert record["counts"] == {c: len(r) for c, r in want.items()}
    human = await cli("export", "--out", str(tmp_path / "again"))
    assert human.code == 0, human.err
    assert human.out.startswith(f"{log.config.log}: exported hwm 4 to ")


async def test_export_refuses_a_directory_that_is_not_empty(
    cli: Cli, log: DeltaLog, rng: np.random.Generator, tmp_path: Path
) -> None:
    await log.append(delta(rng, "a"))
    assert (await cli("compact")).code == 0
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    run = await cli("export", "--out", str(out))
    assert run.code == 1
    assert f"{out} is a directory that is not empty: export into a new" in run.err
    assert _listing(out) == ["mine.txt"], "nothing was written"
    file = tmp_path / "taken.sqlite3"
    file.write_text("a file")
    run = await cli("export", "--out", str(file))
    assert run.code == 1
    assert f"{file} is a file: export into a new (or empty) directory" in run.err
    assert file.read_text() == "a file"


async def test_export_to_another_file_system_appears_whole(
    log: DeltaLog, config: LogConfig, rng: np.random.Generator, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The target is on another file system than the cache (the rename out of the cache
    fails with EXDEV, as the kernel answers): a copy into a scratch directory beside the
    target, then one rename; nothing else is left."""
    await log.append(delta(rng, "a", rows=2))
    out = tmp_path / "elsewhere" / "out"
    crossed: list[Path] = []
    async with Compactor(config, cache_dir=tmp_path / "cache") as compactor:
        await compactor.run_once()
        monkeypatch.setattr(Path, "rename", _rename_across(out, crossed))
        result = await compactor.export(out)
    assert crossed, "the rename across file systems was tried first"
    assert (result.path, _listing(out.parent)) == (out, ["out"]), "no scratch left"
    assert _plain_chroma(out) == {"words": {"a#0": "l0", "a#1": "l1"}}


async def test_export_to_another_file_system_that_fills_up_leaves_no_target(
    log: DeltaLog, config: LogConfig, rng: np.random.Generator, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """As above, and the copy across fails partway (ENOSPC after its first file): the
    export raises, the target does not exist, and no scratch is left beside it."""
    await log.append(delta(rng, "a", rows=2))
    out = tmp_path / "elsewhere" / "out"
    copyfile = shutil.copyfile
    copied: list[str] = []

    def filling(src: Any, dst: Any, **kwargs: Any) -> Any:
        if out.parent in Path(dst).parents:  # the other file system
            if copied:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
            copied.append(str(dst))
        return copyfile(src, dst, **kwargs)

    async with Compactor(config, cache_dir=tmp_path / "cache") as compactor:
        await compactor.run_once()
        monkeypatch.setattr(Path, "rename", _rename_across(out, []))
        monkeypatch.setattr(shutil, "copyfile", filling)
        with pytest.raises(OSError, match="No space left"):  # shutil.Error lists each file
            await compactor.export(out)
    assert copied, "it failed partway"
    assert not out.exists()
    assert _listing(out.parent) == [], "no scratch left"


def _rename_across(out: Path, crossed: list[Path]) -> Callable[[Path, Any], Path]:
    """``Path.rename`` as if ``out`` were on another file system than the cache: the
    rename of a working copy to it fails with EXDEV, as the kernel answers."""
    rename = Path.rename

    def across(self: Path, target: Any) -> Path:
        if Path(target) == out and self.parent.name == "work":  # out of the cache
            crossed.append(self)
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return rename(self, target)

    return across


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def _plain_chroma(path: Path) -> dict[str, dict[str, object]]:
    """Ids and labels per collection, read from ``path`` with chromadb alone."""
    import chromadb

    client = chromadb.PersistentClient(path=str(path))
    try:
        found: dict[str, dict[str, object]] = {}
        for collection in client.list_collections():
            got = client.get_collection(collection.name, embedding_function=None).get()
            metadatas: list[Any] = list(got["metadatas"] or [])
            metadatas += [None] * (len(got["ids"]) - len(metadatas))
            found[collection.name] = {
                i: (m or {}).get("label") for i, m in zip(got["ids"], metadatas, strict=True)
            }
        return {c: r for c, r in found.items() if r}
    finally:
        client.close()  # type: ignore[attr-defined]


def _seconds(summary: str) -> str:
    found = re.search(r" in (\d+\.\d)s;", summary)
    assert found, summary
    return found.group(1)


async def test_a_held_lease_exits_3_and_status_shows_the_holder(
    cli: Cli, log: DeltaLog, rng: np.random.Generator
) -> None:
    await log.append(delta(rng, "a"))
    await _compact_in_process(log.config, cli.cache)
    committed = await _state(log)
    await log.append(delta(rng, "b"))
    holder = "other-host:4242:cafe0123"
    await log.table.acquire(log.keys.log_id, holder, ttl=60, now=time.time())
    busy = await cli("compact")
    assert busy.code == 3, busy.err
    assert len(busy.out.splitlines()) == 1
    assert f"{log.config.log}: lease busy" in busy.out and holder in busy.out
    assert re.search(
        rf"held by {holder} until \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in \d+\.\d s\)", busy.out
    ), busy.out
    assert (await _state(log)).hwm == 1

    text = await cli("status")
    assert text.code == 0, text.err
    lines = text.out.splitlines()
    for line in (
        "hwm        1",
        "lag        1",
        f"checkpoint {committed.snapshot_key} ({committed.snapshot_size:,} bytes), holds seq 1",
        "tail       empty",
    ):
        assert line in lines, (line, text.out)
    assert re.search(
        rf"^lease      held by {holder} until [-0-9: ]+ UTC \(in \d+\.\d s\), token 2$",
        text.out,
        re.M,
    ), text.out
    assert re.search(r"^last run   [-0-9: ]+ UTC: applied, hwm 0 -> 1$", text.out, re.M), text.out


async def test_a_poison_entry_exits_1_until_quarantined(
    cli: Cli, log: DeltaLog, rng: np.random.Generator
) -> None:
    await log.append(delta(rng, "a"))
    poison = await log.table.reserve(log.keys.log_id)
    assert await log.store.put_if_absent(log.keys.entry(poison), b"garbage from a broken writer")
    await log.append(delta(rng, "c"))
    failed = await cli("compact")
    assert failed.code == 1
    assert failed.out == ""
    assert "CorruptEntry" in failed.err and "Traceback" not in failed.err
    assert f"log={log.config.log}" in failed.err and f"seq={poison}" in failed.err
    assert re.search(r"CorruptEntry: \w.+ \[log=", failed.err), failed.err  # the reason
    state = await _state(log)
    assert state.hwm == poison - 1, "everything before the poison entry is committed"
    last_run = json.loads(state.last_run)
    assert last_run["status"] == "error" and "CorruptEntry" in last_run["error"]

    reason = "garbage bytes from a broken writer"
    marked = await cli("quarantine", "--seq", str(poison), "--reason", reason)
    assert marked.code == 0, marked.err
    assert f"seq {poison} quarantined (kept in the log" in marked.out
    passed = await cli("compact")
    assert passed.code == 0, passed.err
    assert f"applied 2 entries (hwm {poison - 1} -> {poison + 1})" in passed.out
    text = await cli("status")
    assert f"quarantine {poison} ({reason})" in text.out.splitlines(), text.out
    assert "hwm        3" in text.out.splitlines()


async def test_rebuild_publishes_only_when_asked_and_never_lower_without_force(
    cli: Cli, log: DeltaLog, rng: np.random.Generator
) -> None:
    for name in ("a", "b", "c"):
        await log.append(delta(rng, name))
    await _compact_in_process(log.config, cli.cache)
    committed = await _state(log)

    plain = await cli("rebuild")
    assert plain.code == 0, plain.err
    assert re.fullmatch(
        rf"{log.config.log}: rebuilt to seq 3 from 3 entries, 6 vectors in \d+\.\ds; "
        r"snapshot \S+ \(\d+ bytes\), not published\n",
        plain.out,
    ), plain.out
    assert re.search(
        r"rebuild: 3/3 seqs \([\d.,]+/s\), 3 entries \([\d,]+/s\), 6 vectors \([\d,]+/s\)",
        plain.err,
    ), (
        "progress on stderr",
        plain.err,
    )
    assert (await _state(log)).snapshot_key == committed.snapshot_key
    quiet = await cli("rebuild", "-q")
    assert (quiet.code, quiet.err) == (0, ""), "-q: no progress"
    assert quiet.out.startswith(f"{log.config.log}: rebuilt to seq 3"), quiet.out

    published = await cli("rebuild", "--publish", "--json")
    assert published.code == 0, published.err
    result = json.loads(published.out)
    assert (result["published"], result["hwm"]) == (True, 3)
    state = await _state(log)
    assert state.snapshot_key == result["snapshot_key"] != committed.snapshot_key
    assert (state.hwm, state.owner, state.snapshot_sha256) == (3, None, result["snapshot_sha256"])

    refused = await cli("rebuild", "--to-seq", "1", "--publish")
    assert refused.code == 1
    assert "below the committed hwm 3" in refused.err and "--force" in refused.err
    assert (await _state(log)).snapshot_key == result["snapshot_key"]

    rolled = await cli("rebuild", "--to-seq", "1", "--publish", "--force", "--json")
    assert rolled.code == 0, rolled.err
    state = await _state(log)
    assert (state.hwm, state.snapshot_key) == (1, json.loads(rolled.out)["snapshot_key"])
    assert json.loads(state.last_run) == {
        "at": pytest.approx(time.time(), abs=120),
        "status": "rebuilt",
        "hwm_before": 3,
        "hwm_after": 1,
    }


async def test_verify_exits_0_when_equal_and_4_listing_the_differences(
    cli: Cli, log: DeltaLog, config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    await log.append(delta(rng, "a", rows=3))
    await log.append(delta(rng, "b"))
    await _compact_in_process(config, cli.cache)
    equal = await cli("verify")
    assert (equal.code, equal.out.splitlines()) == (
        0,
        [
            "verify at hwm 2: 5 records, equal",
            "index recall@10 1.0000 over 5 sampled queries (threshold 0.99): ok",
        ],
    ), equal.err
    # Progress on stderr (a pipe here: plain lines): each step, the rebuild counted.
    steps = [line.split(":", 1)[0] + ":" + line.split(":", 2)[1] for line in equal.err.splitlines()]
    assert "verify: rebuild" in steps, equal.err
    assert re.search(r"^verify: rebuild: 2/2 seqs", equal.err, re.M), equal.err
    quiet = await cli("verify", "-q")
    assert (quiet.code, quiet.err) == (0, ""), "-q: no progress"
    await _commit_a_snapshot_missing(config, tmp_path / "tamper", "a#1")
    found = await cli("verify")
    assert found.code == 4, found.err
    assert found.out.splitlines()[:2] == [
        "words/a#1: missing",
        "verify at hwm 2: 4 records, 1 differences",
    ]


async def test_verify_index_flags(
    cli: Cli, log: DeltaLog, config: LogConfig, rng: np.random.Generator
) -> None:
    await log.append(delta(rng, "a", rows=3))
    await _compact_in_process(config, cli.cache)
    checked = await cli("verify", "--json", "--index-queries", "2", "--min-recall", "1")
    assert checked.code == 0, checked.err
    result = json.loads(checked.out)
    assert (result["ok"], result["index_recall"]) == (True, 1.0)
    assert result["index"] == {"queries": 2, "min_recall": 1.0, "recall": {"words": 1.0}}
    skipped = await cli("verify", "--index-queries", "0")
    assert skipped.out.splitlines()[-1] == "index check skipped (--index-queries 0)"
    for flag, value in (("--min-recall", "1.5"), ("--index-queries", "-1")):
        bad = await cli("verify", flag, value)
        assert bad.code == 2 and flag in bad.err and "Traceback" not in bad.err, bad.err


async def test_follow_reports_a_setup_error_like_any_command(
    config: LogConfig, tmp_path: Path
) -> None:
    cli = Cli(replace(config, table=f"{config.table}-missing"), tmp_path / "cache")
    run = await cli("compact", "--follow", "--logs", "x,y")
    assert run.code == 2, "a configuration error"
    assert "ConfigurationError" in run.err and "does not exist" in run.err
    assert "Traceback" not in run.err


async def _commit_a_snapshot_missing(config: LogConfig, cache: Path, id_: str) -> None:
    """Commit, at the same hwm, the committed snapshot without one record."""

    async def remove(work: Path) -> None:
        async with await ChromaSink.open(work) as sink:
            await sink.apply(fold([(1, Batch(entry_id="tamper", deltas=[delete(id_)]))]))

    await commit_altered_snapshot(config, cache, remove)


async def test_rebuild_publish_waits_for_a_followers_lease_and_both_go_on(
    cli: Cli, log: DeltaLog, config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    """A ``compact --follow`` is mid-run (held at its first entry read, its heartbeat
    alive) when ``rebuild --publish`` asks for the lease: the rebuild waits, the run
    finishes and releases it, the rebuild publishes, and the follower carries on."""
    for name in ("a", "b", "c"):
        await log.append(delta(rng, name))
    tried = anyio.Event()
    acquired: list[bool] = []

    def refused_then_read(request: Request) -> bool:
        """The rebuild's first acquire, then the state read that follows its refusal."""
        if lease_acquire(request):
            acquired.append(True)
        elif acquired and state_read(request):
            tried.set()
        return False

    async with (
        held_once(config, entry_read) as (follower_url, reached, go),
        FaultProxy(config.endpoint_url or "") as watcher,
    ):
        # Inside the proxies: the follower is killed before they close.
        with ChildProcesses(tmp_path / "children", env=cli_env()) as children:
            watcher.script(Fault.DELAY, when=refused_then_read)
            argv = compactor_argv(
                replace(config, endpoint_url=follower_url),
                cache_dir=tmp_path / "follower",
                lease_ttl=1.0,
                grace=60,
                extra=("--poll-max", "0.2"),
            )
            follower = children.start("follower", argv)
            await until_reached(reached, follower)  # mid-run: it holds the lease and renews it
            results: list[Run] = []

            async def rebuild() -> None:
                watched = replace(config, endpoint_url=watcher.url)
                run = await cli("rebuild", "--publish", "--json", "--wait", "60", config=watched)
                results.append(run)

            async with anyio.create_task_group() as tg:
                tg.start_soon(rebuild)
                with anyio.fail_after(60):
                    await tried.wait()  # the rebuild found the lease busy
                go.set()  # the follower's run goes on, commits and releases
            (run,) = results
            assert run.code == 0, run.err
            rebuilt = json.loads(run.out)
            assert (rebuilt["published"], rebuilt["hwm"]) == (True, 3)
            state = await _state(log)
            assert state.snapshot_key == rebuilt["snapshot_key"] and state.hwm == 3
            await log.append(delta(rng, "after"))
            assert await _eventually(lambda: _true_state(log, 4), 60), follower.stderr()
            assert follower.returncode is None, follower.stderr()
    async with Compactor(config, cache_dir=tmp_path / "check") as c:
        assert (await c.verify()).ok


async def _true_state(log: DeltaLog, hwm: int) -> bool:
    state = await _state(log)
    return state.hwm == hwm and state.owner is None


async def test_quarantine_writes_a_signed_seal_a_verifying_reader_accepts(
    cli: Cli, log: DeltaLog, rng: np.random.Generator, tmp_path: Path
) -> None:
    key, other = bytes.fromhex("c3" * 32), bytes.fromhex("d4" * 32)
    signed = replace(log.config, signing_key=key, verify_keys={key})
    async with DeltaLog.open(signed) as writer:
        await writer.append(delta(rng, "a"))
        hole = await writer.table.reserve(writer.keys.log_id)  # reserved, never written
        await writer.append(delta(rng, "b"))
    reason = "its producer died"
    run = await cli(
        "quarantine",
        "--seq",
        str(hole),
        "--reason",
        reason,
        env={"DELTALOG_SIGNING_KEY": key.hex()},
    )
    assert run.code == 0, run.err
    assert f"seq {hole} quarantined (was missing: sealed)" in run.out
    stored = await log.store.get(log.keys.entry(hole))
    assert stored is not None and stored.data[5] == FLAG_SIGNED
    seal = decode_entry(stored.data, seq=hole, verifier=signed.verifier)
    assert isinstance(seal, Seal) and (seal.kind, seal.reason) == ("quarantine", reason)
    with pytest.raises(UntrustedEntry, match="not trusted"):
        decode_entry(
            stored.data, seq=hole, verifier=replace(log.config, verify_keys={other}).verifier
        )
    async with DeltaLog.open(signed) as reader:  # checks every signature, no quarantine marks
        assert [seq async for seq, _ in reader.read()] == [1, hole, 3]
    async with Compactor(signed, cache_dir=tmp_path / "verifying", grace=3600) as c:
        result = await c.run_once()
        assert (result.hwm_after, result.seals_written) == (3, 0)
        assert set((await committed_state(c))["words"]) == {"a#0", "a#1", "b#0", "b#1"}


# -- compact --follow ---------------------------------------------------------------------


@dataclass
class Daemon:
    process: anyio.abc.Process
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    @property
    def stdout(self) -> str:
        return "".join(self.out)


async def _drain(stream: anyio.abc.ByteReceiveStream | None, into: list[str]) -> None:
    assert stream is not None
    async for chunk in stream:
        into.append(chunk.decode())


@asynccontextmanager
async def _daemon(argv: list[str]) -> AsyncIterator[Daemon]:
    """Run ``argv``, collecting its output; killed on the way out if still running."""
    process = await anyio.open_process(argv, env=cli_env())
    daemon = Daemon(process)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_drain, process.stdout, daemon.out)
            tg.start_soon(_drain, process.stderr, daemon.err)
            try:
                yield daemon
            finally:
                if process.returncode is None:
                    process.kill()
                with anyio.CancelScope(shield=True):
                    await process.wait()
    finally:
        await process.aclose()


async def _eventually(check: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    """Poll ``check`` until it holds or ``seconds`` pass; whether it held."""
    with anyio.move_on_after(seconds):
        while not await check():  # noqa: ASYNC110 (polling another process's effects)
            await anyio.sleep(0.02)
        return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_follow_compacts_two_logs_and_stops_cleanly_on_a_signal(
    signum: signal.Signals, config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    configs = [replace(config, log=f"{config.log}-{suffix}") for suffix in ("a", "b")]
    names = ",".join(c.log for c in configs)
    argv = [
        *Cli(configs[0], tmp_path / "cache").argv("compact"),
        *("--follow", "--logs", names, "--poll-min", "0.05", "--poll-max", "0.2"),
    ]
    async with (
        DeltaLog.open(configs[0]) as a,
        DeltaLog.open(configs[1]) as b,
        _daemon(argv) as daemon,
    ):
        logs = (a, b)

        async def caught_up() -> bool:
            return all([(await _state(log)).hwm == await log.head() for log in logs])

        banner = f"following {', '.join(c.log for c in configs)}; SIGINT or SIGTERM stops"
        ready = await _eventually(lambda: _true(banner in daemon.stderr), 30)
        assert ready, daemon.stderr
        for i, log in enumerate(logs):
            await log.append(delta(rng, f"first{i}"))
            await log.append(delete(f"first{i}#0"))
        assert await _eventually(caught_up, 30), daemon.stderr
        # The hwm is committed before the lease is released; the result is
        # printed after the release, so wait for it before reading the state.
        printed = [f"{log.config.log}: applied" for log in logs]
        assert await _eventually(lambda: _true(all(p in daemon.stdout for p in printed)), 30)
        first = [await _state(log) for log in logs]
        for log, state in zip(logs, first, strict=True):  # each log under its own lease
            assert (state.owner, state.hwm) == (None, 2), state
            assert state.token >= 1 and json.loads(state.last_run)["status"] == "applied"
            assert (state.snapshot_key or "").startswith(log.keys.snapshots_prefix)

        for i, log in enumerate(logs):  # arriving while the daemon follows
            for j in range(12):
                await log.append(delta(rng, f"more{i}-{j}"))
        # Stop while a run holds a lease: freeze the daemon seen holding one, signal, wake it.
        await _stopped_holding_a_lease(daemon, logs, rng)
        daemon.process.send_signal(signum)
        daemon.process.send_signal(signal.SIGCONT)
        with anyio.fail_after(20):  # stops promptly: it does not finish the run in progress
            code = await daemon.process.wait()
        assert await _eventually(lambda: _true("leases released" in daemon.stderr), 5)
        assert code == 0, daemon.stderr
        assert f"received {signum.name}: stopping" in daemon.stderr
        assert "Traceback" not in daemon.stderr
        for log in logs:
            assert (await _state(log)).owner is None, "the lease is released"
            work = tmp_path / "cache" / log.keys.cache_name / "work"
            assert list(work.iterdir()) == [], "no working copy left behind"
        # Whatever the signal interrupted, the next run converges.
        for log, cfg in zip(logs, configs, strict=True):
            async with Compactor(cfg, cache_dir=tmp_path / "after") as c:
                await c.run_once()
                assert (await _state(log)).hwm == await log.head()
                assert_states_equal(await committed_state(c), await reference(log))


async def _stopped_holding_a_lease(
    daemon: Daemon, logs: tuple[DeltaLog, ...], rng: np.random.Generator
) -> None:
    """SIGSTOP ``daemon`` while (seen stopped) it holds the lease of one of ``logs``."""
    pid = daemon.process.pid
    held = f":{pid}:"

    async def holds() -> bool:
        return any([held in ((await _state(log)).owner or "") for log in logs])

    with anyio.fail_after(120):
        while True:
            if not await _eventually(holds, 5):  # caught up meanwhile: give it work
                for log in logs:
                    await log.append(delta(rng, f"more-{time.monotonic_ns()}"))
                continue
            daemon.process.send_signal(signal.SIGSTOP)
            await until_stopped(pid)
            if await holds():
                return
            daemon.process.send_signal(signal.SIGCONT)  # it released in between: again


async def _true(value: bool) -> bool:
    return value


def _scrape(url: str) -> dict[str, float]:
    """``name{labels} value`` lines of a Prometheus text exposition."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def test_follow_serves_the_compactor_figures_for_prometheus(
    config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    argv = [
        *Cli(config, tmp_path / "cache").argv("compact"),
        *("--follow", "--poll-min", "0.05", "--poll-max", "0.2"),
        *("--metrics-port", "0", "--metrics-addr", "127.0.0.1"),
    ]
    label = f'{{log="{config.log}",shard=""}}'
    async with DeltaLog.open(config) as log, _daemon(argv) as daemon:
        found = re.compile(r"metrics on (http://127\.0\.0\.1:\d+/metrics)")
        assert await _eventually(lambda: _true(bool(found.search(daemon.stderr))), 30)
        match = found.search(daemon.stderr)
        assert match is not None
        url = match.group(1)
        before = await anyio.to_thread.run_sync(_scrape, url)
        assert before[f"deltalog_entries_applied_total{label}"] == 0  # there from the start
        for i in range(3):
            await log.append(delta(rng, f"p{i}"))
        head = await log.head()

        async def caught_up() -> bool:
            now = await anyio.to_thread.run_sync(_scrape, url)
            return (
                now.get(f"deltalog_entries_applied_total{label}") == head
                and now.get(f"deltalog_lag_entries{label}") == 0
            )

        assert await _eventually(caught_up, 30), daemon.stderr
        samples = await anyio.to_thread.run_sync(_scrape, url)
        daemon.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(20):
            assert await daemon.process.wait() == 0
    assert samples[f"deltalog_vectors_applied_total{label}"] == 2 * head
    assert samples[f"deltalog_bytes_published_total{label}"] > 0
    assert samples[f"deltalog_run_seconds_count{label}"] >= 1
    for name in ("busy_runs", "lost_leases", "poison_entries"):
        assert samples[f"deltalog_{name}_total{label}"] == 0


async def test_metrics_port_needs_follow(config: LogConfig, tmp_path: Path) -> None:
    argv = Cli(config, tmp_path / "cache").argv("compact", "--metrics-port", "0")
    process = await anyio.run_process(argv, env=cli_env(), check=False)
    assert process.returncode == 2
    assert b"--metrics-port needs --follow" in process.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--part-size", "12XB"), "argument --part-size: '12XB' is not a size"),
        (("--max-tail-bytes", "lots"), "argument --max-tail-bytes: 'lots' is not a size"),
        (("--max-tail-entries", "2k"), "argument --max-tail-entries: '2k' is not an entry cap"),
    ],
)
def test_a_bad_size_or_cap_is_a_usage_error(
    flags: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from deltalog.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["compact", "--bucket", "b", "--table", "t", *flags])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_the_checkpoint_flags_reach_the_policy(tmp_path: Path) -> None:
    from deltalog.cli import build_parser
    from deltalog.cli.compact import _compactor

    def policy(*flags: str) -> tuple[object, ...]:
        args = build_parser().parse_args(["compact", "--bucket", "b", "--table", "t", *flags])
        p = _compactor(args).policy
        return (p.ratio, p.max_tail_entries, p.max_tail_bytes)

    assert policy() == (0.1, "auto", 256 * 2**20)
    assert policy("--checkpoint-ratio", "0", "--max-tail-entries", "0") == (0.0, None, 256 << 20)
    assert policy("--max-tail-entries", "500", "--max-tail-bytes", "0") == (0.1, 500, None)
    assert policy("--max-tail-bytes", "16MiB")[2] == 16 * 2**20


def _upload_part(request: Request) -> bool:
    """A multipart upload's part (the proxy names it PutObject, with a part number)."""
    return request.method == "PUT" and "partNumber=" in request.query


async def _open_uploads(config: LogConfig, prefix: str) -> list[str]:
    """The multipart uploads S3 (moto) holds under ``prefix``, asked with a plain client."""
    import aioboto3

    session = aioboto3.Session(region_name="us-east-1")
    async with session.client("s3", endpoint_url=config.endpoint_url) as s3:
        listed = await s3.list_multipart_uploads(Bucket=config.bucket, Prefix=prefix)
    return [upload["Key"] for upload in listed.get("Uploads", [])]


async def test_ctrl_c_during_a_publish_aborts_the_upload_and_says_what_was_done(
    cli: Cli, log: DeltaLog, rng: np.random.Generator
) -> None:
    """SIGINT while a part of the checkpoint's multipart upload is held at the proxy. A run
    that publishes commits its hwm before it uploads, so the entries are committed (on the
    committed tail, no checkpoint yet); the command aborts the upload on its way out (none
    left on S3), releases the lease, exits 130 and says what was committed; the state's
    last run says it was interrupted after committing, and a rerun publishes the checkpoint."""
    for i in range(3):
        await log.append(delta(rng, f"r{i}", rows=20))
    async with held_once(log.config, _upload_part) as (url, reached, _go):
        via = replace(log.config, endpoint_url=url)
        argv = [*replace(cli, config=via).argv("compact"), "--part-size", "1KiB"]
        async with _daemon(argv) as daemon:
            with anyio.fail_after(60):
                while not reached.is_set():
                    assert daemon.process.returncode is None, daemon.stderr
                    await anyio.sleep(0.02)
            assert await _open_uploads(log.config, log.keys.snapshots_prefix), "mid-upload"
            daemon.process.send_signal(signal.SIGINT)
            with anyio.fail_after(60):
                code = await daemon.process.wait()
            await _eventually(lambda: _true("Run the same command again" in daemon.stderr), 5)
    assert code == 130, daemon.stderr
    assert "Traceback" not in daemon.stderr
    assert await _open_uploads(log.config, log.keys.snapshots_prefix) == [], "aborted"
    assert (
        f"{log.config.log}: compact interrupted: hwm 0 -> 3 was committed before it stopped; "
        "none left. Run the same command again" in daemon.stderr
    ), daemon.stderr
    state = await _state(log)
    assert (state.hwm, state.owner, state.snapshot_key) == (3, None, None)
    assert json.loads(state.last_run)["status"] == "interrupted"
    status = await cli("status")
    assert re.search(r"^last run   [-0-9: ]+UTC: interrupted after committing hwm 0 -> 3$",
                     status.out, re.M), status.out  # fmt: skip
    again = await cli("compact")
    assert again.code == 0, again.err
    assert (await _state(log)).snapshot_key is not None, (again.out, again.err)
