"""deltalog: an event-sourced delta log on S3, folded into ChromaDB snapshots.

Producers append deltas (upserts, deletes and metadata updates of vector
records) to a log of immutable S3 objects at dense sequence numbers, exactly
once. A compactor (the ``compactor`` package) folds the log into ChromaDB
snapshots under a fenced DynamoDB lease.
"""

__version__ = "0.1.0"

from deltalog.append import Repeat
from deltalog.config import LogConfig
from deltalog.entry import Batch, Delete, Delta, Entry, Seal, UpdateMetadata, Upsert
from deltalog.errors import (
    Closed,
    ConfigurationError,
    Conflict,
    CorruptEntry,
    CorruptSnapshot,
    DataError,
    DeltalogError,
    DimensionMismatch,
    Fenced,
    IdentityMismatch,
    IncompatibleSnapshot,
    InvalidInput,
    LeaseBusy,
    LeaseLost,
    MissingObject,
    Unavailable,
    UntrustedEntry,
    ValidationError,
)
from deltalog.log import DeltaLog, LogStatistics, LogStatus
from deltalog.producer import Producer, ProducerStatistics
from deltalog.read import LogReader, ReadEnd
from deltalog.reader import Reader, ReaderStatistics

__all__ = [
    "Batch",
    "Closed",
    "ConfigurationError",
    "Conflict",
    "CorruptEntry",
    "CorruptSnapshot",
    "IncompatibleSnapshot",
    "DataError",
    "Delete",
    "Delta",
    "DeltaLog",
    "DeltalogError",
    "DimensionMismatch",
    "Entry",
    "Fenced",
    "IdentityMismatch",
    "InvalidInput",
    "LeaseBusy",
    "LeaseLost",
    "LogConfig",
    "LogReader",
    "LogStatistics",
    "LogStatus",
    "MissingObject",
    "Producer",
    "ProducerStatistics",
    "ReadEnd",
    "Reader",
    "ReaderStatistics",
    "Repeat",
    "Seal",
    "Unavailable",
    "UntrustedEntry",
    "UpdateMetadata",
    "Upsert",
    "ValidationError",
]
