"""Every error deltalog raises, grouped by what the caller should do.

::

    DeltalogError                   the root: catch this to catch everything
    ├── InvalidInput                fix the call; nothing was written
    │   └── ValidationError         a delta breaks a rule (names the field)
    │       └── DimensionMismatch   vectors of another dimension than the
    │                               collection's: another embedding model
    ├── ConfigurationError          fix the setup: missing bucket or table,
    │   │                           bad credentials, an unusable endpoint
    │   ├── IdentityMismatch        the table's log of that name lives in
    │   │                           another bucket or root: a typo
    │   └── IncompatibleSnapshot    a snapshot written by a newer Chroma than
    │                               the one installed: upgrade chromadb
    ├── Unavailable                 retry later: network, throttling, 5xx
    ├── Conflict                    re-read and retry: someone else won a race
    │   └── LeaseBusy               another compactor holds the lease
    ├── Fenced                      stop, never retry: a newer owner exists
    │   └── LeaseLost               our lease expired or was taken over
    ├── DataError                   stored bytes are wrong (names key and seq)
    │   ├── CorruptEntry            an entry that cannot be decoded or verified
    │   │   └── UntrustedEntry      not signed by a trusted key (signing is on)
    │   ├── CorruptSnapshot         a snapshot archive or its sidecar is wrong
    │   └── MissingObject           an object to read is not there (a snapshot
    │                               retention deleted: read the state again)
    └── Closed                      the object was closed before the call

Every error carries the ``log``, ``seq`` and ``key`` it concerns when known,
and adapters chain the foreign exception with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "Closed",
    "ConfigurationError",
    "Conflict",
    "CorruptEntry",
    "CorruptSnapshot",
    "DataError",
    "DeltalogError",
    "DimensionMismatch",
    "Fenced",
    "IdentityMismatch",
    "IncompatibleSnapshot",
    "InvalidInput",
    "LeaseBusy",
    "LeaseLost",
    "MissingObject",
    "Unavailable",
    "UntrustedEntry",
    "ValidationError",
]


class DeltalogError(Exception):
    """The root of every deltalog error."""

    def __init__(
        self,
        message: str,
        *,
        log: str | None = None,
        seq: int | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.log = log
        self.seq = seq
        self.key = key
        super().__init__(self._render())

    def _render(self) -> str:
        where = [
            f"{name}={value}"
            for name, value in (("log", self.log), ("seq", self.seq), ("key", self.key))
            if value is not None
        ]
        return f"{self.message} [{', '.join(where)}]" if where else self.message


class InvalidInput(DeltalogError):
    """The call was wrong: fix it. Nothing was written."""


class ValidationError(InvalidInput):
    """A delta breaks a rule; ``field`` is a path such as ``ops[0].ids[3]``."""

    def __init__(self, field: str, reason: str, *, log: str | None = None) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}", log=log)


class DimensionMismatch(ValidationError):
    """Vectors whose dimension differs from the one their collection holds.

    A collection's dimension is fixed by the first delta that wrote vectors
    to it, so vectors from another embedding model (``got``) cannot join
    those already there (``known``). ``source`` says whose vectors they are.
    """

    def __init__(
        self,
        collection: str,
        *,
        known: int,
        got: int,
        source: str = "this delta",
        log: str | None = None,
    ) -> None:
        self.collection = collection
        self.known = known
        self.got = got
        self.source = source
        super().__init__(
            f"collection {collection!r}",
            f"holds {known}-dimensional vectors, a dimension fixed by the log's first delta; "
            f"{source} has {got}: another embedding model. Keep the embedder the log was "
            "written with, or start a new log (another --log name) and rebuild it there by "
            "ingesting the source data again with the new embedder",
            log=log,
        )


class ConfigurationError(DeltalogError):
    """The setup is wrong: a missing bucket or table, credentials, endpoint."""


class IdentityMismatch(ConfigurationError):
    """The table's log of this name belongs to another bucket or root prefix.

    A log's identity (``s3://{bucket}/{root}/{log}``) is recorded by its
    first use and checked by every later one, so a handle that names another
    bucket (a typo) writes nothing and reads nothing. ``recorded`` is the
    identity the table holds (None when the log has none recorded yet and the
    bucket does not hold its data), ``wanted`` the one the handle named.
    """

    def __init__(
        self, message: str, *, recorded: str | None, wanted: str, log: str | None = None
    ) -> None:
        self.recorded = recorded
        self.wanted = wanted
        super().__init__(message, log=log)


class IncompatibleSnapshot(ConfigurationError):
    """A snapshot whose sidecar says a newer Chroma (major.minor) wrote it than the one
    installed, which may not read its format: refused before Chroma opens it.

    ``written_by`` and ``running`` are the two chromadb versions.
    """

    def __init__(
        self,
        message: str,
        *,
        written_by: str,
        running: str,
        log: str | None = None,
        key: str | None = None,
    ) -> None:
        self.written_by = written_by
        self.running = running
        super().__init__(message, log=log, key=key)


class Unavailable(DeltalogError):
    """A transient failure; retrying later may succeed.

    ``ambiguous`` is true when a write may have happened although the call
    failed (a timeout or reset after the request was sent).
    """

    def __init__(
        self,
        message: str,
        *,
        ambiguous: bool = False,
        log: str | None = None,
        seq: int | None = None,
        key: str | None = None,
    ) -> None:
        self.ambiguous = ambiguous
        super().__init__(message, log=log, seq=seq, key=key)


class Conflict(DeltalogError):
    """Somebody else won a race: re-read the state and retry."""


class LeaseBusy(Conflict):
    """Another compactor holds the lease for this log."""


class Fenced(DeltalogError):
    """A newer owner exists: stop and never retry this operation."""


class LeaseLost(Fenced):
    """The lease expired or was taken over while we held it."""


class DataError(DeltalogError):
    """Stored bytes are wrong; the message names the key and the seq."""


class CorruptEntry(DataError):
    """An entry that cannot be decoded or fails verification."""


class UntrustedEntry(CorruptEntry):
    """An entry that is unsigned, signed by an untrusted key, or whose signature
    does not match, read by a reader that requires signatures.

    ``key_id`` names the signing key (16 hex digits, never the key itself),
    or is None for an unsigned entry.
    """

    def __init__(
        self,
        message: str,
        *,
        key_id: str | None = None,
        log: str | None = None,
        seq: int | None = None,
        key: str | None = None,
    ) -> None:
        self.key_id = key_id
        super().__init__(message, log=log, seq=seq, key=key)


class CorruptSnapshot(DataError):
    """A snapshot archive that fails its checksum, cannot be read, or whose
    sidecar is missing, undecodable or does not match the files."""


class MissingObject(DataError):
    """An object that was to be read is not there (``key`` names it), or vanished
    while it was being downloaded.

    For a snapshot this is what retention does once a newer commit replaced
    it: read the state again and load what it points to now. Only a snapshot
    the state still points to that is missing is damage.
    """


class Closed(DeltalogError):
    """The object was closed; open a new one."""
