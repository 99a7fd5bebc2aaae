"""The local snapshot cache: extracted checkpoints, working copies, the live copy.

- The **cache** keeps extracted committed snapshots (checkpoints) in
  **slots**, one per (key, sha256), and hands out **working copies**:
  private directories for one compaction run. A working copy becomes a
  slot only when its snapshot was committed (``adopt``).
- The **live copy** is a compactor's warm working copy between runs: the
  fold of the log up to the seq it records (``hwm``), committed at that seq.
  A run takes it (``take_live``) instead of copying a checkpoint, applies
  only new entries, and puts it back after its commit (``keep_live``).
- A cache is one log's (``for_log``: its directory is named after the log's
  identity, bucket included); a live copy records that identity, and one of
  another log is never taken, nor a snapshot whose sidecar names another.

Layout under its root::

    committed/{slot}/chroma/        an extracted committed snapshot
    committed/{slot}/source.json    which key and sha256 it is
    live/chroma/                    the live copy
    live/live.json                  the seq it holds, its lineage, trust settings, identity
    work/run-*/                     working copies
    tmp/                            downloads and extractions in progress

Slots and the live copy appear by an atomic rename of a complete directory,
so one that exists is whole. A slot being copied into a working copy
(``copy_of``) is **pinned**: a shared ``flock`` on its ``source.json``.
Pruning takes an exclusive one without waiting and leaves a pinned slot
for a later prune, so several processes may share a cache on one host.
A run's copy is in ``work/`` while Chroma writes to it: a run that dies
there leaves no live copy, only scratch that the next opening of the cache
sweeps.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread
import msgspec

from deltalog.errors import (
    ConfigurationError,
    CorruptSnapshot,
    DataError,
    InvalidInput,
    MissingObject,
)
from deltalog.keys import LogKeys
from deltalog.snapshot.archive import SIDECAR_NAME, check_chroma_version, extract
from deltalog.storage.store import ObjectStore
from deltalog.storage.table import LogState

__all__ = ["LOAD_ATTEMPTS", "LiveCopy", "SnapshotCache", "load_committed"]

T = TypeVar("T")
_SOURCE_NAME = "source.json"
_COPY_ATTEMPTS = 5
LOAD_ATTEMPTS = 5
"""How many committed states ``load_committed`` tries while retention deletes what it loads."""
_LIVE_NAME = "live.json"


class _Live(msgspec.Struct, frozen=True):
    """Written next to the live copy: the seq it holds, and what it was folded under.

    ``lineage`` and ``trust`` are None in a live copy of a version that did not
    record them: unknown, so it matches nothing. ``identity`` is the log's whose
    fold it is (``LogKeys.identity``).
    """

    hwm: int
    installed_at: float
    lineage: str | None = None
    trust: str | None = None
    identity: str = ""


@dataclass(frozen=True, slots=True)
class LiveCopy:
    """The live copy, taken: a working copy, the seq it holds, and what it was folded under."""

    path: Path
    hwm: int
    lineage: str | None
    """The committed state's lineage it descends from (``LogState.lineage``)."""
    trust: str | None
    """The trust settings its entries were read under (which signatures it required)."""


class _Source(msgspec.Struct, frozen=True):
    """Written next to a slot's directory: what it is a copy of."""

    key: str
    sha256: str
    log: str
    installed_at: float
    how: str


