"""Every storage key deltalog uses, built here and nowhere else.

S3, under one bucket and a configurable root prefix::

    {root}/{log}/entries/{seq:020d}
    {root}/{log}/snapshots/{hwm:020d}-{token:012d}-{nonce}.tar[.zst]
    {root}/{log}/snapshots/{snapshot name}.seen   when retention first saw an orphan

DynamoDB, one table with ``pk`` = the log's id and ``sk`` = the item kind::

    (log, "identity")       the log's full identity, ``s3://{bucket}/{root}/{log}``
    (log, "head")           next_seq, the append counter
    (log, "state")          hwm, snapshot, lease: the commit point
    (log, "schema")         the embedding dimension of each collection
    (log, "idem#{key}")     an idempotency key's claim: the seq it went to
    (log, "quarantine#{seq:020d}")  an operator's mark: treat that entry as sealed
    (log, "lease#{name}")   a named lease of a reader that owns a target
                            (``deltalog mirror``: ``mirror:{target}``)
    (log, "version#{subject}")  the highest version of a subject appended
                            (``deltalog_lambda``'s ingest: one per receipt)

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

import re
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class LogKeys:
    """The keys of one log under one root prefix (of one bucket, when ``bucket`` is given)."""

    root: str
    log: str
    bucket: str = ""

    @property
    def identity(self) -> str:
        """The log's full identity: ``s3://{bucket}/{root}/{log}`` (no root: ``s3://{bucket}/{log}``).

        Unique: a bucket name holds no ``/``, and the rest is the log id.
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
        in two buckets never share a cached snapshot or a live copy.
        """
        name = self.log_id.replace("/", "+")
        return f"{self.bucket}+{name}" if self.bucket else name

    @property
    def prefix(self) -> str:
        return f"{self.log_id}/"

    @property
    def entries_prefix(self) -> str:
        return f"{self.prefix}entries/"

    @property
    def snapshots_prefix(self) -> str:
        return f"{self.prefix}snapshots/"

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
