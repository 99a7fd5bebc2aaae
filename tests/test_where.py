"""``where`` filters in Python agree with ChromaDB's, checked against Chroma itself."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any

import chromadb
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from deltalog import InvalidInput
from deltalog.where import matches, normalize_where
from tests.conftest import examples

KEYS = ["k", "s", "b"]
VALUES = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([-1.5, -0.5, 0.0, 0.5, 1.0, 2.5]),
    st.booleans(),
    st.sampled_from(["x", "y"]),
)
LISTS = st.one_of(
    st.lists(st.integers(-2, 2), min_size=1, max_size=3),
    st.lists(st.sampled_from([-1.5, 0.0, 1.0, 2.5]), min_size=1, max_size=3),
    st.lists(st.booleans(), min_size=1, max_size=2),
    st.lists(st.sampled_from(["x", "y"]), min_size=1, max_size=2),
)
"""chromadb 1.5's list values: non-empty, items of one type."""
RECORDS = st.lists(
    st.dictionaries(st.sampled_from(KEYS), st.one_of(VALUES, LISTS), min_size=1, max_size=3),
    min_size=1,
    max_size=8,
)


def conditions() -> st.SearchStrategy[dict[str, Any]]:
    ops = st.sampled_from(
        ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$contains", "$not_contains"]
    )
    scalar = st.builds(lambda k, op, v: {k: {op: v}}, st.sampled_from(KEYS), ops, VALUES)
    listed = st.builds(
        lambda k, op, vs: {k: {op: vs}},
        st.sampled_from(KEYS),
        st.sampled_from(["$in", "$nin"]),
        st.lists(VALUES, min_size=1, max_size=3),
    )
    leaf = st.one_of(scalar, listed, st.builds(lambda k, v: {k: v}, st.sampled_from(KEYS), VALUES))
    return st.recursive(
        leaf,
        lambda inner: st.builds(
            lambda op, parts: {op: parts},
            st.sampled_from(["$and", "$or"]),
            st.lists(inner, min_size=2, max_size=3),
        ),
        max_leaves=4,
    )


@pytest.fixture(scope="module")
def chroma() -> Iterator[Any]:
    with tempfile.TemporaryDirectory() as path:
        client = chromadb.PersistentClient(path=path)
        yield client
        client.close()  # type: ignore[attr-defined]


def _valid_for_chroma(where: dict[str, Any]) -> bool:
    """Chroma refuses order comparisons with non-numbers; so does our normalizer's caller."""
    ((key, value),) = where.items()
    if key in ("$and", "$or"):
        return all(_valid_for_chroma(p) for p in value)
    if isinstance(value, dict):
        ((op, operand),) = value.items()
        if op in ("$gt", "$gte", "$lt", "$lte"):
            return isinstance(operand, int | float) and not isinstance(operand, bool)
        if op in ("$in", "$nin"):
            return len({type(v) for v in operand}) == 1
    return True


@settings(max_examples=examples(120), deadline=None)
@given(records=RECORDS, where=conditions())
def test_matches_agrees_with_chroma(
    chroma: Any, records: list[dict[str, Any]], where: dict[str, Any]
) -> None:
    assume(_valid_for_chroma(where))
    collection = chroma.get_or_create_collection("where-check", embedding_function=None)
    try:
        ids = [f"r{i}" for i in range(len(records))]
        collection.add(ids=ids, embeddings=np.ones((len(ids), 2), np.float32), metadatas=records)
        normalized = normalize_where(where)
        want = sorted(collection.get(where=normalized)["ids"])
        got = sorted(i for i, meta in zip(ids, records, strict=True) if matches(normalized, meta))
        assert got == want, (where, records)
    finally:
        chroma.delete_collection("where-check")


NUMBERS = [-2, -1, 0, 1, 2, -2.5, -1.5, -1.0, -0.5, 0.5, 1.0, 1.5, 2.5, 1e30, -1e30]


@pytest.mark.parametrize("op", ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin"])
def test_ints_against_float_operands_agree_with_chroma(chroma: Any, op: str) -> None:
    """Chroma truncates a float operand toward zero when the value is an int (1.5 matches 1)."""
    collection = chroma.get_or_create_collection(f"grid{op[1:]}", embedding_function=None)
    values = NUMBERS[:13]
    ids = [f"{type(v).__name__}:{v}" for v in values]
    collection.add(
        ids=ids,
        embeddings=np.ones((len(ids), 2), np.float32),
        metadatas=[{"k": v} for v in values],
    )
    try:
        for number in NUMBERS:
            where = normalize_where({"k": {op: [number] if op in ("$in", "$nin") else number}})
            want = sorted(collection.get(where=where)["ids"])
            got = sorted(i for i, v in zip(ids, values, strict=True) if matches(where, {"k": v}))
            assert got == want, (where, set(got) ^ set(want))
    finally:
        chroma.delete_collection(f"grid{op[1:]}")


@pytest.mark.parametrize("op", ["$contains", "$not_contains", "$eq", "$ne", "$in", "$gt"])
def test_list_values_against_every_kind_of_operand_agree_with_chroma(chroma: Any, op: str) -> None:
    """Lists of each type (and scalars, and a record without the key) against operands of
    each type: ``$contains`` is typed (1 is not in [1.0]), other operators never match a list."""
    collection = chroma.get_or_create_collection(f"lists{op[1:]}", embedding_function=None)
    values: list[Any] = [[1, 2], [1.0, 2.5], [0.0], [True], [False, True], ["1", "x"], 1, 1.0, "x"]
    metadatas = [{"k": v} for v in values] + [{"other": 1}]
    ids = [f"r{i}" for i in range(len(metadatas))]
    collection.add(ids=ids, embeddings=np.ones((len(ids), 2), np.float32), metadatas=metadatas)
    try:
        for operand in (1, 1.0, 2, 2.5, 0, 0.0, True, False, "1", "x"):
            argument = [operand] if op == "$in" else operand
            if op == "$gt" and isinstance(operand, bool | str):
                continue  # Chroma refuses order comparisons with those
            where = normalize_where({"k": {op: argument}})
            want = sorted(collection.get(where=where)["ids"])
            got = sorted(i for i, m in zip(ids, metadatas, strict=True) if matches(where, m))
            assert got == want, (where, set(got) ^ set(want))
    finally:
        chroma.delete_collection(f"lists{op[1:]}")


def test_several_keys_mean_and() -> None:
    assert normalize_where({"a": 1, "b": "x"}) == {"$and": [{"a": {"$eq": 1}}, {"b": {"$eq": "x"}}]}
    assert matches(normalize_where({"a": 1, "b": "x"}), {"a": 1, "b": "x"})
    assert not matches(normalize_where({"a": 1, "b": "x"}), {"a": 1})


@pytest.mark.parametrize(
    "where",
    [
        {},
        {"$and": []},
        {"$xor": [{"a": 1}]},
        {"a": {"$regex": "x"}},
        {"a": {"$in": []}},
        {"a": [1]},
        {"a": {"$gt": [1]}},
        {"a": {"$in": [1, 2.5]}},
        {"a": {"$nin": ["x", 1]}},
        {"a": {"$gt": float("inf")}},
        {"a": {"$eq": float("nan")}},
        {"a": {"$in": [1.0, float("-inf")]}},
    ],
)
def test_malformed_filters_are_refused(where: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        normalize_where(where)
