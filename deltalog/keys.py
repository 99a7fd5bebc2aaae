"""Every storage key deltalog uses, built here and nowhere else.

S3, under one bucket and a configurable root prefix::

    {root}/{log}/entries/{seq:020d}
    {root}/{log}/snapshots/{hwm:020d}-{token:012d}-{nonce}.tar[.zst]
    {root}/{log}/snapshots/{snapshot name}.seen   when retention first saw an orphan

DynamoDB, one table with ``pk`` = the log's id and ``sk`` = the item kind::

    (log, "identity")       the log's full identity, ``s3://{bucket}/{root}/{log}``
    (log, "head")           next_seq, the append counter
    (log, "state")          hwm, snapshot, lease: the commit point
    (log, "layout")         the shard count and generation (no item: one index, generation 0)
    (log, "state#g{generation}-s{index}")  a shard's commit point
    (log, "schema")         the embedding dimension of each collection
    (log, "idem#{key}")     an idempotency key's claim: the seq it went to
    (log, "quarantine#{seq:020d}")  an operator's mark: treat that entry as sealed
    (log, "lease#{name}")   a named lease of a reader that owns a target
                            (``deltalog mirror``: ``mirror:{target}``)
    (log, "version#{subject}")  the highest version of a subject appended
                            (``deltalog_lambda``'s ingest: one per receipt)

A **shard** (``Shard``) of a sharded log has its own state item (above),
its own snapshots under ``{root}/{log}/snapshots/g{generation}-s{index}/``
and its own directory in a local cache; its entries are the log's. A
record's shard is ``shard_of(collection, id, shards)``: the first 8 bytes of
BLAKE2b (``digest_size=8``, no key, salt or person) of the UTF-8 bytes of
the collection name, one zero byte, and the UTF-8 bytes of the id, read as
a little-endian unsigned 64-bit integer, modulo the shard count.
Collection names never hold a zero byte, so the input is unambiguous.

and, outside every log (log names cannot start with ``_``)::

    {root}/_deltalog/probes/{nonce}     ``deltalog init``'s conditional-write probe

Zero padding keeps S3's lexicographic listing order equal to seq order, so
"every entry after n" is one ``ListObjectsV2`` with ``StartAfter``.

The log id names a log within a table; its **identity** also names the
bucket (``LogKeys.identity``). The identity item records it, and every item
of the log carries it (attribute ``identity``), so that a handle naming
another bucket or root writes nothing (``deltalog.storage.identity``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace

SEQ_WIDTH = 20
MAX_SEQ = 10**SEQ_WIDTH - 1

IDENTITY_SK = "identity"
HEAD_SK = "head"
STATE_SK = "state"
SCHEMA_SK = "schema"
IDEMPOTENCY_PREFIX = "idem#"
QUARANTINE_PREFIX = "quarantine#"
LEASE_PREFIX = "lease#"
VERSION_PREFIX = "version#"
LAYOUT_SK = "layout"
SHARD_STATE_PREFIX = "state#"
MAX_SHARDS = 256
"""The most shards a log may have (each is a lease, a state item and a Chroma index)."""
SEEN_SUFFIX = ".seen"

_LOG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SNAPSHOT_NAME = re.compile(rf"(\d{{{SEQ_WIDTH}}})-(\d{{12,}})-[A-Za-z0-9]+\.tar(?:\.zst)?")
"""What ``LogKeys.snapshot`` puts after the snapshots prefix, and nothing else."""
_ROOT = re.compile(r"^[A-Za-z0-9._/-]*$")


def valid_log_name(name: str) -> bool:
    """Log names become key segments: letters, digits, ``.``, ``_``, ``-``."""
    return bool(_LOG_NAME.match(name))


def valid_root(root: str) -> bool:
    return bool(_ROOT.match(root)) and ".." not in root.split("/")


def shard_of(collection: str, id_: str, shards: int) -> int:
    """The shard of the record ``id_`` of ``collection`` among ``shards`` (see the module doc).

    Stable across processes, machines and Python versions (not Python's
    ``hash``); ``tests/test_keys.py`` pins its values.
    """
    if shards == 1:
        return 0
    digest = hashlib.blake2b(collection.encode() + b"\x00" + id_.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % shards


@dataclass(frozen=True, slots=True)
class Shard:
    """One index of a sharded log: shard ``index`` of ``count`` in layout ``generation``.

    Generation 0 is the log without a layout item: one index under the
    log's own keys (``LogKeys.shard`` is None there, not a ``Shard``).
    """

    generation: int
    index: int
    count: int

    def __post_init__(self) -> None:
        if self.generation < 1 or not 1 <= self.count <= MAX_SHARDS:
            raise ValueError(f"invalid shard layout: generation {self.generation}, {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} is not one of {self.count}")

    @property
    def name(self) -> str:
        """How keys name it: ``g{generation}-s{index}``."""
        return f"g{self.generation}-s{self.index}"

    def owns(self, collection: str, id_: str) -> bool:
        """Whether the record ``id_`` of ``collection`` lives in this shard."""
        return shard_of(collection, id_, self.count) == self.index


@dataclass(frozen=True, slots=True)
class LogKeys:
    """The keys of one log under one root prefix (of one bucket, when ``bucket`` is given;
    of one of its shards, with ``shard``)."""

    root: str
    log: str
    bucket: str = ""
    shard: Shard | None = None

    @property
    def identity(self) -> str:
        """The log's full identity: ``s3://{bucket}/{root}/{log}`` (no root: ``s3://{bucket}/{log}``).

        Unique: a bucket name holds no ``/``, and the rest is the log id. The
        log's shards share it (they are parts of one log).
        """
        return f"s3://{self.bucket}/{self.log_id}"

    @property
    def log_id(self) -> str:
        """The DynamoDB partition key: the log, qualified by the root prefix."""
        root = self.root.strip("/")
        return f"{root}/{self.log}" if root else self.log

    @property
    def cache_name(self) -> str:
        """The log's directory in a local snapshot cache: bucket and id, ``/`` written as ``+``.

        One name per identity: no bucket name, root prefix or log name may
        hold a ``+`` (a plain ``_`` would let root ``x`` + log ``snapshots``
        share a directory with log ``x_snapshots``), so two logs of one name
        in two buckets never share a cached snapshot or a live copy. A
        shard's adds ``#`` and its name (neither a root nor a log name may
        hold a ``#``).
        """
        name = self.log_id.replace("/", "+")
        name = f"{self.bucket}+{name}" if self.bucket else name
        return f"{name}#{self.shard.name}" if self.shard is not None else name

    def for_shard(self, shard: Shard | None) -> LogKeys:
        """The same log's keys for ``shard`` (None: the log's own, generation 0)."""
        return replace(self, shard=shard)

    @property
    def state_sk(self) -> str:
        """The sort key of the commit point: ``state``, or the shard's ``state#{name}``."""
        return STATE_SK if self.shard is None else f"{SHARD_STATE_PREFIX}{self.shard.name}"

    @property
    def prefix(self) -> str:
        return f"{self.log_id}/"

    @property
    def entries_prefix(self) -> str:
        return f"{self.prefix}entries/"

    @property
    def snapshots_prefix(self) -> str:
        shard = f"{self.shard.name}/" if self.shard is not None else ""
        return f"{self.prefix}snapshots/{shard}"

    def entry(self, seq: int) -> str:
        if not 0 <= seq <= MAX_SEQ:
            raise ValueError(f"seq {seq} out of range")
        return f"{self.entries_prefix}{seq:0{SEQ_WIDTH}d}"

    def seq_of(self, key: str) -> int | None:
        """The seq of an entry key, or None for anything else under the prefix."""
        if not key.startswith(self.entries_prefix):
            return None
        tail = key[len(self.entries_prefix) :]
        if len(tail) != SEQ_WIDTH or not tail.isdigit():
            return None
        return int(tail)

    def probe(self, nonce: str) -> str:
        """A scratch key for ``deltalog init``'s probe, outside every log."""
        root = self.root.strip("/")
        return f"{root}/_deltalog/probes/{nonce}" if root else f"_deltalog/probes/{nonce}"

    def snapshot(self, hwm: int, token: int, nonce: str, suffix: str = ".tar") -> str:
        return f"{self.snapshots_prefix}{hwm:0{SEQ_WIDTH}d}-{token:012d}-{nonce}{suffix}"

    def snapshot_hwm(self, key: str) -> int | None:
        """The hwm of a snapshot key this log's layout produced; None for any other key.

        Strict on purpose: under another root the same prefix can hold other
        logs' keys (root ``""``, log ``x`` and root ``x``, log ``snapshots``
        share ``x/snapshots/``), and retention deletes only what parses.
        """
        match = self._snapshot_name(key)
        return int(match.group(1)) if match else None

    def snapshot_token(self, key: str) -> int | None:
        """The fencing token of the run that uploaded a snapshot key; None for any other key."""
        match = self._snapshot_name(key)
        return int(match.group(2)) if match else None

    def _snapshot_name(self, key: str) -> re.Match[str] | None:
        if not key.startswith(self.snapshots_prefix):
            return None
        return _SNAPSHOT_NAME.fullmatch(key[len(self.snapshots_prefix) :])

    def seen(self, snapshot_key: str) -> str:
        """The marker retention writes when it first lists an orphan (its age counts from it)."""
        return f"{snapshot_key}{SEEN_SUFFIX}"

    def seen_of(self, key: str) -> str | None:
        """The snapshot key a ``seen`` marker is of; None for any other key."""
        if not key.endswith(SEEN_SUFFIX):
            return None
        snapshot = key[: -len(SEEN_SUFFIX)]
        return snapshot if self.snapshot_hwm(snapshot) is not None else None


