"""The snapshot format: a tar archive of a Chroma directory, and its sidecar.

- A **snapshot** is a tar archive, optionally zstd-compressed, of a closed
  ChromaDB persistent directory at some hwm. The Chroma files sit at the
  archive's root, so anyone can extract it and open it with
  ``chromadb.PersistentClient(path=...)``.
- The **sidecar**, ``deltalog-snapshot.json`` at the archive's root (written
  last), says which log, hwm and fencing token the snapshot is of, how many
  records each collection holds, and the sha256 of every other file.
- The sidecar also records the deltalog and **chromadb versions** that
  wrote it: ``check_chroma_version`` refuses a snapshot written by a newer
  chromadb (major.minor) than the one installed, whose on-disk format the
  installed one may not read (``IncompatibleSnapshot``), before Chroma
  opens it. Patch releases, older writers and sidecars without a version
  pass.
- The archive's own sha256 is what the commit point records. ``extract``
  checks it before reading a single member, refuses anything but plain files
  and directories under the destination, then checks every file against the
  sidecar.

``archive``, ``write_archive`` and ``extract`` block: call them in a worker
thread. ``write_archive`` writes to any binary stream (the compactor gives
it the writer of ``upload_from_thread``, so the archive goes up as it is
written and never sits whole in memory or on disk); ``archive`` writes a file. The local cache
of extracted snapshots is ``deltalog.snapshot.cache``.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

import msgspec

from deltalog.errors import CorruptSnapshot, IncompatibleSnapshot, InvalidInput

__all__ = [
    "SIDECAR_NAME",
    "SNAPSHOT_FORMAT",
    "ArchiveInfo",
    "Compression",
    "Sidecar",
    "archive",
    "check_chroma_version",
    "extract",
    "read_sidecar",
    "sha256_file",
    "write_archive",
]

SIDECAR_NAME = "deltalog-snapshot.json"
SNAPSHOT_FORMAT = 1
Compression = Literal["none", "zstd"]
DEFAULT_ZSTD_LEVEL = 1
"""Level 1: within 3 % of the size levels 3-9 give, and the fastest (README "Performance")."""

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
    identity: str = ""
    """The log's full identity (``LogKeys.identity``); "" in an archive of a version
    before it."""


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
    directory: Path,
    sidecar: Sidecar,
    out: Path,
    *,
    compression: Compression = "none",
    level: int = DEFAULT_ZSTD_LEVEL,
) -> ArchiveInfo:
    """Archive a closed Chroma directory with ``sidecar`` (its ``files`` computed here).

    Members are sorted and carry the sidecar's creation time, so the same
    directory and sidecar give the same bytes. ``out`` appears only when whole.
    """
    partial = out.with_name(out.name + ".partial")
    try:
        with partial.open("wb") as raw:
            final = write_archive(directory, sidecar, raw, compression=compression, level=level)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    sha256, size = sha256_file(out)
    return ArchiveInfo(out, sha256, size, final)


def write_archive(
    directory: Path,
    sidecar: Sidecar,
    raw: IO[bytes] | Any,
    *,
    compression: Compression = "none",
    level: int = DEFAULT_ZSTD_LEVEL,
) -> Sidecar:
    """Write the archive of ``directory`` to the binary stream ``raw``; return the sidecar.

    Directories, then files, then the sidecar with their digests. ``raw``
    needs only ``write``; it is not closed.
    """
    dirs, files = _walk(directory)
    mtime = int(sidecar.created_at)
    with (
        _compressor(raw, compression, level) as stream,
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


def _compressor(raw: Any, compression: Compression, level: int) -> AbstractContextManager[Any]:
    if compression == "none":
        return nullcontext(raw)
    if compression == "zstd":
        if not 1 <= level <= 22:
            raise InvalidInput(f"zstd level {level} is out of range: use 1 to 22")
        writer: AbstractContextManager[Any] = (
            _zstd().ZstdCompressor(level=level).stream_writer(raw, closefd=False)
        )
        return writer
    raise InvalidInput(f"unknown compression {compression!r}: use 'none' or 'zstd'")


def _zstd() -> Any:
    import zstandard  # a dependency; imported when first used (it is not free to import)

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
    actual_sha256: str | None = None,
) -> Sidecar:
    """Verify and extract a snapshot, sidecar included, into ``dest``, which must not exist yet.

    ``actual_sha256`` is the archive's digest when the caller computed it
    already (a download hashes what it streams); otherwise the file is read
    once to compute it. Raises ``CorruptSnapshot`` (naming ``key``, or the
    file when no key is given) for a checksum mismatch, an unreadable
    archive, an unsafe member, a missing or undecodable sidecar, or a file
    that does not match it. On any error ``dest`` is removed.
    """
    where = _Subject(key or str(archive_path), log)
    actual = actual_sha256 or sha256_file(archive_path)[0]
    if actual.lower() != expected_sha256.lower():
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
    return (tarfile.TarError, EOFError, _zstd().ZstdError)


def _extract_members(
    tar: tarfile.TarFile, dest: Path, where: _Subject
) -> tuple[dict[str, str], bytes | None]:
    digests: dict[str, str] = {}
    sidecar: bytes | None = None
    kinds = _Kinds(where)
    for member in tar:
        name = _safe_name(member, dest, where)
        kinds.add(name, is_dir=member.isdir())
        if member.isdir():
            (dest / name).mkdir(parents=True, exist_ok=True)
        elif name in digests or (name == SIDECAR_NAME and sidecar is not None):
            raise where.corrupt(f"the archive holds {name!r} twice")
        elif name == SIDECAR_NAME:
            sidecar = _read_sidecar(tar, member, where)
        else:
            digests[name] = _write_member(tar, member, dest / name)
    return digests, sidecar


class _Kinds:
    """What each path of an archive is, a file or a directory (its parents are
    directories): one that would be both is refused before anything is written."""

    def __init__(self, where: _Subject) -> None:
        self.where = where
        self.dirs: set[str] = {""}
        self.files: set[str] = set()

    def add(self, name: str, *, is_dir: bool) -> None:
        parts = name.split("/") if name else []
        parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
        for path in parents:
            self._mark(path, is_dir=True)
        if name:
            self._mark(name, is_dir=is_dir)

    def _mark(self, path: str, *, is_dir: bool) -> None:
        if path in (self.files if is_dir else self.dirs):
            raise self.where.corrupt(f"the archive holds {path!r} as both a file and a directory")
        (self.dirs if is_dir else self.files).add(path)


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


def check_chroma_version(
    sidecar: Sidecar, running: str, *, key: str | None = None, log: str | None = None
) -> None:
    """Refuse a snapshot a newer chromadb (major.minor) wrote than ``running``."""
    written, mine = _major_minor(sidecar.chroma_version), _major_minor(running)
    if written is None or mine is None or written <= mine:
        return
    raise IncompatibleSnapshot(
        f"the snapshot was written by chromadb {sidecar.chroma_version}, newer than the "
        f"chromadb {running} installed here, which may not read its format: install "
        f"chromadb {written[0]}.{written[1]} or later (deploy/requirements.lock for the "
        "Lambda image) and retry",
        written_by=sidecar.chroma_version,
        running=running,
        key=key,
        log=log,
    )


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1])


def read_sidecar(directory: Path, *, key: str, log: str | None = None) -> Sidecar:
    """The sidecar of an extracted snapshot (``CorruptSnapshot`` if missing or wrong)."""
    where = _Subject(key, log)
    try:
        body = (directory / SIDECAR_NAME).read_bytes()
    except OSError as exc:
        raise where.corrupt(f"no readable {SIDECAR_NAME} in {directory}: {exc}") from exc
    return _decode_sidecar(body, where)


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
