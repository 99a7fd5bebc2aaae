"""What the log holds: ops, deltas, and the entries that carry them.

- An **op** changes one collection: ``Upsert``, ``Delete`` or
  ``UpdateMetadata`` (a merge in which ``None`` removes a key).
- A **delta** is what one producer call appends atomically: a list of ops
  with a ``delta_id``, the producer's id, a creation time and an optional
  idempotency key.
- An **entry** is one object at one seq: a ``Batch`` of deltas (several when
  group commit shares an entry) or a ``Seal`` that fills a hole.

Every persisted type is a frozen msgspec struct; new fields must have
defaults and unknown fields are ignored, so old readers survive new writers.
Embeddings are ``numpy.float32`` arrays of shape ``(n, dim)``, stored as
little-endian float32 bytes (see ``codec``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = [
    "Batch",
    "Delete",
    "Delta",
    "Entry",
    "Metadata",
    "MetadataPatch",
    "Op",
    "Seal",
    "UpdateMetadata",
    "Upsert",
    "new_id",
]

Scalar = str | int | float | bool
MetadataValue = str | int | float | bool | list[Scalar]
"""A scalar, or a non-empty list of scalars of one type (chromadb 1.5's list values)."""
Metadata = dict[str, MetadataValue]
MetadataPatch = dict[str, MetadataValue | None]
Vectors = npt.NDArray[np.float32]


def new_id() -> str:
    return uuid.uuid4().hex


def _as_float32(value: Any) -> Any:
    """Coerce array-likes to a float32 array; leave anything odd to validation.

    A value beyond float32's range becomes infinity without a warning:
    validation refuses it by the row it is in.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if isinstance(value, np.ndarray):
            if value.dtype == np.float32:
                return value
            if value.dtype.kind in "fiu":
                return value.astype(np.float32)
            return value
        if isinstance(value, list | tuple):
            try:
                return np.asarray(value, dtype=np.float32)
            except (TypeError, ValueError):
                return value
    return value


class Upsert(msgspec.Struct, frozen=True, tag="upsert"):
    """Insert or replace records: ids with their vectors, documents, metadata."""

    collection: str
    ids: list[str]
    embeddings: Vectors
    documents: list[str] | None = None
    metadatas: list[Metadata] | None = None
    embedder: str | None = None
    """The name of the model that made these vectors, when the producer says (the
    receipts producer does); snapshots and mirrors record it on the collection."""

    def __post_init__(self) -> None:
        coerced = _as_float32(self.embeddings)
        if coerced is not self.embeddings:
            msgspec.structs.force_setattr(self, "embeddings", coerced)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1]) if self.embeddings.ndim == 2 else 0


class Delete(msgspec.Struct, frozen=True, tag="delete"):
    """Remove records by id; deleting an absent id is not an error."""

    collection: str
    ids: list[str]


class UpdateMetadata(msgspec.Struct, frozen=True, tag="update_metadata"):
    """Merge metadata into existing records; a ``None`` value removes the key."""

    collection: str
    ids: list[str]
    metadatas: list[MetadataPatch]


Op = Upsert | Delete | UpdateMetadata


class Delta(msgspec.Struct, frozen=True):
    """The ops one producer call appends atomically."""

    ops: list[Op]
    delta_id: str = msgspec.field(default_factory=new_id)
    producer_id: str = ""
    created_at: float = msgspec.field(default_factory=time.time)
    idempotency_key: str | None = None


class Batch(msgspec.Struct, frozen=True, tag="batch"):
    """An entry holding one or more deltas, applied in list order."""

    entry_id: str
    deltas: list[Delta]
    producer_id: str = ""
    created_at: float = 0.0

    @property
    def is_seal(self) -> bool:
        return False


class Seal(msgspec.Struct, frozen=True, tag="seal"):
    """An entry that fills a seq on purpose: a hole or a quarantined entry."""

    sealed_by: str
    reason: str
    kind: Literal["hole", "quarantine"] = "hole"
    sealed_at: float = 0.0

    @property
    def deltas(self) -> list[Delta]:
        return []

    @property
    def is_seal(self) -> bool:
        return True


Entry = Batch | Seal
