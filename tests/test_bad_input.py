"""The bad-input catalogue: every way input can be wrong, one case per row.

Each row names the input, the typed error it must raise and the words its
message must hold (what is wrong and what to do), and each test checks that
nothing was written or committed. Four groups:

- **deltas** through the API (``DeltaLog.append`` and a group-commit
  producer): refused before a seq is reserved, so the counter, the objects
  and the schema are as they were;
- **stored bytes**: an entry damaged in storage is refused by the reader
  (naming log, seq and key, after yielding every entry before it) and stops
  the compactor there: nothing at or after it is committed;
- **snapshots**: a committed snapshot that is damaged, of another log or
  missing stops the compactor before it applies anything: the state is as
  it was and the lease is released;
- **configuration**: missing bucket or table, wrong credentials, an
  unreachable endpoint, a store that ignores conditional writes (``deltalog
  init`` probes for it), and settings ``LogConfig`` refuses.

``python -m tests.test_bad_input`` prints the catalogue as the README's
Markdown table.
"""

from __future__ import annotations

import io
import struct
import tarfile
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from compactor import Compactor
from deltalog import (
    ConfigurationError,
    CorruptEntry,
    DataError,
    Delete,
    Delta,
    DeltaLog,
    DeltalogError,
    DimensionMismatch,
    LogConfig,
    Unavailable,
    UpdateMetadata,
    Upsert,
    ValidationError,
)
from deltalog.cli import build_parser
from deltalog.codec import Frame, batch_body, encode_delta
from deltalog.errors import CorruptSnapshot, IdentityMismatch, MissingObject, UntrustedEntry
from deltalog.signing import Signer
from deltalog.snapshot.archive import SIDECAR_NAME, Sidecar, archive
from deltalog.snapshot.sink import MemorySink, Sink
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.endpoint import FAKE_CREDENTIALS
from deltalog.storage.s3 import S3Store
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import Commit, LogState, MemoryTable
from tests.commands import deltalog
from tests.faulty import FaultyStore
from tests.footprint import Footprint, take_footprint
from tests.http_stubs import StubServer, closed_port, denying, forwarding, not_implementing

MEMORY = LogConfig(bucket="memory", table="memory", log="mem", max_delta_bytes=64 * 1024)
KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
DIM = 3


@dataclass(frozen=True)
class Case:
    """One row of the catalogue."""

    id: str
    what: str
    error: type[DeltalogError]
    words: tuple[str, ...]
    """Phrases the message must contain (case-insensitive)."""
    make: Any
    """Builds the bad input (or says how): its type depends on the group."""
    checked: str = ""
    """What the test finds unchanged afterwards, when it is particular to the row."""


def assert_message(exc: BaseException, case: Case) -> None:
    assert type(exc) is case.error, f"{case.id}: {type(exc).__name__}: {exc}"
    text = str(exc).lower()
    missing = [w for w in case.words if w.lower() not in text]
    assert not missing, f"{case.id}: {missing} not in {exc}"


# -- deltas through the API -------------------------------------------------------------


def vectors(rows: int, dim: int = DIM) -> np.ndarray:
    return np.arange(rows * dim, dtype=np.float32).reshape(rows, dim)


def upsert(**changes: Any) -> Delta:
    fields: dict[str, Any] = {
        "collection": "words",
        "ids": ["a", "b"],
        "embeddings": vectors(2),
        "documents": ["TOTAL", "12.99"],
        "metadatas": [{"n": 1}, {"n": 2}],
    }
    fields.update(changes)
    return Delta(ops=[Upsert(**fields)])


def patch(ids: list[str], metadatas: list[Any]) -> Delta:
    return Delta(ops=[UpdateMetadata(collection="words", ids=ids, metadatas=metadatas)])


def meta(value: Any) -> Delta:
    return upsert(metadatas=[{"n": 1}, {"price": value}])


def nan_row() -> Delta:
    rows = vectors(2)
    rows[1, 2] = np.nan
    return upsert(embeddings=rows)


def inf_row() -> Delta:
    rows = vectors(2)
    rows[0, 0] = np.inf
    return upsert(embeddings=rows)


def two_dims() -> Delta:
    first = Upsert(collection="words", ids=["a"], embeddings=vectors(1))
    return Delta(ops=[first, Upsert(collection="words", ids=["b"], embeddings=vectors(1, 4))])


def oversized() -> Delta:
    rows = 64
    return upsert(
        ids=[f"id{i}" for i in range(rows)],
        embeddings=np.ones((rows, 300), np.float32),
        documents=None,
        metadatas=None,
    )