class SnapshotCache:
    """Extracted committed snapshots and working copies under one root directory.

    ``keep`` is how many slots survive when a new one is installed (the new
    one included). ``working_copy``, ``adopt`` and ``discard`` block; call
    them in a worker thread when the directories are large.

    Crash safety: a slot appears in ``committed/`` by one rename of a
    complete directory and leaves it by one rename into ``tmp/`` before it
    is deleted, so a process killed at any moment leaves either a whole slot
    or none (a slot without its ``source.json`` is not trusted). Scratch
    directories (``tmp/``, ``work/``) carry the creating process's pid in
    their names; opening a cache removes those of processes that no longer
    run on this host. Share a cache directory between processes of one host
    only.
    """

    def __init__(self, root: Path, *, keep: int = 2, identity: str = "") -> None:
        if keep < 1:
            raise InvalidInput("the snapshot cache must keep at least one snapshot")
        self.root = root
        self.keep = keep
        self.identity = identity
        """The log this cache is bound to: a live copy or a snapshot of another is refused."""
        self._committed = root / "committed"
        self._live = root / "live"
        self._work = root / "work"
        self._tmp = root / "tmp"
        try:
            for path in (self._committed, self._work, self._tmp):
                path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self._tmp, prefix="probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigurationError(
                f"the snapshot cache directory {root} is not writable: {exc}"
            ) from exc
        self.swept = self._sweep()
        """Scratch directories of dead processes removed when the cache was opened."""

    @classmethod
    def for_log(cls, cache_dir: Path, keys: LogKeys, *, keep: int = 2) -> SnapshotCache:
        """The cache of one log under a cache directory: its own, bound to its identity."""
        return cls(cache_dir / keys.cache_name, keep=keep, identity=keys.identity)

    @property
    def scratch(self) -> Path:
        """Where to put temporary files of this cache's size (same filesystem)."""
        return self._tmp

    def scratch_prefix(self, kind: str) -> str:
        """A name prefix for a scratch directory: swept once this process is gone."""
        return f"{kind}-{os.getpid()}-"

    async def committed(self, store: ObjectStore, key: str, sha256: str, *, log: str) -> Path:
        """The extracted snapshot ``key``, downloaded and verified unless already cached.

        A missing object (or one deleted while it downloads) is a
        ``MissingObject``; a checksum mismatch, an unreadable
        archive or a sidecar that is wrong or of another log is a
        ``CorruptSnapshot``. Both name the key; nothing is left in the cache.
        """
        slot = self._slot(key, sha256)
        if await anyio.to_thread.run_sync(self._complete, slot):
            return slot / "chroma"
        tmp = Path(await anyio.to_thread.run_sync(self._mkdtemp, "download-"))
        try:
            got = await store.download_file(key, tmp / "archive")
            if got is None:
                raise MissingObject("the committed snapshot object is missing", log=log, key=key)
            await anyio.to_thread.run_sync(self._install, tmp, key, sha256, log, got.sha256)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, tmp)
        return slot / "chroma"

    def _install(self, tmp: Path, key: str, sha256: str, log: str, actual: str) -> None:
        staged = tmp / "slot"
        sidecar = extract(
            tmp / "archive",
            staged / "chroma",
            expected_sha256=sha256,
            key=key,
            log=log,
            actual_sha256=actual,
        )
        if sidecar.log != log:
            raise CorruptSnapshot(f"the sidecar is of log {sidecar.log!r}", log=log, key=key)
        if self.identity and sidecar.identity and sidecar.identity != self.identity:
            raise CorruptSnapshot(
                f"the sidecar is of {sidecar.identity}, not {self.identity}", log=log, key=key
            )
        check_chroma_version(sidecar, _chroma_version(), key=key, log=log)
        self._place(staged, _Source(key, sha256, log, time.time(), "downloaded"))

    async def copy_of(self, store: ObjectStore, key: str, sha256: str, *, log: str) -> Path:
        """A working copy of the committed snapshot ``(key, sha256)``, its slot pinned
        while it is copied (downloaded and verified first unless cached).

        A slot that another process pruned between the download and the copy
        is fetched again. Errors are those of ``committed``.
        """
        for _ in range(_COPY_ATTEMPTS):
            source = await self.committed(store, key, sha256, log=log)
            with anyio.CancelScope(shield=True):  # a cancelled copy would leave its directory
                work = await anyio.to_thread.run_sync(self._copy_pinned, source.parent)
            if work is not None:
                return work
        raise DataError(
            f"the cached snapshot was pruned {_COPY_ATTEMPTS} times while it was being "
            f"copied: is something emptying {self._committed} in a loop?",
            log=log,
            key=key,
        )

    def _copy_pinned(self, slot: Path) -> Path | None:
        """A working copy of ``slot``, pinned while copied; None if it was pruned first."""
        try:
            fd = os.open(slot / _SOURCE_NAME, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:  # still in place, not renamed away by a prune that locked it first
                if os.stat(slot / _SOURCE_NAME).st_ino != os.fstat(fd).st_ino:
                    return None
            except FileNotFoundError:
                return None
            return self.working_copy(slot / "chroma")
        finally:
            os.close(fd)  # releases the pin

    def working_copy(self, source: Path | None) -> Path:
        """A fresh private directory for one run: a copy of ``source``, or empty."""
        work = Path(self._mkdtemp("run-", self._work))
        if source is None:
            return work
        try:
            shutil.copytree(source, work, dirs_exist_ok=True, ignore=_sidecar_at(source))
        except BaseException:
            shutil.rmtree(work)
            raise
        return work

    def adopt(self, work: Path, key: str, sha256: str, *, log: str = "") -> Path:
        """Make a working copy the cached snapshot ``(key, sha256)``; returns its path.

        Call it only after the commit of that snapshot succeeded, and only on
        the closed directory that was archived. ``work`` is moved, not copied.
        """
        self._check_working_copy(work)
        staged = Path(self._mkdtemp("adopt-"))
        try:
            work.rename(staged / "chroma")
            self._place(staged, _Source(key, sha256, log, time.time(), "adopted"))
        finally:
            if staged.exists():
                shutil.rmtree(staged)
        return self._slot(key, sha256) / "chroma"

    def discard(self, path: Path) -> None:
        """Remove a working copy; one that is already gone (adopted) is fine."""
        self._check_working_copy(path)
        if path.exists():
            shutil.rmtree(path)

    def take_live(self) -> LiveCopy | None:
        """Take the live copy as a working copy, with what ``keep_live`` recorded.

        One rename claims it, so of two processes only one gets it; None when
        there is none. Until ``keep_live`` there is no live copy.
        """
        claimed = Path(self._mkdtemp("take-")) / "live"
        try:
            self._live.rename(claimed)
        except FileNotFoundError:
            shutil.rmtree(claimed.parent)
            return None
        try:
            live = msgspec.json.decode((claimed / _LIVE_NAME).read_bytes(), type=_Live)
            if self.identity and live.identity != self.identity:  # another log's fold
                return None
            work = Path(self._mkdtemp("run-", self._work))
            work.rmdir()
            (claimed / "chroma").rename(work)
        except (OSError, msgspec.DecodeError):  # not whole (left by an older version)
            return None
        finally:
            shutil.rmtree(claimed.parent)
        return LiveCopy(work, live.hwm, live.lineage, live.trust)

    def keep_live(self, work: Path, hwm: int, *, lineage: str = "", trust: str = "") -> None:
        """Make a working copy the live copy, holding ``hwm``; ``work`` is moved.

        Call it only after ``hwm`` was committed, on a closed directory, with the
        committed state's ``lineage`` and the ``trust`` settings it was folded
        under. A live copy already there (another process put one) is replaced.
        """
        self._check_working_copy(work)
        staged = Path(self._mkdtemp("live-"))
        try:
            work.rename(staged / "chroma")
            record = _Live(hwm, time.time(), lineage, trust, self.identity)
            (staged / _LIVE_NAME).write_bytes(msgspec.json.encode(record))
            old = Path(self._mkdtemp("prune")) / "live"
            with suppress(FileNotFoundError):
                self._live.rename(old)
            shutil.rmtree(old.parent)
            with suppress(OSError):  # another process put a live copy meanwhile: keep it
                staged.rename(self._live)
        finally:
            if staged.exists():
                shutil.rmtree(staged)

    def _check_working_copy(self, path: Path) -> None:
        if path.parent != self._work:
            raise InvalidInput(f"{path} is not a working copy of the cache at {self.root}")

    def _slot(self, key: str, sha256: str) -> Path:
        name = hashlib.sha256(f"{key}\n{sha256.lower()}".encode()).hexdigest()[:32]
        return self._committed / name

    def _mkdtemp(self, prefix: str, parent: Path | None = None) -> str:
        return tempfile.mkdtemp(
            prefix=self.scratch_prefix(prefix.rstrip("-")), dir=parent or self._tmp
        )

    def _complete(self, slot: Path) -> bool:
        """Whether ``slot`` is whole; a partial one (left by an older version) is removed."""
        if (slot / _SOURCE_NAME).is_file() and (slot / "chroma").is_dir():
            return True
        if slot.exists():
            self._remove(slot)
        return False

    def _place(self, staged: Path, source: _Source) -> None:
        """Rename a complete slot into place; another process may have won the race."""
        (staged / _SOURCE_NAME).write_bytes(msgspec.json.encode(source))
        slot = self._slot(source.key, source.sha256)
        try:
            staged.rename(slot)
        except OSError:
            if not self._complete(slot):
                raise
        self._prune(slot)

    def _prune(self, current: Path) -> None:
        """Remove the oldest slots beyond ``keep``, never ``current``."""
        slots = sorted(self._committed.iterdir(), key=_installed_at, reverse=True)
        others = [s for s in slots if s != current]
        for old in others[self.keep - 1 :]:
            self._remove(old)

    def _remove(self, slot: Path) -> None:
        """Take a slot out of ``committed/`` in one rename, then delete it; a slot
        pinned by a copy in progress stays (a later prune removes it)."""
        try:
            fd: int | None = os.open(slot / _SOURCE_NAME, os.O_RDONLY)
        except FileNotFoundError:  # a partial slot (no one pins it) or gone
            fd = None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return
            doomed = Path(self._mkdtemp("prune")) / "slot"
            with suppress(FileNotFoundError):  # another process removed it first
                slot.rename(doomed)
            shutil.rmtree(doomed.parent)
        finally:
            if fd is not None:
                os.close(fd)

    def _sweep(self) -> list[str]:
        """Remove scratch directories whose creating process no longer runs."""
        swept = []
        for parent in (self._tmp, self._work):
            for path in parent.iterdir():
                pid = _scratch_pid(path.name)
                if pid is None or pid == os.getpid() or _running(pid):
                    continue
                try:
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                except FileNotFoundError:  # another process swept it first
                    continue
                swept.append(f"{parent.name}/{path.name}")
        return swept


async def load_committed(
    read_state: Callable[[], Awaitable[LogState]],
    load: Callable[[LogState], Awaitable[T]],
    *,
    state: LogState | None = None,
    attempts: int = LOAD_ATTEMPTS,
) -> tuple[LogState, T]:
    """``load(state)`` of the committed state, read again when retention deleted its checkpoint.

    Retention deletes a checkpoint only once a newer commit replaced it, so
    a ``MissingObject`` naming the checkpoint ``load`` was given, with the
    state moved on since, means "pruned: read the state again"; the newer
    state is loaded instead, up to ``attempts`` times. A checkpoint the
    state still points to that is missing is damage: raised as it is.
    Returns the state that was loaded, and what ``load`` returned.
    """
    tried = state if state is not None else await read_state()
    for attempt in range(1, attempts + 1):
        try:
            return tried, await load(tried)
        except MissingObject as exc:
            now = await read_state()
            pruned = exc.key is not None and exc.key == tried.snapshot_key != now.snapshot_key
            if attempt == attempts or not pruned:
                raise
            tried = now
    raise AssertionError("unreachable")


def _chroma_version() -> str:
    """The installed chromadb's version (without importing it: that is not free)."""
    try:
        return importlib.metadata.version("chromadb")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _scratch_pid(name: str) -> int | None:
    """The pid in a scratch directory's name (``kind-pid-random``), if it has one."""
    parts = name.split("-", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return int(parts[1])
    return None


def _running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _installed_at(slot: Path) -> float:
    try:
        return (slot / _SOURCE_NAME).stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _sidecar_at(root: Path) -> Callable[[str, list[str]], list[str]]:
    """A ``copytree`` ignore function that skips the sidecar at the root only."""

    def ignore(directory: str, names: list[str]) -> list[str]:
        return [SIDECAR_NAME] if Path(directory) == root and SIDECAR_NAME in names else []

    return ignore
