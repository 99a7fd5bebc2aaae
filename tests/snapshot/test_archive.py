"""Snapshot archives, their verification, and the local snapshot cache."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import io
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import chromadb
import msgspec
import numpy as np
import pytest
from chromadb.api.client import Client
from hypothesis import given, settings
from hypothesis import strategies as st

from compactor.publish import plan_retention, prune_snapshots, publish_snapshot
from deltalog.entry import Batch, Delete, Delta, Entry, Op, UpdateMetadata, Upsert
from deltalog.errors import (
    ConfigurationError,
    CorruptSnapshot,
    DataError,
    IncompatibleSnapshot,
    InvalidInput,
)
from deltalog.fold import State, fold, state_differences
from deltalog.keys import LogKeys
from deltalog.snapshot.archive import (
    SIDECAR_NAME,
    ArchiveInfo,
    Compression,
    Sidecar,
    archive,
    extract,
    read_sidecar,
    sha256_file,
)
from deltalog.snapshot.cache import SnapshotCache
from deltalog.snapshot.sink import ChromaSink
from deltalog.storage.store import MemoryStore, ObjectInfo
from deltalog.storage.table import LogState
from tests.oracle import oracle_state

KEY = "root/receipts/snapshots/00000000000000000003-000000000007-abc.tar"
LOG = "receipts"
LOG_KEYS = LogKeys("root", LOG)


def sidecar(**changes: object) -> Sidecar:
    base = Sidecar(
        format=1, log=LOG, hwm=3, token=7, created_at=1.7e9, counts={"words": 3}, files={}
    )
    return msgspec.structs.replace(base, **changes)


def receipt_log(rng: np.random.Generator) -> list[tuple[int, Entry]]:
    vectors = rng.standard_normal((4, 8), dtype=np.float32)
    ops: list[Op] = [
        Upsert("words", ["w1", "w2", "w3", "w4"], vectors, ["a", "b", "c", "d"], [{"n": 1}] * 4),
        Upsert("lines", ["l1"], vectors[:1], ["line"], [{"section_label": "TOTAL_LINE"}]),
        Delete("words", ["w4"]),
        UpdateMetadata("words", ["w1"], [{"label_TOTAL": True}]),
    ]
    return [(seq, Batch("e", [Delta([op])])) for seq, op in enumerate(ops, start=1)]


async def chroma_dir(path: Path, log: list[tuple[int, Entry]]) -> Path:
    """A closed Chroma directory holding ``log``."""
    async with await ChromaSink.open(path) as sink:
        await sink.apply(fold(log))
    return path


async def read_chroma(path: Path) -> State:
    async with await ChromaSink.open(path) as sink:
        return {
            name: {r.id: r for r in await sink.records(name)} for name in await sink.collections()
        }


@pytest.fixture
async def snapshot(tmp_path: Path, rng: np.random.Generator) -> tuple[ArchiveInfo, State]:
    """An archive of a real Chroma directory, and the state it holds."""
    log = receipt_log(rng)
    directory = await chroma_dir(tmp_path / "db", log)
    return archive(directory, sidecar(), tmp_path / "snap.tar"), oracle_state(log)


def hand_made_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> str:
    """Write a tar of ``members`` (contents for regular files); return its sha256."""
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return sha256_file(path)[0]


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def sidecar_member(files: dict[str, bytes], **changes: object) -> tuple[tarfile.TarInfo, bytes]:
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return file_member(SIDECAR_NAME, msgspec.json.encode(sidecar(files=digests, **changes)))


# -- archive and extract ------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "zstd"])
async def test_round_trip_opens_with_a_plain_chroma_client(
    tmp_path: Path, rng: np.random.Generator, compression: Compression
) -> None:
    log = receipt_log(rng)
    directory = await chroma_dir(tmp_path / "db", log)
    info = archive(directory, sidecar(), tmp_path / "snap", compression=compression)
    assert (info.sha256, info.size) == sha256_file(tmp_path / "snap")
    assert "chroma.sqlite3" in info.sidecar.files
    got = extract(info.path, tmp_path / "out", expected_sha256=info.sha256)
    assert got == info.sidecar
    assert state_differences(oracle_state(log), await read_chroma(tmp_path / "out")) == []
    client = chromadb.PersistentClient(path=str(tmp_path / "out"))
    assert isinstance(client, Client)
    try:
        assert client.get_collection("words").get(ids=["w1"])["documents"] == ["a"]
    finally:
        client.close()


async def test_archive_holds_chroma_files_at_its_root_and_the_sidecar_last(
    snapshot: tuple[ArchiveInfo, State],
) -> None:
    info, _state = snapshot
    with tarfile.open(info.path) as tar:
        members = tar.getmembers()
        body = tar.extractfile(SIDECAR_NAME)
        assert body is not None
        assert msgspec.json.decode(body.read(), type=Sidecar) == info.sidecar
    files = [m.name for m in members if m.isreg()]
    assert files[-1] == SIDECAR_NAME
    assert "chroma.sqlite3" in files
    assert set(files[:-1]) == set(info.sidecar.files)
    assert all(m.isreg() or m.isdir() for m in members)


async def test_archive_is_deterministic_and_replaces_an_old_sidecar(
    tmp_path: Path, snapshot: tuple[ArchiveInfo, State]
) -> None:
    info, _state = snapshot
    directory = tmp_path / "db"
    (directory / SIDECAR_NAME).write_text("an old sidecar from a copied snapshot")
    again = archive(directory, sidecar(), tmp_path / "again.tar")
    assert again.sha256 == info.sha256


async def test_checksum_mismatch_is_refused_before_extracting(
    tmp_path: Path, snapshot: tuple[ArchiveInfo, State]
) -> None:
    info, _state = snapshot
    with pytest.raises(CorruptSnapshot, match=rf"sha256.*log={LOG}, key={KEY}"):
        extract(info.path, tmp_path / "out", expected_sha256="0" * 64, key=KEY, log=LOG)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["garbage", "truncated", "zstd-truncated"])
async def test_corrupt_archive(
    tmp_path: Path, snapshot: tuple[ArchiveInfo, State], how: str
) -> None:
    info, _state = snapshot
    bad = tmp_path / "bad"
    if how == "garbage":
        bad.write_bytes(b"not a tar archive at all" * 100)
    elif how == "truncated":
        bad.write_bytes(info.path.read_bytes()[: info.size // 2])
    else:
        zst = archive(tmp_path / "db", sidecar(), tmp_path / "snap.tar.zst", compression="zstd")
        bad.write_bytes(zst.path.read_bytes()[: zst.size // 2])
    with pytest.raises(CorruptSnapshot, match=rf"unreadable archive.*key={KEY}"):
        extract(bad, tmp_path / "out", expected_sha256=sha256_file(bad)[0], key=KEY, log=LOG)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "holds no deltalog-snapshot.json"),
        ("undecodable", "undecodable deltalog-snapshot.json"),
        ("future format", "snapshot format 2 is not supported"),
        ("wrong digest", "a.bin: sha256 mismatch"),
        ("file not listed", "extra.bin: not in the sidecar"),
        ("file missing", "gone.bin: missing"),
    ],
)
def test_wrong_sidecar(tmp_path: Path, case: str, message: str) -> None:
    files = {"a.bin": b"chroma bytes", "sub/b.bin": b"more"}
    members = [file_member(name, data) for name, data in files.items()]
    if case == "undecodable":
        members.append(file_member(SIDECAR_NAME, b"{not json"))
    elif case == "future format":
        members.append(sidecar_member(files, format=2))
    elif case == "wrong digest":
        members.append(sidecar_member({**files, "a.bin": b"other bytes"}))
    elif case == "file not listed":
        members += [file_member("extra.bin", b"x"), sidecar_member(files)]
    elif case == "file missing":
        members.append(sidecar_member({**files, "gone.bin": b"y"}))
    sha = hand_made_tar(tmp_path / "t.tar", members)
    with pytest.raises(CorruptSnapshot, match=message):
        extract(tmp_path / "t.tar", tmp_path / "out", expected_sha256=sha, key=KEY)
    assert not (tmp_path / "out").exists()


def test_a_tar_made_by_other_tools_extracts(tmp_path: Path) -> None:
    """``tar -C dir .`` names members ``./a.bin``: that is fine."""
    sha = hand_made_tar(
        tmp_path / "t.tar",
        [file_member("./a.bin", b"chroma bytes"), sidecar_member({"a.bin": b"chroma bytes"})],
    )
    assert extract(tmp_path / "t.tar", tmp_path / "out", expected_sha256=sha).hwm == 3
    assert (tmp_path / "out" / "a.bin").read_bytes() == b"chroma bytes"


def link(name: str, kind: bytes, target: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, b""


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (file_member("../evil", b"x"), "unsafe member path '../evil'"),
        (file_member("sub/../../evil", b"x"), "unsafe member path"),
        (file_member("/tmp/evil", b"x"), "unsafe member path '/tmp/evil'"),
        (link("evil", tarfile.SYMTYPE, "/etc/passwd"), "'evil' is a link"),
        (link("evil", tarfile.LNKTYPE, "a.bin"), "'evil' is a link"),
        (link("evil", tarfile.FIFOTYPE, ""), "'evil' is a special file"),
    ],
)
def test_unsafe_members_are_refused(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes], message: str
) -> None:
    files = {"a.bin": b"data"}
    members = [file_member("a.bin", b"data"), member, sidecar_member(files)]
    sha = hand_made_tar(tmp_path / "t.tar", members)
    dest = tmp_path / "deep" / "out"
    with pytest.raises(CorruptSnapshot, match=message):
        extract(tmp_path / "t.tar", dest, expected_sha256=sha, key=KEY)
    assert not (tmp_path / "deep" / "evil").exists()
    assert not (tmp_path / "evil").exists()
    assert not dest.exists()


def dir_member(name: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info, b""


@pytest.mark.parametrize(
    "members",
    [
        [file_member("a", b"x"), dir_member("a")],
        [dir_member("a"), file_member("a", b"x")],
        [file_member("a", b"x"), file_member("a/b", b"y")],
        [file_member("a/b", b"y"), file_member("a", b"x")],
        [dir_member(SIDECAR_NAME)],
    ],
    ids=["file-then-dir", "dir-then-file", "file-then-child", "child-then-file", "sidecar-dir"],
)
def test_a_file_and_a_directory_of_one_name_are_a_corrupt_snapshot(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]]
) -> None:
    """Never a raw ``OSError``: the archive is wrong, whichever comes first."""
    sha = hand_made_tar(tmp_path / "t.tar", [*members, sidecar_member({})])
    with pytest.raises(CorruptSnapshot, match="both a file and a directory"):
        extract(tmp_path / "t.tar", tmp_path / "out", expected_sha256=sha, key=KEY)
    assert not (tmp_path / "out").exists()


def test_archive_refuses_links_in_the_directory(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "link").symlink_to("/etc/passwd")
    with pytest.raises(InvalidInput, match="only plain files"):
        archive(tmp_path / "db", sidecar(), tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()


def test_a_failed_archive_leaves_no_file(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "chroma.sqlite3").write_bytes(b"data")
    with pytest.raises(InvalidInput, match="unknown compression 'lz4'"):
        archive(tmp_path / "db", sidecar(), tmp_path / "out.tar", compression="lz4")  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.glob("out*")) == []


# -- cache --------------------------------------------------------------------------------


async def uploaded(store: MemoryStore, info: ArchiveInfo, key: str = KEY) -> None:
    assert await store.upload_file(key, info.path)


async def cache_with(tmp_path: Path, info: ArchiveInfo) -> tuple[MemoryStore, SnapshotCache, Path]:
    """A store holding the snapshot, an empty cache, and the snapshot fetched into it."""
    store = MemoryStore()
    await uploaded(store, info)
    cache = SnapshotCache(tmp_path / "cache")
    return store, cache, await cache.committed(store, KEY, info.sha256, log=LOG)


def leftovers(cache: SnapshotCache) -> list[str]:
    """Everything in the cache outside committed slots and working copies."""
    return sorted(p.name for p in (cache.root / "tmp").iterdir())


async def test_cache_downloads_once_then_reuses(
    tmp_path: Path, snapshot: tuple[ArchiveInfo, State]
) -> None:
    info, state = snapshot
    store, cache, first = await cache_with(tmp_path, info)
    assert state_differences(state, await read_chroma(first)) == []
    before = store.requests
    assert await cache.committed(store, KEY, info.sha256, log=LOG) == first
    assert store.requests == before
    assert leftovers(cache) == []


async def test_cache_of_a_missing_object_is_a_data_error(tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "cache")
    with pytest.raises(DataError, match=rf"missing.*log={LOG}, key={KEY}") as caught:
        await cache.committed(MemoryStore(), KEY, "0" * 64, log=LOG)
    assert not isinstance(caught.value, CorruptSnapshot)
    assert leftovers(cache) == []
    assert list((cache.root / "committed").iterdir()) == []


async def test_cache_refuses_a_checksum_mismatch_and_keeps_nothing(
    tmp_path: Path, snapshot: tuple[ArchiveInfo, State]
) -> None:
    info, _state = snapshot
    store = MemoryStore()
    await uploaded(store, info)
    store.overwrite(KEY, info.path.read_bytes()[:-1] + b"\x01")
    cache = SnapshotCache(tmp_path / "cache")
    with pytest.raises(CorruptSnapshot, match=rf"sha256.*key={KEY}"):
        await cache.committed(store, KEY, info.sha256, log=LOG)
    assert leftovers(cache) == []
    assert list((cache.root / "committed").iterdir()) == []


async def test_cache_refuses_a_snapshot_of_another_log(
    tmp_path: Path, snapshot: tuple[ArchiveInfo, State]
) -> None:
    info, _state = snapshot
    store = MemoryStore()
    await uploaded(store, info)
    cache = SnapshotCache(tmp_path / "cache")
    with pytest.raises(CorruptSnapshot, match=r"sidecar is of log 'receipts'.*log=other"):
        await cache.committed(store, KEY, info.sha256, log="other")
    assert leftovers(cache) == []
    assert list((cache.root / "committed").iterdir()) == []


async def test_a_cache_bound_to_a_log_refuses_a_snapshot_of_its_namesake_in_another_bucket(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """The sidecar names the log's bucket: the same root and name elsewhere is not it."""
    directory = await chroma_dir(tmp_path / "db", receipt_log(rng))
    elsewhere = LogKeys("root", LOG, "elsewhere").identity
    info = archive(directory, sidecar(identity=elsewhere), tmp_path / "snap.tar")
    store = MemoryStore()
    await uploaded(store, info)
    cache = SnapshotCache.for_log(tmp_path / "cache", LogKeys("root", LOG, "ours"))
    with pytest.raises(CorruptSnapshot, match="sidecar is of s3://elsewhere/root/receipts"):
        await cache.committed(store, KEY, info.sha256, log=LOG)
    assert list((cache.root / "committed").iterdir()) == []


