"""Snapshots on disk: the archive, its sidecar, and the local cache.

- A **snapshot** is a tar archive, optionally zstd-compressed, of a closed
  ChromaDB persistent directory at some hwm. The Chroma files sit at the
  archive's root, so anyone can extract it and open it with
  ``chromadb.PersistentClient(path=...)``.
- The **sidecar**, ``deltalog-snapshot.json`` at the archive's root (written
  last), says which log, hwm and fencing token the snapshot is of, how many
  records each collection holds, and the sha256 of every other file.
- The archive's own sha256 is what the commit point records. ``extract``
  checks it before reading a single member, refuses anything but plain files
  and directories under the destination, then checks every file against the
  sidecar.
- The **cache** keeps extracted committed snapshots in **slots**, one per
  (key, sha256), and hands out **working copies**: private directories for
  one compaction run, never reused. A working copy becomes a slot only when
  its snapshot was committed (``adopt``).

Cache layout under its root::

    committed/{slot}/chroma/        an extracted committed snapshot
    committed/{slot}/source.json    which key and sha256 it is
    work/run-*/                     working copies
    tmp/                            downloads and extractions in progress

Slots appear by an atomic rename of a complete directory, so a slot that
exists is whole. ``archive`` and ``extract`` block: call them in a worker
thread.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

import anyio
import anyio.to_thread
import msgspec

from deltalog.errors import ConfigurationError, CorruptSnapshot, DataError, InvalidInput
from deltalog.store import ObjectStore

__all__ = [
    "SIDECAR_NAME",
    "SNAPSHOT_FORMAT",
    "ArchiveInfo",
    "Compression",
    "Sidecar",
    "SnapshotCache",
    "archive",
    "extract",
    "sha256_file",
]

SIDECAR_NAME = "deltalog-snapshot.json"
SNAPSHOT_FORMAT = 1
Compression = Literal["none", "zstd"]

_CHUNK = 1 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_SIDECAR = 64 << 20
_SOURCE_NAME = "source.json"


class Sidecar(msgspec.Struct, frozen=True):
    """What a snapshot is of. Persisted: new fields only with defaults."""

    format: int
    log: str
    hwm: int
    token: int
    created_at: float
    counts: dict[str, int]
    """Records per collection."""
    files: dict[str, str]
    """Relative POSIX path -> sha256 of every file but the sidecar; ``archive`` fills it."""
    deltalog_version: str = ""
    chroma_version: str = ""


@dataclass(frozen=True, slots=True)
class ArchiveInfo:
    path: Path
    sha256: str
    size: int
    sidecar: Sidecar
    """The sidecar as written, ``files`` filled in."""


def sha256_file(path: Path) -> tuple[str, int]:
    """The sha256 (hex) and size of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# -- archive ------------------------------------------------------------------------------


def archive(
    directory: Path, sidecar: Sidecar, out: Path, *, compression: Compression = "none"
) -> ArchiveInfo:
    """Archive a closed Chroma directory with ``sidecar`` (its ``files`` computed here).

    Members are sorted and carry the sidecar's creation time, so the same
    directory and sidecar give the same bytes. ``out`` appears only when whole.
    """
    dirs, files = _walk(directory)
    partial = out.with_name(out.name + ".partial")
    try:
        final = _write_tar(partial, directory, dirs, files, sidecar, compression)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    sha256, size = sha256_file(out)
    return ArchiveInfo(out, sha256, size, final)