DELTA_CASES = [
    Case("empty-delta", "a delta with no ops", ValidationError, ("ops", "at least one op"),
         lambda: Delta(ops=[])),
    Case("not-a-delta", "an op passed where a delta is expected", ValidationError,
         ("expected a delta",), lambda: Upsert("words", ["a"], vectors(1))),
    Case("not-an-op", "a dict in place of an op", ValidationError,
         ("ops[0]", "expected upsert, delete or updatemetadata"),
         lambda: Delta(ops=[{"collection": "words"}])),  # type: ignore[list-item]
    Case("dims-within-delta", "two dimensions for one collection in one delta", ValidationError,
         ("ops[1].embeddings", "dimension 4 differs from 3"), two_dims),
    Case("dims-across-log", "a dimension other than the collection's (log-wide)",
         DimensionMismatch, ("'words'", "holds 3-dimensional vectors", "log's first delta",
                             "this delta has 5", "new log", "rebuild"),
         lambda: upsert(ids=["a"], embeddings=vectors(1, 5), documents=None, metadatas=None)),
    Case("nan", "NaN in a vector", ValidationError,
         ("ops[0].embeddings[1]", "nan or infinity"), nan_row),
    Case("infinity", "infinity in a vector", ValidationError,
         ("ops[0].embeddings[0]", "nan or infinity"), inf_row),
    Case("beyond-float32", "a float64 beyond float32's range", ValidationError,
         ("ops[0].embeddings[0]", "beyond float32"),
         lambda: upsert(embeddings=np.full((2, DIM), 1e39))),
    Case("one-dimensional", "a 1-D array of embeddings", ValidationError,
         ("ops[0].embeddings", "shape (n, dim)"),
         lambda: upsert(ids=["a"], embeddings=np.ones(3, np.float32), documents=None,
                        metadatas=None)),
    Case("zero-dim", "vectors of dimension 0", ValidationError, ("dim >= 1",),
         lambda: upsert(embeddings=np.ones((2, 0), np.float32))),
    Case("not-numbers", "embeddings that are not numbers", ValidationError,
         ("ops[0].embeddings", "float32 numpy array"),
         lambda: upsert(embeddings=[["x", "y", "z"], ["x", "y", "z"]])),
    Case("more-vectors-than-ids", "3 vectors for 2 ids", ValidationError,
         ("ops[0].embeddings", "3 vectors for 2 ids"), lambda: upsert(embeddings=vectors(3))),
    Case("documents-length", "1 document for 2 ids", ValidationError,
         ("ops[0].documents", "2 documents, one per id"), lambda: upsert(documents=["x"])),
    Case("metadatas-length", "3 metadatas for 2 ids", ValidationError,
         ("ops[0].metadatas", "2 metadata dicts, one per id"),
         lambda: upsert(metadatas=[{"n": 1}] * 3)),
    Case("patch-length", "an UpdateMetadata with fewer patches than ids", ValidationError,
         ("ops[0].metadatas", "2 metadata dicts"), lambda: patch(["a", "b"], [{"n": 1}])),
    Case("no-ids", "an empty id list", ValidationError, ("ops[0].ids", "non-empty list of ids"),
         lambda: Delta(ops=[Delete(collection="words", ids=[])])),
    Case("empty-id", "an empty string id", ValidationError,
         ("ops[0].ids[1]", "non-empty strings"), lambda: upsert(ids=["a", ""])),
    Case("non-string-id", "an integer id", ValidationError, ("ops[0].ids[0]", "non-empty strings"),
         lambda: Delta(ops=[Delete(collection="words", ids=[7])])),  # type: ignore[list-item]
    Case("duplicate-ids", "the same id twice in one op", ValidationError,
         ("ops[0].ids", "duplicate id 'a'"), lambda: upsert(ids=["a", "a"])),
    Case("nested-metadata", "a dict as a metadata value", ValidationError,
         ("ops[0].metadatas[1]['price']", "not dict"), lambda: meta({"eur": 1})),
    Case("list-metadata", "a list of two types as a metadata value", ValidationError,
         ("['price']", "all of one type"), lambda: meta([1, "2"])),
    Case("none-in-upsert", "None as a value in an upsert's metadata", ValidationError,
         ("['price']", "only allowed in updatemetadata"), lambda: meta(None)),
    Case("nan-metadata", "NaN as a metadata value", ValidationError,
         ("['price']", "float must be finite"), lambda: meta(float("nan"))),
    Case("huge-int", "an integer beyond 64 bits", ValidationError,
         ("['price']", "64-bit range"), lambda: meta(2**63)),
    Case("empty-metadata", "an empty metadata dict", ValidationError,
         ("ops[0].metadatas[0]", "non-empty dict"), lambda: upsert(metadatas=[{}, {"n": 1}])),
    Case("reserved-key", "a metadata key starting with '#'", ValidationError,
         ("'#document'", "not starting with '#'"),
         lambda: upsert(metadatas=[{"#document": "x"}, {"n": 1}])),
    Case("non-string-document", "a document that is not a string", ValidationError,
         ("ops[0].documents[0]", "documents must be strings"),
         lambda: upsert(documents=[b"bytes", "x"])),
    Case("short-collection", "a two-letter collection name", ValidationError,
         ("ops[0].collection", "invalid collection name 'ab'", "3-512 characters"),
         lambda: upsert(collection="ab")),
    Case("ipv4-collection", "a collection named like an IPv4 address", ValidationError,
         ("invalid collection name", "ipv4 address"), lambda: upsert(collection="10.0.0.1")),
    Case("dotdot-collection", "a collection name with '..'", ValidationError,
         ("invalid collection name", "without '..'"), lambda: upsert(collection="a..b")),
    Case("oversized", "a delta over max_delta_bytes", ValidationError,
         ("over max_delta_bytes", "split it into smaller deltas"), oversized),
    Case("long-idempotency-key", "an idempotency key of 513 characters", ValidationError,
         ("idempotency_key", "at most 512"),
         lambda: Delta(ops=[Delete(collection="words", ids=["a"])], idempotency_key="k" * 513)),
]  # fmt: skip