def test_a_live_copy_is_taken_only_by_the_log_whose_fold_it_is(tmp_path: Path) -> None:
    """Two logs of one name in two buckets, one cache directory given by hand."""
    ours = SnapshotCache(tmp_path / "cache", identity="s3://ours/receipts")
    theirs = SnapshotCache(tmp_path / "cache", identity="s3://theirs/receipts")
    work = ours.working_copy(None)
    (work / "marker").write_text("ours")
    ours.keep_live(work, 7)
    assert theirs.take_live() is None, "another log's fold is never a warm copy"
    assert ours.take_live() is None, "and it was discarded, not left for anyone"
    ours.keep_live(ours.working_copy(None), 8)
    taken = ours.take_live()
    assert taken is not None and taken.hwm == 8
    assert SnapshotCache.for_log(tmp_path, LogKeys("", "receipts", "b")).root.name == "b+receipts"


@pytest.mark.parametrize(
    ("writer", "refused"),
    [("99.0.0", True), ("1.999.0", True), ("1.5.999", False), ("0.4.24", False), ("", False)],
)
async def test_a_snapshot_of_a_newer_chroma_is_refused_before_chroma_opens_it(
    tmp_path: Path, writer: str, refused: bool
) -> None:
    """Written by a newer chromadb (major.minor) than the one installed: a typed
    ``IncompatibleSnapshot`` naming both versions, nothing kept. A newer patch release, an
    older writer or a sidecar without a version (written before it was recorded) pass."""
    running = importlib.metadata.version("chromadb")
    assert running.startswith("1."), "the cases above assume chromadb 1.x"
    directory = await chroma_dir(tmp_path / "db", [])
    written = msgspec.structs.replace(sidecar(), chroma_version=writer)
    info = archive(directory, written, tmp_path / "snap.tar")
    store = MemoryStore()
    await uploaded(store, info)
    cache = SnapshotCache(tmp_path / "cache")
    if not refused:
        assert (await cache.committed(store, KEY, info.sha256, log=LOG)).is_dir()
        return
    with pytest.raises(IncompatibleSnapshot, match=rf"chromadb {writer}.*{running}") as caught:
        await cache.committed(store, KEY, info.sha256, log=LOG)
    assert (caught.value.written_by, caught.value.running, caught.value.key) == (
        writer,
        running,
        KEY,
    )
    assert isinstance(caught.value, ConfigurationError)
    assert leftovers(cache) == []
    assert list((cache.root / "committed").iterdir()) == []