def _write_tar(
    path: Path,
    directory: Path,
    dirs: list[str],
    files: list[str],
    sidecar: Sidecar,
    compression: Compression,
) -> Sidecar:
    """Directories, then files, then the sidecar with their digests; returns that sidecar."""
    mtime = int(sidecar.created_at)
    with (
        path.open("wb") as raw,
        _compressor(raw, compression) as stream,
        tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for rel in dirs:
            tar.addfile(_member(rel, tarfile.DIRTYPE, 0, mtime))
        digests = {rel: _add_file(tar, directory / rel, rel, mtime) for rel in files}
        final = msgspec.structs.replace(sidecar, files=digests)
        body = msgspec.json.format(msgspec.json.encode(final), indent=2)
        tar.addfile(_member(SIDECAR_NAME, tarfile.REGTYPE, len(body), mtime), io.BytesIO(body))
    return final


def _walk(directory: Path) -> tuple[list[str], list[str]]:
    """Relative POSIX paths of the directories and files under ``directory``, sorted."""
    if not directory.is_dir():
        raise InvalidInput(f"cannot archive {directory}: not a directory")
    dirs: list[str] = []
    files: list[str] = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            raise InvalidInput(f"cannot archive {path}: only plain files and directories")
        if path.is_dir():
            dirs.append(rel)
        elif rel != SIDECAR_NAME:  # a copied snapshot's old sidecar is replaced
            files.append(rel)
    return dirs, files


def _compressor(raw: IO[bytes], compression: Compression) -> AbstractContextManager[Any]:
    if compression == "none":
        return nullcontext(raw)
    if compression == "zstd":
        writer: AbstractContextManager[Any] = (
            _zstd().ZstdCompressor(level=3).stream_writer(raw, closefd=False)
        )
        return writer
    raise InvalidInput(f"unknown compression {compression!r}: use 'none' or 'zstd'")


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError as exc:
        raise ConfigurationError(
            "zstd snapshots need the zstandard package: pip install 'deltalog[zstd]'"
        ) from exc
    return zstandard


def _member(name: str, kind: bytes, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mtime = mtime
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


class _HashingReader:
    """Reads a file for tarfile while hashing it: one pass over the data."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.digest.update(data)
        return data


def _add_file(tar: tarfile.TarFile, path: Path, rel: str, mtime: int) -> str:
    with path.open("rb") as f:
        reader = _HashingReader(f)
        size = os.fstat(f.fileno()).st_size
        tar.addfile(_member(rel, tarfile.REGTYPE, size, mtime), reader)
    return reader.digest.hexdigest()


@dataclass(frozen=True, slots=True)
class _Subject:
    """The snapshot an error is about."""

    key: str
    log: str | None

    def corrupt(self, message: str) -> CorruptSnapshot:
        return CorruptSnapshot(message, key=self.key, log=self.log)


# -- extract ------------------------------------------------------------------------------


def extract(
    archive_path: Path,
    dest: Path,
    *,
    expected_sha256: str,
    key: str | None = None,
    log: str | None = None,
) -> Sidecar:
    """Verify and extract a snapshot, sidecar included, into ``dest``, which must not exist yet.

    Raises ``CorruptSnapshot`` (naming ``key``, or the file when no key is
    given) for a checksum mismatch, an unreadable archive, an unsafe member,
    a missing or undecodable sidecar, or a file that does not match it.
    On any error ``dest`` is removed.
    """
    where = _Subject(key or str(archive_path), log)
    actual, _size = sha256_file(archive_path)
    if actual != expected_sha256.lower():
        raise where.corrupt(f"archive sha256 is {actual}, the commit recorded {expected_sha256}")
    dest.mkdir(parents=True, exist_ok=False)
    try:
        return _extract_verified(archive_path, dest, where)
    except BaseException:
        shutil.rmtree(dest)
        raise


def _extract_verified(archive_path: Path, dest: Path, where: _Subject) -> Sidecar:
    with _corrupt_on_read_errors(where), _tar_reader(archive_path) as tar:
        digests, body = _extract_members(tar, dest, where)
    if body is None:
        raise where.corrupt(f"the archive holds no {SIDECAR_NAME}")
    sidecar = _decode_sidecar(body, where)
    _check_files(sidecar, digests, where)
    (dest / SIDECAR_NAME).write_bytes(body)
    return sidecar


@contextmanager
def _tar_reader(archive_path: Path) -> Iterator[tarfile.TarFile]:
    with archive_path.open("rb") as raw:
        zstd = raw.read(4) == _ZSTD_MAGIC
        raw.seek(0)
        stream = _zstd().ZstdDecompressor().stream_reader(raw) if zstd else raw
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            yield tar


@contextmanager
def _corrupt_on_read_errors(where: _Subject) -> Iterator[None]:
    """Errors of reading the archive's bytes become ``CorruptSnapshot``."""
    try:
        yield
    except _read_errors() as exc:
        raise where.corrupt(f"unreadable archive: {exc}") from exc


def _read_errors() -> tuple[type[Exception], ...]:
    try:
        import zstandard
    except ImportError:  # then no archive was decompressed: no zstd error to expect
        return (tarfile.TarError, EOFError)
    return (tarfile.TarError, EOFError, zstandard.ZstdError)


def _extract_members(
    tar: tarfile.TarFile, dest: Path, where: _Subject
) -> tuple[dict[str, str], bytes | None]:
    digests: dict[str, str] = {}
    sidecar: bytes | None = None
    for member in tar:
        name = _safe_name(member, dest, where)
        if member.isdir():
            (dest / name).mkdir(parents=True, exist_ok=True)
        elif name in digests or (name == SIDECAR_NAME and sidecar is not None):
            raise where.corrupt(f"the archive holds {name!r} twice")
        elif name == SIDECAR_NAME:
            sidecar = _read_sidecar(tar, member, where)
        else:
            digests[name] = _write_member(tar, member, dest / name)
    return digests, sidecar


def _safe_name(member: tarfile.TarInfo, dest: Path, where: _Subject) -> str:
    """A member's path relative to ``dest``; anything that could escape it is refused."""
    path = PurePosixPath(member.name)
    parts = [p for p in path.parts if p != "."]
    if path.is_absolute() or ".." in parts or "\\" in member.name:
        raise where.corrupt(f"unsafe member path {member.name!r}")
    if not (member.isreg() or member.isdir()) or (not parts and not member.isdir()):
        kind = "link" if member.issym() or member.islnk() else "special file"
        raise where.corrupt(f"member {member.name!r} is a {kind}: refused")
    name = "/".join(parts)
    if not (dest / name).resolve().is_relative_to(dest.resolve()):
        raise where.corrupt(f"member {member.name!r} resolves outside the snapshot")
    return name


def _read_sidecar(tar: tarfile.TarFile, member: tarfile.TarInfo, where: _Subject) -> bytes:
    if member.size > _MAX_SIDECAR:
        raise where.corrupt(f"the sidecar is {member.size} bytes: too large")
    source = tar.extractfile(member)
    assert source is not None  # a regular file always has contents
    return source.read()


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> str:
    source = tar.extractfile(member)
    assert source is not None  # a regular file always has contents
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with path.open("xb") as out:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


_sidecar_decoder = msgspec.json.Decoder(Sidecar)


def _decode_sidecar(body: bytes, where: _Subject) -> Sidecar:
    try:
        sidecar = _sidecar_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise where.corrupt(f"undecodable {SIDECAR_NAME}: {exc}") from exc
    if sidecar.format != SNAPSHOT_FORMAT:
        raise where.corrupt(
            f"snapshot format {sidecar.format} is not supported (this deltalog reads "
            f"{SNAPSHOT_FORMAT}); upgrade deltalog to read it"
        )
    return sidecar


def _check_files(sidecar: Sidecar, digests: dict[str, str], where: _Subject) -> None:
    problems = [f"{name}: missing" for name in sorted(sidecar.files.keys() - digests.keys())]
    problems += [f"{name}: not in the sidecar" for name in sorted(digests.keys() - sidecar.files)]
    problems += [
        f"{name}: sha256 mismatch"
        for name in sorted(digests.keys() & sidecar.files.keys())
        if digests[name] != sidecar.files[name]
    ]
    if problems:
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise where.corrupt(f"files do not match the sidecar: {shown}")


# -- cache --------------------------------------------------------------------------------


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
            if not await store.download_file(key, tmp / "archive"):
                raise DataError("the committed snapshot object is missing", log=log, key=key)
            await anyio.to_thread.run_sync(self._install, tmp, key, sha256, log)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, tmp)
        return slot / "chroma"

    def _install(self, tmp: Path, key: str, sha256: str, log: str) -> None:
        staged = tmp / "slot"
        sidecar = extract(
            tmp / "archive", staged / "chroma", expected_sha256=sha256, key=key, log=log
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