@asynccontextmanager
async def seeded_log() -> AsyncIterator[DeltaLog]:
    """A memory log whose ``words`` collection holds 3-dimensional vectors."""
    async with DeltaLog.open(MEMORY, store=MemoryStore(), table=MemoryTable()) as log:
        await log.append(upsert())
        yield log


async def footprint(log: DeltaLog) -> tuple[int, list[str], dict[str, int], LogState]:
    """What a write would change: the counter, the objects, the schema, the state."""
    objects = [info.key async for info in log.store.list_after("")]
    table = log.table
    return (
        await log.head(),
        objects,
        await table.read_dims(log.keys.log_id),
        await table.read_state(log.keys.log_id),
    )


@pytest.mark.parametrize("case", DELTA_CASES, ids=[c.id for c in DELTA_CASES])
async def test_bad_delta(case: Case) -> None:
    async with seeded_log() as log:
        before = await footprint(log)
        with pytest.raises(DeltalogError) as appended:
            await log.append(case.make())
        assert_message(appended.value, case)
        assert appended.value.log == "mem"
        async with log.producer(linger_ms=1) as producer:
            with pytest.raises(DeltalogError) as submitted:
                await producer.submit(case.make())
        assert_message(submitted.value, case)
        assert producer.statistics().deltas_submitted == 0
        assert await footprint(log) == before


# -- stored bytes -----------------------------------------------------------------------

_HEAD = struct.Struct("<4sBBHQII")


def reheader(data: bytes, **fields: int | bytes) -> bytes:
    """``data`` with header fields replaced and both checksums made to match again."""
    names = ("magic", "version", "flags", "reserved", "seq", "length", "body_crc")
    values = dict(zip(names, _HEAD.unpack_from(data), strict=True))
    body = fields.pop("body", None)
    rest = data[_HEAD.size + 4 :]
    if isinstance(body, bytes):
        rest = body + rest[values["length"] :]
        values.update(length=len(body), body_crc=zlib.crc32(body))
    values.update(fields)
    head = _HEAD.pack(*values.values())
    return head + struct.pack("<I", zlib.crc32(head)) + rest


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]


def body_of(data: bytes) -> bytes:
    length = _HEAD.unpack_from(data)[5]
    return data[28 : 28 + length]


def lengths_mismatch(_raw: dict[int, bytes]) -> bytes:
    """Valid bytes holding an op whose lengths disagree: it decodes, the reader refuses it."""
    bad = Upsert(collection="words", ids=["x", "y"], embeddings=vectors(1))
    body = batch_body("bad", [encode_delta(Delta(ops=[bad]))], created_at=0.0)
    return Frame(body).at(2)


Damage = Callable[[dict[int, bytes]], bytes]


@dataclass(frozen=True)
class Stored:
    """How a stored-bytes case writes and reads the log."""

    damage: Damage
    writer_key: bytes | None = None
    trusted: frozenset[bytes] = frozenset()


STORED_CASES = [
    Case("truncated", "an entry cut short", CorruptEntry, ("truncated",),
         Stored(lambda raw: raw[2][:-10])),
    Case("empty-object", "a zero-byte entry object", CorruptEntry,
         ("0 bytes", "shorter than its 28-byte header"), Stored(lambda raw: b"")),
    Case("body-bit-flip", "one bit flipped in the body", CorruptEntry,
         ("body checksum mismatch",), Stored(lambda raw: flip(raw[2], 40))),
    Case("header-bit-flip", "one bit flipped in the header", CorruptEntry,
         ("header checksum mismatch",), Stored(lambda raw: flip(raw[2], 9))),
    Case("wrong-magic", "another format's magic bytes", CorruptEntry,
         ("wrong magic", "not a deltalog entry"), Stored(lambda raw: b"PK\x03\x04" + raw[2][4:])),
    Case("future-version", "format version 2", CorruptEntry,
         ("format version 2 is not supported", "upgrade deltalog"),
         Stored(lambda raw: reheader(raw[2], version=2))),
    Case("unknown-flags", "a header flag this version does not know", CorruptEntry,
         ("flags 0x80 are not understood", "upgrade deltalog"),
         Stored(lambda raw: reheader(raw[2], flags=0x80))),
    Case("checksum-field", "a body checksum that does not match", CorruptEntry,
         ("body checksum mismatch",), Stored(lambda raw: reheader(raw[2], body_crc=12345))),
    Case("other-seq", "seq 3's entry stored at seq 2", CorruptEntry,
         ("header names seq 3", "written for another seq"), Stored(lambda raw: raw[3])),
    Case("undecodable-body", "valid checksums around a body that is not an entry", CorruptEntry,
         ("undecodable entry body",),
         Stored(lambda raw: Frame(msgspec.msgpack.encode({"type": "nope"})).at(2))),
    Case("lengths-in-log", "valid bytes holding 2 ids and 1 vector", CorruptEntry,
         ("malformed entry", "1 vectors for 2 ids"), Stored(lengths_mismatch)),
    Case("unsigned", "an unsigned entry, signatures required", UntrustedEntry,
         ("not signed", "trusts only entries signed with keys"),
         Stored(lambda raw: Frame(body_of(raw[2])).at(2), writer_key=KEY,
                trusted=frozenset({KEY}))),
    Case("untrusted-key", "an entry signed with a key not trusted", UntrustedEntry,
         ("signed with key", "not trusted", "verify_keys"),
         Stored(lambda raw: Frame(body_of(raw[2])).at(2, signer=Signer(OTHER_KEY)),
                writer_key=KEY, trusted=frozenset({KEY}))),
    Case("forged", "a signed entry whose body was altered (checksums redone)", UntrustedEntry,
         ("signature does not match", "altered or forged"),
         Stored(lambda raw: reheader(raw[2], body=body_of(raw[1])), writer_key=KEY,
                trusted=frozenset({KEY}))),
    Case("moved-signed", "a signed entry moved to another seq (header redone)", UntrustedEntry,
         ("signature does not match",),
         Stored(lambda raw: reheader(raw[3], seq=2), writer_key=KEY, trusted=frozenset({KEY}))),
]  # fmt: skip


