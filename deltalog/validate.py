"""The rules a delta must meet before it may enter the log.

A delta that could never be applied must be refused at append time, never
discovered by the compactor. Each rule raises ``ValidationError`` naming the
field (``ops[2].metadatas[7]['price']``) and what to do about it.

The rules: at least one op; collection names Chroma accepts; ids non-empty,
unique within an op; one vector per id, 2-D float32, finite, one dimension
per collection; documents and metadatas one per id; metadata flat, with
string keys and str, int, float or bool values, or non-empty lists of one of
those types (``None`` only in ``UpdateMetadata``, where it removes a key).

``validate_entry`` holds an entry read back from the log to the same rules
(the reader refuses a stored entry that breaks one as ``CorruptEntry``).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deltalog.entry import Delete, Delta, Entry, Op, UpdateMetadata, Upsert
from deltalog.errors import ValidationError

__all__ = [
    "MAX_IDEMPOTENCY_KEY",
    "validate_collection_name",
    "validate_delta",
    "validate_entry",
    "validate_metadata",
]

MAX_IDEMPOTENCY_KEY = 512
MAX_EMBEDDER_NAME = 256
_INT64 = (-(2**63), 2**63 - 1)
_COLLECTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,510}[A-Za-z0-9]$")
_RESERVED_KEY_PREFIXES = ("#", "chroma:")
_PLAIN = (str, bool)
"""Metadata value types valid whatever their value."""


def validate_delta(delta: Delta) -> dict[str, int]:
    """Check every rule; return the embedding dimension of each collection."""
    if not isinstance(delta, Delta):
        raise ValidationError("delta", f"expected a Delta, got {type(delta).__name__}")
    _check_idempotency_key(delta.idempotency_key)
    if not isinstance(delta.ops, list) or not delta.ops:
        raise ValidationError("ops", "a delta needs at least one op")
    dims: dict[str, int] = {}
    for i, op in enumerate(delta.ops):
        where = f"ops[{i}]"
        _check_op(where, op)
        if isinstance(op, Upsert):
            known = dims.setdefault(op.collection, op.dim)
            if known != op.dim:
                raise ValidationError(
                    f"{where}.embeddings",
                    f"dimension {op.dim} differs from {known} used for collection "
                    f"{op.collection!r} earlier in this delta",
                )
    return dims


def validate_entry(entry: Entry) -> dict[str, int]:
    """Check every delta of a stored entry by the same rules; return each collection's dim.

    An entry read back from the log must meet the rules its deltas met at
    append time: one that does not was written by something else (or went
    bad) and must be refused whole, before any of it is applied. The deltas
    of one entry must also agree on each collection's dimension.
    """
    dims: dict[str, int] = {}
    for i, delta in enumerate(entry.deltas):
        try:
            found = validate_delta(delta)
        except ValidationError as exc:
            raise ValidationError(f"deltas[{i}].{exc.field}", exc.reason) from None
        for collection, dim in found.items():
            if dims.setdefault(collection, dim) != dim:
                raise ValidationError(
                    f"deltas[{i}]",
                    f"dimension {dim} for collection {collection!r} differs from "
                    f"{dims[collection]} earlier in this entry",
                )
    return dims


def validate_collection_name(name: object, where: str = "collection") -> str:
    if not isinstance(name, str) or not _COLLECTION.match(name) or ".." in name:
        raise ValidationError(
            where,
            f"invalid collection name {name!r}: use 3-512 characters from [a-zA-Z0-9._-], "
            "starting and ending with a letter or digit, without '..'",
        )
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return name
    raise ValidationError(where, f"invalid collection name {name!r}: it is an IPv4 address")


def validate_metadata(meta: object, where: str = "metadata") -> None:
    """One record's metadata, by the rules of an ``Upsert``'s (for importers that check
    records before they build deltas)."""
    if not isinstance(meta, Mapping) or not meta:
        raise ValidationError(where, "expected a non-empty dict of metadata")
    try:
        _check_metadata(where, 0, meta, patch=False)
    except ValidationError as exc:  # name the key, not a position in an op
        raise ValidationError(exc.field.replace(f"{where}[0]", where, 1), exc.reason) from None


def _check_idempotency_key(key: object) -> None:
    if key is None:
        return
    if not isinstance(key, str) or not key or len(key) > MAX_IDEMPOTENCY_KEY:
        raise ValidationError(
            "idempotency_key", f"must be a non-empty string of at most {MAX_IDEMPOTENCY_KEY} chars"
        )


def _check_op(where: str, op: Op) -> None:
    if not isinstance(op, Upsert | Delete | UpdateMetadata):
        raise ValidationError(
            where, f"expected Upsert, Delete or UpdateMetadata, got {type(op).__name__}"
        )
    validate_collection_name(op.collection, f"{where}.collection")
    _check_ids(f"{where}.ids", op.ids)
    if isinstance(op, Upsert):
        _check_embeddings(f"{where}.embeddings", op.embeddings, len(op.ids))
        _check_embedder(f"{where}.embedder", op.embedder)
        if op.documents is not None:
            _check_documents(f"{where}.documents", op.documents, len(op.ids))
        if op.metadatas is not None:
            _check_metadatas(f"{where}.metadatas", op.metadatas, len(op.ids), patch=False)
    elif isinstance(op, UpdateMetadata):
        _check_metadatas(f"{where}.metadatas", op.metadatas, len(op.ids), patch=True)


def _check_ids(where: str, ids: object) -> None:
    if not isinstance(ids, list) or not ids:
        raise ValidationError(where, "expected a non-empty list of ids")
    for j, id_ in enumerate(ids):
        if not isinstance(id_, str) or not id_:
            raise ValidationError(f"{where}[{j}]", f"ids must be non-empty strings, got {id_!r}")
    if len(set(ids)) != len(ids):
        dup = next(i for n, i in enumerate(ids) if i in ids[:n])
        raise ValidationError(where, f"duplicate id {dup!r} within one op")


def _check_embeddings(where: str, vectors: object, count: int) -> None:
    if not isinstance(vectors, np.ndarray) or vectors.dtype != np.float32:
        raise ValidationError(
            where, "expected a 2-D float32 numpy array (or a list of equal-length float lists)"
        )
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValidationError(where, f"expected shape (n, dim) with dim >= 1, got {vectors.shape}")
    if vectors.shape[0] != count:
        raise ValidationError(where, f"{vectors.shape[0]} vectors for {count} ids")
    if not np.isfinite(vectors).all():
        row = int(np.argwhere(~np.isfinite(vectors))[0][0])
        raise ValidationError(
            f"{where}[{row}]", "vector holds NaN or infinity (or a value beyond float32's range)"
        )


def _check_embedder(where: str, embedder: object) -> None:
    if embedder is None:
        return
    if not isinstance(embedder, str) or not embedder or len(embedder) > MAX_EMBEDDER_NAME:
        raise ValidationError(
            where,
            f"the embedder's name must be a non-empty string of at most "
            f"{MAX_EMBEDDER_NAME} characters, got {embedder!r}",
        )


def _check_documents(where: str, documents: object, count: int) -> None:
    if not isinstance(documents, list) or len(documents) != count:
        raise ValidationError(where, f"expected a list of {count} documents, one per id")
    for j, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise ValidationError(f"{where}[{j}]", f"documents must be strings, got {doc!r}")


def _check_metadatas(where: str, metadatas: object, count: int, *, patch: bool) -> None:
    if not isinstance(metadatas, list) or len(metadatas) != count:
        raise ValidationError(where, f"expected a list of {count} metadata dicts, one per id")
    for j, meta in enumerate(metadatas):
        _check_metadata(where, j, meta, patch=patch)


def _check_metadata(where: str, j: int, meta: object, *, patch: bool) -> None:
    """One metadata dict; ``where`` and ``j`` name it, formatted only for an error.

    This runs for every value of every record appended (about 1,500 per
    receipt), so the values that are plainly valid are accepted inline and
    everything else goes to ``_check_value``, which has the last word.
    """
    if not isinstance(meta, Mapping) or not meta:
        raise ValidationError(f"{where}[{j}]", "expected a non-empty dict of metadata")
    for key, value in meta.items():
        if not isinstance(key, str) or not key or key.startswith(_RESERVED_KEY_PREFIXES):
            raise ValidationError(
                f"{where}[{j}]",
                f"metadata key {key!r} must be a non-empty string not starting with '#'",
            )
        if (
            isinstance(value, _PLAIN)
            or (isinstance(value, float) and math.isfinite(value))
            or (type(value) is int and _INT64[0] <= value <= _INT64[1])
        ):
            continue
        _check_value(f"{where}[{j}][{key!r}]", value, patch=patch)


def _check_value(where: str, value: Any, *, patch: bool) -> None:
    if value is None:
        if not patch:
            raise ValidationError(where, "None is only allowed in UpdateMetadata (removes the key)")
        return
    if isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise ValidationError(where, "integer out of the 64-bit range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(where, "float must be finite")
        return
    if isinstance(value, list):
        _check_list(where, value)
        return
    kind = "a tuple or other sequence" if isinstance(value, Sequence) else type(value).__name__
    raise ValidationError(
        where, f"metadata values must be str, int, float, bool or a list of them, not {kind}"
    )


def _check_list(where: str, values: list[Any]) -> None:
    """A list value as Chroma takes one: non-empty, of one scalar type (bool is not int)."""
    if not values:
        raise ValidationError(where, "a list value must not be empty")
    kinds = {bool if isinstance(v, bool) else type(v) for v in values}
    if len(kinds) > 1 or not kinds <= {str, int, float, bool}:
        names = ", ".join(sorted(k.__name__ for k in kinds))
        raise ValidationError(
            where, f"a list value holds str, int, float or bool items, all of one type, not {names}"
        )
    for i, item in enumerate(values):
        if isinstance(item, float | int) and not isinstance(item, bool):
            _check_value(f"{where}[{i}]", item, patch=False)