def root_prefix(root: str) -> str:
    """What every key under ``root`` starts with (``""`` for no root)."""
    root = root.strip("/")
    return f"{root}/" if root else ""


def entry_log(root: str, key: str) -> str | None:
    """The log whose entry ``key`` is (under ``root``), or None for any other key.

    The inverse of ``LogKeys.entry`` for someone who sees only keys, such as
    a compactor woken by S3 notifications.
    """
    root_prefix = f"{root.strip('/')}/" if root.strip("/") else ""
    if not key.startswith(root_prefix):
        return None
    log = key[len(root_prefix) :].partition("/")[0]
    if not valid_log_name(log) or LogKeys(root, log).seq_of(key) is None:
        return None
    return log


def shard_states_prefix(generation: int) -> str:
    """What the sort keys of every shard state item of ``generation`` start with."""
    return f"{SHARD_STATE_PREFIX}g{generation}-s"


def idempotency_sk(key: str) -> str:
    return f"{IDEMPOTENCY_PREFIX}{key}"


def quarantine_sk(seq: int) -> str:
    return f"{QUARANTINE_PREFIX}{seq:0{SEQ_WIDTH}d}"


def lease_sk(name: str) -> str:
    """The item of a named lease (not the compaction lease, which is in the state item)."""
    return f"{LEASE_PREFIX}{name}"


def version_sk(subject: str) -> str:
    """The item recording the highest version of ``subject`` (a receipt) appended."""
    return f"{VERSION_PREFIX}{subject}"
