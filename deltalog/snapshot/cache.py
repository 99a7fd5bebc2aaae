"""The local snapshot cache: extracted committed snapshots and working copies.

- The **cache** keeps extracted committed snapshots in **slots**, one per
  (key, sha256), and hands out **working copies**: private directories for
  one compaction run, never reused. A working copy becomes a slot only when
  its snapshot was committed (``adopt``).

Layout under its root::

    committed/{slot}/chroma/        an extracted committed snapshot
    committed/{slot}/source.json    which key and sha256 it is
    work/run-*/                     working copies
    tmp/                            downloads and extractions in progress

Slots appear by an atomic rename of a complete directory, so a slot that
exists is whole.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec

from deltalog.errors import ConfigurationError, CorruptSnapshot, DataError, InvalidInput
from deltalog.snapshot.archive import SIDECAR_NAME, extract
from deltalog.storage.store import ObjectStore

__all__ = ["SnapshotCache"]

_SOURCE_NAME = "source.json"


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

    def __init__(self, root: Path, *, keep: int = 2) -> None:
        if keep < 1:
            raise InvalidInput("the snapshot cache must keep at least one snapshot")
        self.root = root
        self.keep = keep
        self._committed = root / "committed"
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

    @property
    def scratch(self) -> Path:
        """Where to put temporary files of this cache's size (same filesystem)."""
        return self._tmp

    def scratch_prefix(self, kind: str) -> str:
        """A name prefix for a scratch directory: swept once this process is gone."""
        return f"{kind}-{os.getpid()}-"

    async def committed(self, store: ObjectStore, key: str, sha256: str, *, log: str) -> Path:
        """The extracted snapshot ``key``, downloaded and verified unless already cached.

        A missing object is a ``DataError``; a checksum mismatch, an unreadable
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
                raise DataError("the committed snapshot object is missing", log=log, key=key)
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
        self._place(staged, _Source(key, sha256, log, time.time(), "downloaded"))

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
        """Take a slot out of ``committed/`` in one rename, then delete it."""
        doomed = Path(self._mkdtemp("prune")) / "slot"
        with suppress(FileNotFoundError):  # another process removed it first
            slot.rename(doomed)
        shutil.rmtree(doomed.parent)

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