async def collect(log: DeltaLog, seen: list[int]) -> None:
    async for seq, _entry in log.read():
        seen.append(seq)


async def write_three(store: MemoryStore, table: MemoryTable, key: bytes | None) -> None:
    config = replace(MEMORY, signing_key=key)
    async with DeltaLog.open(config, store=store, table=table) as log:
        for name in ("a", "b", "c"):
            await log.append(upsert(ids=[f"{name}1", f"{name}2"]))


async def memory_sink(_path: Path) -> Sink:
    return MemorySink()


@pytest.mark.parametrize("case", STORED_CASES, ids=[c.id for c in STORED_CASES])
async def test_bad_stored_bytes(case: Case, tmp_path: Path) -> None:
    how: Stored = case.make
    store, table = MemoryStore(), MemoryTable()
    await write_three(store, table, how.writer_key)
    keys = MEMORY.keys
    raw = {seq: (await store.get(keys.entry(seq))).data for seq in (1, 2, 3)}  # type: ignore[union-attr]
    store.overwrite(keys.entry(2), how.damage(raw))
    reader = replace(MEMORY, verify_keys=how.trusted)
    async with DeltaLog.open(reader, store=store, table=table) as log:
        seen: list[int] = []
        with pytest.raises(DeltalogError) as raised:
            await collect(log, seen)
        assert_message(raised.value, case)
        assert (seen, raised.value.seq, raised.value.log) == ([1], 2, "mem")
        assert raised.value.key == keys.entry(2)
    async with Compactor(
        reader, cache_dir=tmp_path, store=store, table=table, sink_factory=memory_sink
    ) as compactor:
        with pytest.raises(DeltalogError) as compacted:
            await compactor.run_once()
    assert_message(compacted.value, case)
    assert (compacted.value.seq, compacted.value.log) == (2, "mem")
    state = await table.read_state(keys.log_id)
    assert state.hwm < 2 and state.owner is None


async def test_a_listed_entry_that_is_gone_is_a_data_error(tmp_path: Path) -> None:
    """Not a catalogue row of its own kind: entries must never be deleted."""
    store, table = MemoryStore(), MemoryTable()
    await write_three(store, table, None)
    faulty = FaultyStore(store)
    faulty.vanished.add(MEMORY.keys.entry(2))
    async with DeltaLog.open(MEMORY, store=faulty, table=table) as log:
        with pytest.raises(DataError, match="entries must never be deleted") as raised:
            async for _ in log.read():
                pass
    assert raised.value.seq == 2


# -- snapshots ----------------------------------------------------------------------------