async def test_a_published_checkpoint_records_the_chromadb_that_wrote_it(tmp_path: Path) -> None:
    directory = await chroma_dir(tmp_path / "db", [])
    store = MemoryStore()
    published = await publish_snapshot(
        store, LogKeys("", LOG), directory, hwm=0, token=1, counts={}, compression="none"
    )
    cache = SnapshotCache(tmp_path / "cache")
    path = await cache.committed(store, published.key, published.sha256, log=LOG)
    recorded = read_sidecar(path, key=published.key)
    assert recorded.chroma_version == importlib.metadata.version("chromadb")
    assert recorded.deltalog_version


async def test_working_copies_are_fresh_private_directories(
    tmp_path: Path, snapshot: tuple[ArchiveInfo, State]
) -> None:
    info, state = snapshot
    store = MemoryStore()
    await uploaded(store, info)
    cache = SnapshotCache(tmp_path / "cache")
    committed = await cache.committed(store, KEY, info.sha256, log=LOG)
    work = cache.working_copy(committed)
    other = cache.working_copy(committed)
    empty = cache.working_copy(None)
    assert len({work, other, empty}) == 3
    assert list(empty.iterdir()) == []
    assert (committed / SIDECAR_NAME).exists() and not (work / SIDECAR_NAME).exists()
    assert state_differences(state, await read_chroma(work)) == []
    for path in (work, other, empty):
        cache.discard(path)
        assert not path.exists()
    assert (committed / "chroma.sqlite3").exists()
    with pytest.raises(InvalidInput, match="not a working copy"):
        cache.discard(committed)


