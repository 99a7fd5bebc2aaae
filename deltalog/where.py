"""Chroma's metadata filters (``where``), evaluated in Python.

Fresh reads filter the tail overlay with the same ``where`` that Chroma
applies to the snapshot, so both sides must agree. The semantics follow
ChromaDB 1.5, checked against it:

- ``{"k": v}`` is ``{"k": {"$eq": v}}``; a dict with several keys is their
  ``$and``; ``$and`` / ``$or`` take a list of filters.
- Operators: ``$eq``, ``$ne``, ``$gt``, ``$gte``, ``$lt``, ``$lte``, ``$in``,
  ``$nin``.
- Equality is typed: ``True`` never equals ``1``, while ``1 == 1.0``.
- Order comparisons apply to numbers (not bools); anything else fails.
- An **integer** value compared with a **float** operand sees the operand
  truncated toward zero (saturating at the 64-bit range), as Chroma's
  engine casts it: ``{"k": {"$eq": 1.5}}`` matches ``k = 1``, and
  ``{"k": {"$gt": -1.5}}`` does not match ``k = -1``. A float value compares
  with any number as a float.
- Operands are finite, and the values of one ``$in`` / ``$nin`` list share
  one type: Chroma refuses anything else, so ``normalize_where`` does too.
- A record without the key fails every operator except ``$ne``, ``$nin``
  and ``$not_contains``, which it passes.
- **List values** (chromadb 1.5): ``$contains`` / ``$not_contains`` test
  whether a list holds the operand, typed (``1`` is in ``[1, 2]``, not in
  ``[1.0, 2.0]``; ``True`` is not ``1``); a scalar value never contains
  anything. Every other operator sees a list as a value equal to no
  operand: ``$eq``, ``$in`` and the order comparisons fail, ``$ne`` and
  ``$nin`` pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from deltalog.errors import InvalidInput

__all__ = ["Where", "matches", "normalize_where"]

Where = Mapping[str, Any]

_COMPARE = {
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
}
_CONTAINS = {"$contains", "$not_contains"}
_OPERATORS = {"$eq", "$ne", "$in", "$nin", *_COMPARE, *_CONTAINS}
_PASSED_BY_LISTS = {"$ne", "$nin", "$not_contains"}
_SCALARS = (str, int, float, bool)
_INT64 = (-(2**63), 2**63 - 1)


def normalize_where(where: Where | None) -> dict[str, Any] | None:
    """A checked copy in Chroma's strict form (one key per dict); InvalidInput if malformed."""
    if where is None:
        return None
    if not isinstance(where, Mapping) or not where:
        raise InvalidInput(f"where must be a non-empty dict, got {where!r}")
    if len(where) > 1:
        return {"$and": [normalize_where({k: v}) for k, v in where.items()]}
    ((key, value),) = where.items()
    if key in ("$and", "$or"):
        if not isinstance(value, Sequence) or isinstance(value, str) or not value:
            raise InvalidInput(f"{key} takes a non-empty list of filters, got {value!r}")
        parts = [normalize_where(part) for part in value]
        return parts[0] if len(parts) == 1 else {key: parts}
    if key.startswith("$"):
        raise InvalidInput(f"unknown logical operator {key!r} in where")
    return {key: _normalize_condition(key, value)}


def _normalize_condition(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, _SCALARS):
        return {"$eq": value}
    if not isinstance(value, Mapping) or len(value) != 1:
        raise InvalidInput(f"where[{key!r}] must be a value or one {{operator: value}}")
    ((op, operand),) = value.items()
    if op not in _OPERATORS:
        raise InvalidInput(f"unknown operator {op!r} in where[{key!r}]")
    if op in ("$in", "$nin"):
        if not isinstance(operand, Sequence) or isinstance(operand, str) or not operand:
            raise InvalidInput(f"{op} in where[{key!r}] takes a non-empty list")
        if not all(isinstance(v, _SCALARS) for v in operand):
            raise InvalidInput(f"{op} in where[{key!r}] takes str, int, float or bool values")
        if len({type(v) for v in operand}) > 1:
            raise InvalidInput(f"the values of {op} in where[{key!r}] must all be of one type")
    elif not isinstance(operand, _SCALARS):
        raise InvalidInput(f"{op} in where[{key!r}] takes a str, int, float or bool")
    values = operand if op in ("$in", "$nin") else [operand]
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        raise InvalidInput(f"{op} in where[{key!r}] takes finite numbers")
    return {op: operand}


def matches(where: Where | None, metadata: Mapping[str, Any] | None) -> bool:
    """Whether a record's metadata passes a normalized ``where``."""
    if where is None:
        return True
    ((key, value),) = where.items()
    if key == "$and":
        return all(matches(part, metadata) for part in value)
    if key == "$or":
        return any(matches(part, metadata) for part in value)
    ((op, operand),) = value.items()
    if metadata is None or key not in metadata:
        return op in _PASSED_BY_LISTS
    return _test(op, metadata[key], operand)


def _test(op: str, actual: Any, operand: Any) -> bool:
    if op in _CONTAINS:
        held = isinstance(actual, list) and any(_same(item, operand) for item in actual)
        return held == (op == "$contains")
    if isinstance(actual, list):
        return op in _PASSED_BY_LISTS
    if op in ("$in", "$nin"):
        operand = [_cast(actual, v) for v in operand]
    else:
        operand = _cast(actual, operand)
    if op == "$eq":
        return _equal(actual, operand)
    if op == "$ne":
        return not _equal(actual, operand)
    if op == "$in":
        return any(_equal(actual, v) for v in operand)
    if op == "$nin":
        return not any(_equal(actual, v) for v in operand)
    if _number(actual) and _number(operand):
        return bool(_COMPARE[op](actual, operand))
    return False


def _cast(actual: Any, operand: Any) -> Any:
    """The operand as Chroma compares it with ``actual``: a float against an int is truncated."""
    if isinstance(actual, int) and not isinstance(actual, bool) and isinstance(operand, float):
        return min(max(math.trunc(operand), _INT64[0]), _INT64[1])
    return operand


def _same(a: Any, b: Any) -> bool:
    """Equal and of one type: a list item as Chroma's ``$contains`` compares it."""
    return type(a) is type(b) and bool(a == b)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    return bool(a == b)