def tar_of(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def sidecar_json(log: str = "mem", files: dict[str, bytes] | None = None, **changes: Any) -> bytes:
    import hashlib

    digests = {name: hashlib.sha256(data).hexdigest() for name, data in (files or {}).items()}
    sidecar = Sidecar(format=1, log=log, hwm=1, token=1, created_at=0.0, counts={}, files=digests)
    return msgspec.json.encode(msgspec.structs.replace(sidecar, **changes))


FILES = {"chroma.sqlite3": b"not really sqlite"}


def snapshot_tar(**changes: Any) -> bytes:
    return tar_of({**FILES, SIDECAR_NAME: sidecar_json(files=FILES, **changes)})


@dataclass(frozen=True)
class Snap:
    """The committed snapshot's bytes, and what happens to the object after the commit."""

    data: Callable[[Path], bytes]
    after: Callable[[MemoryStore, str], Awaitable[None]] | None = None


def good_snapshot(tmp: Path) -> bytes:
    work = tmp / "snap-dir"
    work.mkdir()
    (work / "chroma.sqlite3").write_bytes(b"fine")
    sidecar = Sidecar(format=1, log="mem", hwm=1, token=1, created_at=0.0, counts={}, files={})
    return archive(work, sidecar, tmp / "good.tar").path.read_bytes()


async def deleted(store: MemoryStore, key: str) -> None:
    await store.delete(key)


async def replaced(store: MemoryStore, key: str) -> None:
    data = (await store.get(key)).data  # type: ignore[union-attr]
    store.overwrite(key, data + b"\0" * 512)


SNAPSHOT_CASES = [
    Case("snapshot-checksum", "archive bytes that differ from the committed sha256",
         CorruptSnapshot, ("archive sha256 is", "the commit recorded"),
         Snap(good_snapshot, replaced)),
    Case("snapshot-missing", "the committed snapshot object deleted", MissingObject,
         ("committed snapshot object is missing",), Snap(good_snapshot, deleted)),
    Case("snapshot-garbage", "a committed archive that is not a tar", CorruptSnapshot,
         ("unreadable archive",), Snap(lambda tmp: b"\x00not a tar archive" * 64)),
    Case("snapshot-truncated", "a committed archive cut in half", CorruptSnapshot,
         ("unreadable archive",), Snap(lambda tmp: snapshot_tar()[:700])),
    Case("sidecar-missing", "an archive without its sidecar", CorruptSnapshot,
         ("holds no deltalog-snapshot.json",), Snap(lambda tmp: tar_of(FILES))),
    Case("sidecar-other-log", "a sidecar of another log", CorruptSnapshot,
         ("sidecar is of log 'other'",), Snap(lambda tmp: snapshot_tar(log="other"))),
    Case("sidecar-digests", "a file whose sha256 differs from the sidecar's", CorruptSnapshot,
         ("do not match the sidecar", "sha256 mismatch"),
         Snap(lambda tmp: tar_of({"chroma.sqlite3": b"changed", SIDECAR_NAME:
                                  sidecar_json(files=FILES)}))),
    Case("sidecar-extra-file", "a file the sidecar does not list", CorruptSnapshot,
         ("not in the sidecar",),
         Snap(lambda tmp: tar_of({**FILES, "extra": b"x", SIDECAR_NAME:
                                  sidecar_json(files=FILES)}))),
    Case("sidecar-future", "a sidecar of snapshot format 2", CorruptSnapshot,
         ("snapshot format 2 is not supported", "upgrade deltalog"),
         Snap(lambda tmp: snapshot_tar(format=2))),
    Case("sidecar-undecodable", "a sidecar that is not JSON", CorruptSnapshot,
         ("undecodable deltalog-snapshot.json",),
         Snap(lambda tmp: tar_of({**FILES, SIDECAR_NAME: b"{not json"}))),
    Case("snapshot-unsafe-path", "an archive member escaping the directory", CorruptSnapshot,
         ("unsafe member path",),
         Snap(lambda tmp: tar_of({"../escape": b"x", SIDECAR_NAME: sidecar_json()}))),
    Case("snapshot-file-and-dir", "an archive holding a file and a directory of one name",
         CorruptSnapshot, ("as both a file and a directory",),
         Snap(lambda tmp: tar_of({"a": b"x", "a/b": b"y", SIDECAR_NAME: sidecar_json()}))),
]  # fmt: skip


async def commit_snapshot(store: MemoryStore, table: MemoryTable, data: bytes) -> Commit:
    """Upload ``data`` as a snapshot at hwm 1 and commit it under a lease."""
    import hashlib

    keys = MEMORY.keys
    lease = await table.acquire(keys.log_id, "test", ttl=30, now=time.time())
    key = keys.snapshot(1, lease.token, uuid.uuid4().hex[:12])
    assert await store.put_if_absent(key, data)
    commit = Commit(1, key, hashlib.sha256(data).hexdigest(), len(data))
    await table.commit(keys.log_id, "test", lease.token, prev_hwm=0, commit=commit, now=0.0)
    assert await table.release(keys.log_id, "test", lease.token)
    return commit


async def snapshot_setup(tmp_path: Path, snap: Snap) -> tuple[MemoryStore, MemoryTable]:
    store, table = MemoryStore(), MemoryTable()
    await write_three(store, table, None)
    commit = await commit_snapshot(store, table, snap.data(tmp_path))
    if snap.after is not None:
        assert commit.snapshot_key is not None
        await snap.after(store, commit.snapshot_key)
    return store, table


async def test_a_good_snapshot_is_taken_up(tmp_path: Path) -> None:
    """The control for the snapshot rows: the same setup, undamaged, compacts."""
    store, table = await snapshot_setup(tmp_path, Snap(good_snapshot))
    async with Compactor(
        MEMORY, cache_dir=tmp_path, store=store, table=table, sink_factory=memory_sink
    ) as compactor:
        result = await compactor.run_once()
    assert (result.status, result.hwm_before, result.hwm_after) == ("applied", 1, 3)


@pytest.mark.parametrize("case", SNAPSHOT_CASES, ids=[c.id for c in SNAPSHOT_CASES])
async def test_bad_snapshot(case: Case, tmp_path: Path) -> None:
    store, table = await snapshot_setup(tmp_path, case.make)
    before = await table.read_state(MEMORY.keys.log_id)
    async with Compactor(
        MEMORY, cache_dir=tmp_path / "cache", store=store, table=table, sink_factory=memory_sink
    ) as compactor:
        with pytest.raises(DeltalogError) as raised:
            await compactor.run_once()
    assert_message(raised.value, case)
    assert raised.value.key == before.snapshot_key and raised.value.log == "mem"
    after = await table.read_state(MEMORY.keys.log_id)
    assert (after.hwm, after.snapshot_key, after.snapshot_sha256, after.owner) == (
        before.hwm,
        before.snapshot_key,
        before.snapshot_sha256,
        None,
    )
    assert not list((tmp_path / "cache").glob("*/committed/*")), "nothing cached"


# -- configuration ------------------------------------------------------------------------


async def test_an_endpoint_that_answered_once_is_unavailable_not_misconfigured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connection failures are setup errors only until the endpoint first answers."""
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    async with AsyncExitStack() as stack:
        with StubServer(denying()) as stub:
            config = LogConfig(bucket="b", table="t", dynamodb_endpoint_url=stub.url)
            table = await DynamoTable.connect(config)
            stack.push_async_callback(table.aclose)
            with pytest.raises(ConfigurationError, match="access denied"):
                await table.read_head("log")
        with pytest.raises(Unavailable, match="cannot reach the endpoint") as raised:
            await table.read_head("log")  # the stub is gone now
        assert "never answered" not in str(raised.value)


@asynccontextmanager
async def aws_log(config: LogConfig) -> AsyncIterator[tuple[DeltaLog, S3Store, DynamoTable]]:
    async with AsyncExitStack() as stack:
        store = await S3Store.connect(config)
        stack.push_async_callback(store.aclose)
        table = await DynamoTable.connect(config)
        stack.push_async_callback(table.aclose)
        log = await stack.enter_async_context(DeltaLog.open(config, store=store, table=table))
        yield log, store, table


def unchanged(before: Footprint) -> Footprint:
    return before


@dataclass(frozen=True)
class Act:
    """What a configuration row does, and where on the real endpoint it could write.

    The test takes the endpoint's footprint (every bucket and table name, the
    keys of ``buckets``, the items of ``partitions``: (table, log id)) before
    and after ``run`` and expects ``writes(before)``: the footprint unchanged
    for every row but two.
    """

    run: Callable[[], Awaitable[None]]
    buckets: tuple[str, ...] = ()
    partitions: tuple[tuple[str, str], ...] = ()
    writes: Callable[[Footprint], Footprint] = unchanged


Make = Callable[[str, LogConfig], Awaitable[Act]]


def partition(config: LogConfig) -> tuple[str, str]:
    """The log's items in its table."""
    return (config.table, config.keys.log_id)