async def test_an_adopted_working_copy_is_reused_without_download(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    cache = SnapshotCache(tmp_path / "cache")
    log = receipt_log(rng)
    work = await chroma_dir(cache.working_copy(None), log)
    info = archive(work, sidecar(), tmp_path / "snap.tar")
    adopted = cache.adopt(work, KEY, info.sha256, log=LOG)
    cache.discard(work)  # the runner's cleanup after adopting is harmless
    store = MemoryStore()
    assert await cache.committed(store, KEY, info.sha256, log=LOG) == adopted
    assert store.requests == 0
    assert state_differences(oracle_state(log), await read_chroma(adopted)) == []


async def test_cache_keeps_the_newest_slots(tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "cache", keep=2)
    paths = []
    for n in range(3):
        work = cache.working_copy(None)
        (work / "f").write_text(str(n))
        paths.append(cache.adopt(work, f"{KEY}{n}", f"{n:064d}"))
    assert [p.exists() for p in paths] == [False, True, True]
    assert leftovers(cache) == []  # the pruned slot went through tmp/ and is gone


async def test_a_slot_being_copied_is_left_to_a_later_prune(
    tmp_path: Path, snapshot: tuple[ArchiveInfo, State]
) -> None:
    """Two processes share a cache: one copies a slot (``copy_of`` pins it) while the
    other installs newer snapshots and prunes."""
    info, _state = snapshot
    _store, cache, first = await cache_with(tmp_path, info)
    other = SnapshotCache(cache.root, keep=1)
    pin = os.open(first.parent / "source.json", os.O_RDONLY)  # the pin of a copy in progress
    try:
        fcntl.flock(pin, fcntl.LOCK_SH)
        newer = other.adopt(other.working_copy(None), f"{KEY}.2", "2" * 64)
        assert first.exists(), "pinned: left for a later prune"
    finally:
        os.close(pin)
    other.adopt(other.working_copy(None), f"{KEY}.3", "3" * 64)
    assert not first.exists() and not newer.exists()
    assert leftovers(cache) == []


async def test_a_slot_pruned_before_its_copy_is_fetched_again(
    tmp_path: Path, snapshot: tuple[ArchiveInfo, State]
) -> None:
    info, state = snapshot
    store = MemoryStore()
    await uploaded(store, info)
    pruner = SnapshotCache(tmp_path / "cache", keep=1)

    class Racing(SnapshotCache):
        """Another process prunes the slot just after the first download."""

        raced = False

        async def committed(self, *args: Any, **kwargs: Any) -> Path:
            path = await super().committed(*args, **kwargs)
            if not self.raced:
                self.raced = True
                pruner.adopt(pruner.working_copy(None), f"{KEY}.other", "1" * 64)
                assert not path.exists()
            return path

    cache = Racing(tmp_path / "cache")
    work = await cache.copy_of(store, KEY, info.sha256, log=LOG)
    assert cache.raced
    assert state_differences(state, await read_chroma(work)) == []
    cache.discard(work)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_opening_a_cache_sweeps_scratch_of_dead_processes_only(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    dead, alive = _dead_pid(), os.getppid()
    names = {
        "tmp": [f"download-{dead}-x1", f"publish-{alive}-x2", "no-pid-here", f"adopt-{dead}-x3"],
        "work": [f"run-{dead}-x4", f"run-{os.getpid()}-x5"],
    }
    for parent, entries in names.items():
        for name in entries:
            (root / parent / name / "chroma").mkdir(parents=True)
            (root / parent / name / "chroma" / "data").write_bytes(b"half written")
    cache = SnapshotCache(root)
    assert sorted(cache.swept) == [
        f"tmp/adopt-{dead}-x3",
        f"tmp/download-{dead}-x1",
        f"work/run-{dead}-x4",
    ]
    assert leftovers(cache) == sorted(["no-pid-here", f"publish-{alive}-x2"])
    assert [p.name for p in (root / "work").iterdir()] == [f"run-{os.getpid()}-x5"]
    assert SnapshotCache(root).swept == []


def test_scratch_directories_name_their_process(tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "cache")
    work = cache.working_copy(None)
    assert work.name.startswith(f"run-{os.getpid()}-")
    assert cache.scratch_prefix("publish") == f"publish-{os.getpid()}-"


async def test_a_partial_slot_is_not_trusted(
    tmp_path: Path, snapshot: tuple[ArchiveInfo, State]
) -> None:
    """A slot half deleted by a killed process (older versions) is downloaded again."""
    info, state = snapshot
    store, cache, committed = await cache_with(tmp_path, info)
    slot = committed.parent
    for path in sorted(slot.rglob("*"), reverse=True):  # what a killed rmtree leaves
        if path.is_file():
            path.unlink()
    assert (slot / "chroma").is_dir()
    before = store.requests
    again = await cache.committed(store, KEY, info.sha256, log=LOG)
    assert store.requests > before
    assert state_differences(state, await read_chroma(again)) == []
    assert leftovers(cache) == []


def test_unwritable_cache_directory_is_a_configuration_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigurationError, match=f"{blocker}/cache"):
        SnapshotCache(blocker / "cache")


# -- retention ----------------------------------------------------------------------------


async def _snapshots(store: MemoryStore, hwms: range) -> list[str]:
    keys = [LOG_KEYS.snapshot(hwm, hwm, f"n{hwm}", ".tar") for hwm in hwms]
    for key in keys:
        assert await store.put_if_absent(key, b"snapshot")
    return keys


def _read(state: LogState) -> Callable[[], Awaitable[LogState]]:
    async def read() -> LogState:
        return state

    return read


async def _listed(store: MemoryStore) -> list[str]:
    return [info.key async for info in store.list_after(LOG_KEYS.snapshots_prefix)]


async def test_retention_without_a_history_keeps_the_newest_by_hwm() -> None:
    """A state committed by a version that kept no history."""
    store = MemoryStore()
    k1, k2, k3, k4 = await _snapshots(store, range(1, 5))
    state = LogState(hwm=4, snapshot_key=k4, token=5)
    doomed = await prune_snapshots(store, LOG_KEYS, _read(state), keep=2)
    assert doomed == [k1, k2]
    assert await _listed(store) == [k3, k4]


async def test_retention_with_a_history_tells_committed_from_orphans() -> None:
    store = MemoryStore()
    k1, k2, k3, k4, k5 = await _snapshots(store, range(1, 6))
    # k2 was never committed; k5 neither, and its token is the state's: its uploader
    # may hold the lease and commit it.
    state = LogState(hwm=4, snapshot_key=k4, token=5, recent_snapshots=(k4, k3, k1))
    young = await prune_snapshots(store, LOG_KEYS, _read(state), keep=2, orphan_grace=60)
    assert young == [k1], "an orphan younger than the grace stays"
    seen = LOG_KEYS.seen(k2)
    assert await _listed(store) == [k2, seen, k3, k4, k5], "its age counts from its marker"
    old = await prune_snapshots(
        store, LOG_KEYS, _read(state), keep=2, orphan_grace=60, now=time.time() + 61
    )
    assert old == [k2]
    assert await _listed(store) == [k3, k4, k5], "the marker goes with its orphan"


async def test_an_orphans_grace_counts_from_when_retention_first_listed_it() -> None:
    """S3 dates a multipart upload from its start: an archive whose upload took longer
    than the grace looks old the moment it appears. Its age counts from the marker
    retention writes when it first lists it, never from its ``LastModified``."""
    store = MemoryStore()
    k1, k2 = await _snapshots(store, range(1, 3))
    state = LogState(hwm=1, snapshot_key=k1, token=5, recent_snapshots=(k1,))
    later = time.time() + 7200  # its LastModified is two hours before "now"
    first = await prune_snapshots(
        store, LOG_KEYS, _read(state), keep=1, orphan_grace=3600, now=later
    )
    assert first == [] and await _listed(store) == [k1, k2, LOG_KEYS.seen(k2)]
    again = await prune_snapshots(
        store, LOG_KEYS, _read(state), keep=1, orphan_grace=3600, now=later + 3600
    )
    assert again == [k2] and await _listed(store) == [k1]


@st.composite
def _retention_cases(draw: st.DrawFn) -> tuple[list[ObjectInfo], LogState, int]:
    """A listing of snapshots (and markers), a state read after it, and ``keep``."""
    names = draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 6)), unique=True, max_size=8))
    listed_keys = [LOG_KEYS.snapshot(hwm, token, f"n{hwm}x{token}") for hwm, token in names]
    committed = draw(st.sampled_from([None, *listed_keys]))
    recent = draw(st.lists(st.sampled_from(listed_keys), unique=True)) if listed_keys else []
    if committed is not None:
        recent = [committed, *(k for k in recent if k != committed)]
    now = 10_000.0
    listed = [ObjectInfo(k, 1, draw(st.floats(0, now))) for k in listed_keys]
    seen = draw(st.lists(st.sampled_from(listed_keys), unique=True)) if listed_keys else []
    listed += [ObjectInfo(LOG_KEYS.seen(k), 0, draw(st.floats(0, now))) for k in seen]
    state = LogState(
        hwm=draw(st.integers(0, 9)),
        snapshot_key=committed,
        token=draw(st.integers(0, 7)),
        recent_snapshots=tuple(recent) if committed is not None else (),
    )
    return listed, state, draw(st.integers(1, 3))


@settings(max_examples=200, deadline=None)
@given(_retention_cases(), st.sampled_from([0.0, 60.0, 20_000.0]))
def test_retention_never_deletes_what_the_state_could_point_to(
    case: tuple[list[ObjectInfo], LogState, int], grace: float
) -> None:
    """The committed key, the kept history, and any upload no commit recorded whose
    token is at or above the state's (its uploader may commit it), never go; what
    goes was committed and superseded, or can never be committed."""
    listed, state, keep = case
    plan = plan_retention(listed, state, LOG_KEYS, keep=keep, orphan_grace=grace, now=10_000.0)
    recent = state.recent_snapshots
    for key in plan.delete:
        assert key != state.snapshot_key and key not in recent[:keep]
        token = LOG_KEYS.snapshot_token(key)
        assert key in recent or (token is not None and token < state.token), key
    assert set(plan.mark).isdisjoint(plan.delete)
    markers = {i.key for i in listed if LOG_KEYS.seen_of(i.key)}
    assert set(plan.unmark) <= markers