async def missing_bucket(endpoint: str, config: LogConfig) -> Act:
    gone = replace(config, bucket=f"missing-{uuid.uuid4().hex[:12]}")

    async def run() -> None:
        async with aws_log(gone) as (log, _store, _table):
            await log.append(upsert())

    return Act(run, buckets=(config.bucket, gone.bucket), partitions=(partition(config),))


async def _recorded_log(config: LogConfig) -> None:
    """A log with one entry, opened (so its identity is recorded) in ``config``'s bucket."""
    async with aws_log(config) as (log, _store, _table):
        await log.append(upsert())


async def another_bucket(endpoint: str, config: LogConfig) -> Act:
    """The log is recorded in one bucket; a handle names another (a typo)."""
    await _recorded_log(config)
    typo = replace(config, bucket=f"typo-{uuid.uuid4().hex[:12]}")

    async def run() -> None:
        async with aws_log(typo) as (log, _store, _table):
            await log.append(upsert())

    return Act(run, buckets=(config.bucket, typo.bucket), partitions=(partition(config),))


async def older_log_another_bucket(endpoint: str, config: LogConfig) -> Act:
    """A log an older version wrote (no identity recorded), opened with an empty bucket."""
    other = replace(config, bucket=f"other-{uuid.uuid4().hex[:12]}")
    async with AsyncExitStack() as stack:
        store = await S3Store.connect(config)
        stack.push_async_callback(store.aclose)
        table = await DynamoTable.connect(config)
        stack.push_async_callback(table.aclose)
        await DeltaLog(config, store, table).append(upsert())  # not opened: no identity
        empty = await S3Store.connect(other)
        stack.push_async_callback(empty.aclose)
        await empty.ensure_bucket()

    async def run() -> None:
        async with aws_log(other) as (log, _store, _table):
            await log.append(upsert())

    return Act(run, buckets=(config.bucket, other.bucket), partitions=(partition(config),))


async def missing_table(endpoint: str, config: LogConfig) -> Act:
    gone = replace(config, table=f"missing-{uuid.uuid4().hex[:12]}")

    async def run() -> None:
        async with aws_log(gone) as (log, _store, _table):
            await log.append(upsert())

    return Act(run, buckets=(config.bucket,), partitions=(partition(config), partition(gone)))


def _through(stub: StubServer, config: LogConfig, service: str) -> LogConfig:
    url = {f"{service}_endpoint_url": stub.url}
    return replace(config, **url)  # type: ignore[arg-type]


async def _with_stub(
    config: LogConfig, service: str, call: Callable[[DeltaLog], Awaitable[object]]
) -> None:
    with StubServer(denying()) as stub:
        async with aws_log(_through(stub, config, service)) as (log, _store, _table):
            await call(log)
        assert stub.requests, "the request reached the endpoint"


async def read_all(log: DeltaLog) -> None:
    async for _ in log.read():
        pass


async def wrong_s3_credentials(endpoint: str, config: LogConfig) -> Act:
    async def run() -> None:
        await _with_stub(config, "s3", read_all)

    return Act(run, buckets=(config.bucket,), partitions=(partition(config),))


async def wrong_dynamodb_credentials(endpoint: str, config: LogConfig) -> Act:
    async def run() -> None:
        await _with_stub(config, "dynamodb", lambda log: log.append(upsert()))

    return Act(run, buckets=(config.bucket,), partitions=(partition(config),))


class Attempts:
    """Counts the HTTP attempts of botocore clients (its ``before-send`` event)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, **_event: object) -> None:
        self.count += 1

    def watch(self, *adapters: S3Store | DynamoTable) -> None:
        for adapter in adapters:
            # The adapters' botocore clients; ``meta.events`` is botocore's public hook.
            adapter._client.meta.events.register("before-send", self)


async def unreachable(endpoint: str, config: LogConfig) -> Act:
    nowhere = replace(config, endpoint_url=f"http://127.0.0.1:{closed_port()}")

    async def run() -> None:
        attempts = Attempts()
        try:
            async with AsyncExitStack() as stack:
                store = await S3Store.connect(nowhere)
                stack.push_async_callback(store.aclose)
                table = await DynamoTable.connect(nowhere)
                stack.push_async_callback(table.aclose)
                attempts.watch(store, table)  # opening the log is its first request
                log = await stack.enter_async_context(
                    DeltaLog.open(nowhere, store=store, table=table)
                )
                await log.append(Delta(ops=[Delete(collection="words", ids=["a"])]))
        finally:
            # Fails fast: the first request's own attempts (botocore's 4: 3 retries),
            # no retry loop of deltalog's on top (append would try 8 times over).
            assert 1 <= attempts.count <= 4, attempts.count

    return Act(run)


async def ignores_conditional_writes(endpoint: str, config: LogConfig) -> Act:
    """``deltalog init`` through a proxy that drops If-None-Match.

    The command runs twice: as ``deltalog`` in a subprocess (its exit status
    and its one line on stderr) and in this process, where the error it
    raises is the one the row checks.
    """
    bucket, table = f"probe-{uuid.uuid4().hex[:12]}", f"probe-{uuid.uuid4().hex[:12]}"
    init = ["init", "--bucket", bucket, "--table", table]

    async def run() -> None:
        with StubServer(forwarding(endpoint, drop={"If-None-Match"})) as proxy:
            env = {"AWS_ENDPOINT_URL_S3": proxy.url, "AWS_ENDPOINT_URL_DYNAMODB": endpoint}
            done = await deltalog(*init, **env)
            assert done.code == 2, (done.code, done.err)
            assert done.err.startswith("deltalog: ConfigurationError: "), done.err
            assert "does not honour If-None-Match" in done.err, done.err
            assert done.err.count("\n") == 1, done.err
            assert done.out.splitlines() == [f"bucket {bucket}: created"], done.out
            args = build_parser().parse_args(init)
            with pytest.MonkeyPatch.context() as patch:
                for name, value in env.items():
                    patch.setenv(name, value)
                await args.run(args)

    writes: Callable[[Footprint], Footprint] = lambda before: replace(  # noqa: E731
        before, buckets=before.buckets | {bucket}, objects={**before.objects, bucket: frozenset()}
    )
    return Act(run, buckets=(config.bucket, bucket), writes=writes)


async def rejects_if_none_match(endpoint: str, config: LogConfig) -> Act:
    async def run() -> None:
        with StubServer(not_implementing("If-None-Match")) as stub:
            store = await S3Store.connect(replace(config, s3_endpoint_url=stub.url))
            try:
                await store.check_conditional_writes(config.keys.probe("p"))
            finally:
                await store.aclose()
        assert [(method, "If-None-Match" in headers) for method, _, headers in stub.requests] == [
            ("PUT", True)
        ], "refused at the first conditional put"

    return Act(run)


def settings(**values: Any) -> Make:
    async def make(endpoint: str, config: LogConfig) -> Act:
        async def run() -> None:
            LogConfig(**{"bucket": "b", "table": "t", **values})

        return Act(run)

    return make


def env_settings(env: Env) -> Make:
    async def make(endpoint: str, config: LogConfig) -> Act:
        async def run() -> None:
            LogConfig.from_env(env, bucket="b", table="t")

        return Act(run)

    return make


async def invalid_bucket_name(endpoint: str, config: LogConfig) -> Act:
    async def run() -> None:
        store = await S3Store.connect(replace(config, bucket="ab"))
        try:
            await store.ensure_bucket()
        finally:
            await store.aclose()

    return Act(run)


Env = dict[str, str]
SECRET_HEX = "f" * 31  # odd length: not hex; must never be echoed
LOG = "the bucket's objects and the log's table items"
SETTING = "cannot write: `LogConfig` refuses it before any client exists"

CONFIG_CASES = [
    Case("missing-bucket", "a bucket that does not exist", ConfigurationError,
         ("does not exist", "run `deltalog init --bucket"), missing_bucket,
         "bucket and table names, " + LOG),
    Case("missing-table", "a table that does not exist", ConfigurationError,
         ("does not exist", "run `deltalog init --bucket"), missing_table,
         "bucket and table names, " + LOG),
    Case("another-bucket", "a bucket other than the one the log's identity records",
         IdentityMismatch, ("is s3://deltalog-tests/", "not s3://typo-", "check --bucket"),
         another_bucket, "bucket and table names, " + LOG + " (no seq reserved)"),
    Case("older-log-another-bucket",
         "a log written before identities, with a bucket that holds none of its entries",
         IdentityMismatch, ("no recorded bucket", "cannot be its bucket", "none of its entries"),
         older_log_another_bucket, "bucket and table names, " + LOG + " (no identity recorded)"),
    Case("wrong-s3-credentials", "S3 refuses the credentials (403 InvalidAccessKeyId)",
         ConfigurationError, ("access denied (invalidaccesskeyid)", "check the credentials"),
         wrong_s3_credentials, LOG + " (S3 answered by a stub)"),
    Case("wrong-dynamodb-credentials", "DynamoDB refuses the credentials",
         ConfigurationError,
         ("access denied (unrecognizedclientexception)", "check the credentials"),
         wrong_dynamodb_credentials, LOG + " (DynamoDB answered by a stub)"),
    Case("unreachable-endpoint", "an endpoint on a closed port", ConfigurationError,
         ("cannot reach the endpoint", "never answered", "check the endpoint url"), unreachable,
         "cannot write: nothing listens; at most 4 attempts (botocore's), no retry loop"),
    Case("ignores-if-none-match", "`deltalog init` on a store that ignores If-None-Match",
         ConfigurationError, ("does not honour if-none-match", "exactly-once"),
         ignores_conditional_writes,
         "bucket and table names, the new bucket's objects: the bucket only, empty; exit 2"),
    Case("rejects-if-none-match", "`init` on a store that answers 501 to If-None-Match",
         ConfigurationError, ("does not implement", "conditional writes (if-none-match)"),
         rejects_if_none_match, "cannot write: a stub answers; one conditional PUT"),
    Case("invalid-bucket-name", "`init` with a two-letter bucket name", ConfigurationError,
         ("bucket name is invalid", "3-63 lowercase"), invalid_bucket_name,
         "bucket names"),
    Case("no-bucket", "no bucket configured", ConfigurationError,
         ("no bucket configured", "--bucket", "deltalog_bucket"), settings(bucket=""), SETTING),
    Case("no-table", "no table configured", ConfigurationError,
         ("no table configured", "--table", "deltalog_table"), settings(table=""), SETTING),
    Case("bad-log-name", "a log name with '/'", ConfigurationError,
         ("invalid log name", "letters, digits"), settings(log="a/b"), SETTING),
    Case("limits", "max_delta_bytes above max_entry_bytes", ConfigurationError,
         ("must not exceed max_entry_bytes",), settings(max_delta_bytes=2, max_entry_bytes=1),
         SETTING),
    Case("bad-sse", "an unknown server-side encryption mode", ConfigurationError,
         ("not a server-side encryption mode", "aws:kms"), settings(sse="aws:kmz"), SETTING),
    Case("kms-key-without-sse", "a KMS key id without sse='aws:kms'", ConfigurationError,
         ("needs sse='aws:kms'",), settings(sse_kms_key_id="alias/x"), SETTING),
    Case("short-signing-key", "an 8-byte signing key", ConfigurationError,
         ("signing_key is 8 bytes", "at least 16"), settings(signing_key=b"12345678"), SETTING),
    Case("signing-key-not-hex", "DELTALOG_SIGNING_KEY that is not hex", ConfigurationError,
         ("deltalog_signing_key is not hex",),
         env_settings({"DELTALOG_SIGNING_KEY": SECRET_HEX}), SETTING),
]  # fmt: skip


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c.id for c in CONFIG_CASES])
async def test_bad_configuration(case: Case, endpoint: str, config: LogConfig) -> None:
    act: Act = await case.make(endpoint, config)
    before = await take_footprint(endpoint, buckets=act.buckets, partitions=act.partitions)
    with pytest.raises(DeltalogError) as raised:
        await act.run()
    assert_message(raised.value, case)
    assert SECRET_HEX not in str(raised.value)
    after = await take_footprint(endpoint, buckets=act.buckets, partitions=act.partitions)
    assert after == act.writes(before), "nothing else was written"


CATALOGUE = [
    ("delta", DELTA_CASES, "the counter, objects, schema and state"),
    ("stored bytes", STORED_CASES, "no commit at or after the bad seq"),
    ("snapshot", SNAPSHOT_CASES, "the state, the lease and the cache"),
    ("configuration", CONFIG_CASES, ""),
]


def markdown() -> str:
    """The catalogue as the README's table."""
    lines = [
        "| # | kind | input | error | the message says | unchanged afterwards |",
        "|---|---|---|---|---|---|",
    ]
    n = 0
    for kind, cases, checked in CATALOGUE:
        for case in cases:
            n += 1
            words = "; ".join(f"`` {w} ``" if "`" in w else f"`{w}`" for w in case.words)
            row = f"| {n} | {kind} | {case.what} | `{case.error.__name__}` | {words} |"
            lines.append(f"{row} {case.checked or checked} |")
    return "\n".join(lines)


def test_the_readme_shows_this_catalogue() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert markdown() in readme, "run `python -m tests.test_bad_input` and paste its table"


if __name__ == "__main__":
    print(markdown())
