"""Every validation rule refuses bad input, names the field, and writes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from deltalog import (
    Delete,
    Delta,
    DeltaLog,
    InvalidInput,
    LogConfig,
    UpdateMetadata,
    Upsert,
    ValidationError,
)
from deltalog.entry import Batch, Seal
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import MemoryTable
from deltalog.validate import (
    MAX_IDEMPOTENCY_KEY,
    validate_collection_name,
    validate_delta,
    validate_entry,
)
from tests.builders import DIM, read_all


def vec(rows: int, dim: int = DIM, value: float = 0.5) -> np.ndarray:
    return np.full((rows, dim), value, dtype=np.float32)


def up(
    ids: list[str] | Any = None,
    embeddings: Any = None,
    *,
    collection: str = "words",
    documents: Any = None,
    metadatas: Any = None,
) -> Upsert:
    ids = ["a", "b"] if ids is None else ids
    embeddings = vec(len(ids)) if embeddings is None else embeddings
    return Upsert(
        collection=collection,
        ids=ids,
        embeddings=embeddings,
        documents=documents,
        metadatas=metadatas,
    )


def one(op: Any) -> Delta:
    return Delta(ops=[op])


def meta(value: Any, key: Any = "k") -> Delta:
    return one(up(["a"], metadatas=[{key: value}]))


def nan_at(row: int, value: float) -> np.ndarray:
    vectors = vec(3)
    vectors[row, 2] = value
    return vectors


BAD: list[tuple[str, Callable[[], Any], str]] = [
    # the delta itself
    ("not-a-delta", lambda: {"ops": []}, "delta"),
    ("no-ops", lambda: Delta(ops=[]), "ops"),
    ("ops-not-a-list", lambda: Delta(ops=up()), "ops"),  # type: ignore[arg-type]
    ("op-not-an-op", lambda: Delta(ops=["upsert"]), "ops[0]"),  # type: ignore[list-item]
    ("empty-idempotency-key", lambda: Delta(ops=[up()], idempotency_key=""), "idempotency_key"),
    (
        "long-idempotency-key",
        lambda: Delta(ops=[up()], idempotency_key="k" * (MAX_IDEMPOTENCY_KEY + 1)),
        "idempotency_key",
    ),
    ("int-idempotency-key", lambda: Delta(ops=[up()], idempotency_key=7), "idempotency_key"),  # type: ignore[arg-type]
    # ids
    ("empty-ids", lambda: one(up([], vec(0))), "ops[0].ids"),
    ("empty-delete", lambda: one(Delete(collection="words", ids=[])), "ops[0].ids"),
    ("ids-not-a-list", lambda: one(Delete(collection="words", ids="ab")), "ops[0].ids"),  # type: ignore[arg-type]
    ("empty-string-id", lambda: one(up(["a", ""])), "ops[0].ids[1]"),
    ("int-id", lambda: one(Delete(collection="words", ids=["a", 3])), "ops[0].ids[1]"),  # type: ignore[list-item]
    ("duplicate-ids", lambda: one(up(["a", "b", "a"])), "ops[0].ids"),
    ("duplicate-delete-ids", lambda: one(Delete(collection="w1s", ids=["x", "x"])), "ops[0].ids"),
    # vectors
    ("fewer-vectors", lambda: one(up(["a", "b", "c"], vec(2))), "ops[0].embeddings"),
    ("more-vectors", lambda: one(up(["a"], vec(2))), "ops[0].embeddings"),
    ("1-d-vectors", lambda: one(up(["a"], np.ones(DIM, np.float32))), "ops[0].embeddings"),
    ("3-d-vectors", lambda: one(up(["a"], np.ones((1, 2, 4), np.float32))), "ops[0].embeddings"),
    ("zero-dim", lambda: one(up(["a"], np.ones((1, 0), np.float32))), "ops[0].embeddings"),
    ("ragged-lists", lambda: one(up(["a", "b"], [[1.0, 2.0], [3.0]])), "ops[0].embeddings"),
    ("string-vectors", lambda: one(up(["a"], [["x", "y"]])), "ops[0].embeddings"),
    ("no-vectors", lambda: one(up(["a"], "none")), "ops[0].embeddings"),
    ("nan", lambda: one(up(["a", "b", "c"], nan_at(1, float("nan")))), "ops[0].embeddings[1]"),
    ("inf", lambda: one(up(["a", "b", "c"], nan_at(2, float("inf")))), "ops[0].embeddings[2]"),
    ("-inf", lambda: one(up(["a", "b", "c"], nan_at(0, -float("inf")))), "ops[0].embeddings[0]"),
    (
        "float64-overflow",
        lambda: one(up(["a"], np.full((1, DIM), 1e39))),
        "ops[0].embeddings[0]",
    ),
    (
        "mixed-dims-in-one-delta",
        lambda: Delta(
            ops=[up(["a"], vec(1, 8)), Delete(collection="words", ids=["z"]), up(["b"], vec(1, 4))]
        ),
        "ops[2].embeddings",
    ),
    # documents
    ("fewer-documents", lambda: one(up(documents=["only one"])), "ops[0].documents"),
    ("documents-not-a-list", lambda: one(up(documents="ab")), "ops[0].documents"),
    ("non-string-document", lambda: one(up(documents=["ok", 2])), "ops[0].documents[1]"),
    # metadata
    ("fewer-metadatas", lambda: one(up(metadatas=[{"k": 1}])), "ops[0].metadatas"),
    (
        "patch-count",
        lambda: one(UpdateMetadata(collection="words", ids=["a", "b"], metadatas=[{"k": 1}])),
        "ops[0].metadatas",
    ),
    ("metadata-not-a-dict", lambda: one(up(["a"], metadatas=[["k", 1]])), "ops[0].metadatas[0]"),
    ("empty-metadata", lambda: one(up(["a"], metadatas=[{}])), "ops[0].metadatas[0]"),
    (
        "empty-patch",
        lambda: one(UpdateMetadata(collection="words", ids=["a"], metadatas=[{}])),
        "ops[0].metadatas[0]",
    ),
    ("nested-dict", lambda: meta({"inner": 1}), "ops[0].metadatas[0]['k']"),
    ("mixed-list", lambda: meta([1, "2"]), "ops[0].metadatas[0]['k']"),
    ("empty-list", lambda: meta([]), "ops[0].metadatas[0]['k']"),
    ("bool-int-list", lambda: meta([True, 1]), "ops[0].metadatas[0]['k']"),
    ("nested-list", lambda: meta([[1]]), "ops[0].metadatas[0]['k']"),
    ("nan-in-list", lambda: meta([1.0, float("nan")]), "ops[0].metadatas[0]['k'][1]"),
    ("tuple-value", lambda: meta((1, 2)), "ops[0].metadatas[0]['k']"),
    ("bytes-value", lambda: meta(b"raw"), "ops[0].metadatas[0]['k']"),
    ("none-in-upsert", lambda: meta(None), "ops[0].metadatas[0]['k']"),
    ("numpy-int", lambda: meta(np.int64(3)), "ops[0].metadatas[0]['k']"),
    ("nan-value", lambda: meta(float("nan")), "ops[0].metadatas[0]['k']"),
    ("int-too-big", lambda: meta(2**63), "ops[0].metadatas[0]['k']"),
    ("int-key", lambda: meta("v", key=1), "ops[0].metadatas[0]"),
    ("empty-key", lambda: meta("v", key=""), "ops[0].metadatas[0]"),
    ("reserved-hash-key", lambda: meta("v", key="#document"), "ops[0].metadatas[0]"),
    ("reserved-chroma-key", lambda: meta("v", key="chroma:document"), "ops[0].metadatas[0]"),
    (
        "nested-in-patch",
        lambda: one(UpdateMetadata(collection="words", ids=["a"], metadatas=[{"k": {"x": 1}}])),  # type: ignore[dict-item]
        "ops[0].metadatas[0]['k']",
    ),
    (
        "second-op-bad",
        lambda: Delta(ops=[up(["a"]), up(["b"], metadatas=[{"k": [1, "x"]}])]),
        "ops[1].metadatas[0]['k']",
    ),
]

BAD_COLLECTIONS = [
    "",
    "ab",
    "a b c",
    "bad/name",
    "ünïcode",
    "a..b",
    "-abc",
    "abc-",
    ".abc",
    "abc_",
    "192.168.0.1",
    "x" * 513,
]
GOOD_COLLECTIONS = ["abc", "words", "a.b-c_d", "1.2.3", "A" * 512, "256.1.1.1"]


@pytest.mark.parametrize(("make", "field"), [(m, f) for _, m, f in BAD], ids=[n for n, _, _ in BAD])
async def test_bad_delta_is_refused_naming_the_field(
    memory_log: DeltaLog, make: Callable[[], Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        await memory_log.append(make())
    assert caught.value.field == field, caught.value
    assert caught.value.log == memory_log.config.log
    assert str(caught.value).startswith(f"{field}: ")
    await _assert_nothing_written(memory_log)


@pytest.mark.parametrize("name", BAD_COLLECTIONS)
async def test_bad_collection_name_is_refused(memory_log: DeltaLog, name: str) -> None:
    for op in (up(["a"], collection=name), Delete(collection=name, ids=["a"])):
        with pytest.raises(ValidationError, match="invalid collection name") as caught:
            await memory_log.append(Delta(ops=[Delete(collection="words", ids=["x"]), op]))
        assert caught.value.field == "ops[1].collection"
    await _assert_nothing_written(memory_log)


@pytest.mark.parametrize("name", GOOD_COLLECTIONS)
def test_good_collection_names_pass(name: str) -> None:
    assert validate_collection_name(name) == name


def test_valid_deltas_pass_and_report_their_dims() -> None:
    delta = Delta(
        ops=[
            up(["a", "b"], vec(2, 8), documents=["x", "y"], metadatas=[{"k": 1}, {"k": True}]),
            up(["c"], vec(1, 3), collection="lines"),
            up(["a"], vec(1, 8), metadatas=[{"f": 0.5, "s": "", "i": -(2**63)}]),
            Delete(collection="other", ids=["a"]),
            UpdateMetadata(collection="words", ids=["a"], metadatas=[{"gone": None, "k": 2}]),
        ],
        idempotency_key="k" * MAX_IDEMPOTENCY_KEY,
    )
    assert validate_delta(delta) == {"words": 8, "lines": 3}


@pytest.mark.parametrize(("make", "field"), [(m, f) for _, m, f in BAD], ids=[n for n, _, _ in BAD])
def test_a_stored_entry_is_held_to_every_rule(make: Callable[[], Any], field: str) -> None:
    """What the reader refuses as a malformed entry: each rule, in any delta of it."""
    good = one(up(["a"]))
    with pytest.raises(ValidationError) as caught:
        validate_entry(Batch("e", [good, make()]))
    assert caught.value.field == f"deltas[1].{field}", caught.value
    assert validate_entry(Batch("e", [good, good])) == {"words": DIM}
    assert validate_entry(Seal(sealed_by="me", reason="hole")) == {}


def test_the_deltas_of_a_stored_entry_agree_on_dimensions() -> None:
    entry = Batch("e", [one(up(["a"], vec(1, 8))), one(up(["b"], vec(1, 4)))])
    with pytest.raises(ValidationError, match="dimension 4 for collection 'words' differs from 8"):
        validate_entry(entry)


def test_validation_error_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        validate_delta(Delta(ops=[]))


async def test_oversized_delta_is_refused() -> None:
    config = LogConfig(bucket="memory", table="memory", log="small", max_delta_bytes=2000)
    async with DeltaLog.open(config, store=MemoryStore(), table=MemoryTable()) as log:
        assert await log.append(Delta(ops=[up(["a"], vec(1, 8))])) == 1
        big = Delta(ops=[up([f"id{i}" for i in range(100)], vec(100, 8))])
        with pytest.raises(ValidationError, match="max_delta_bytes") as caught:
            await log.append(big)
        assert caught.value.field == "delta"
        assert await log.head() == 1
        assert len(await read_all(log)) == 1


async def test_oversized_delta_does_not_fix_a_collections_dim() -> None:
    config = LogConfig(bucket="memory", table="memory", log="small", max_delta_bytes=2000)
    async with DeltaLog.open(config, store=MemoryStore(), table=MemoryTable()) as log:
        with pytest.raises(ValidationError, match="max_delta_bytes"):
            await log.append(Delta(ops=[up([f"id{i}" for i in range(100)], vec(100, 8))]))
        assert await log.table.read_dims(log.keys.log_id) == {}
        assert await log.append(Delta(ops=[up(["a"], vec(1, 4))])) == 1


async def test_another_dim_for_a_collection_is_refused_log_wide(log: DeltaLog) -> None:
    assert await log.append(Delta(ops=[up(["a"], vec(1, 8))])) == 1
    with pytest.raises(ValidationError, match="8-dimensional") as caught:
        await log.append(Delta(ops=[up(["b"], vec(1, 4))]))
    assert caught.value.field == "collection 'words'"
    # A new handle knows nothing locally: the dim comes from the table.
    async with DeltaLog.open(log.config) as fresh:
        with pytest.raises(ValidationError, match="8-dimensional"):
            await fresh.append(Delta(ops=[up(["b"], vec(1, 16))]))
        assert await fresh.append(Delta(ops=[up(["b"], vec(1, 4), collection="other")])) == 2
    assert await log.head() == 2
    assert [seq for seq, _ in await read_all(log)] == [1, 2]


async def test_a_refused_delta_fixes_no_dim(memory_log: DeltaLog) -> None:
    """A delta refused for one collection leaves the others' dims free."""
    await memory_log.append(Delta(ops=[up(["a"], vec(1, 8))]))
    mixed = Delta(ops=[up(["x"], vec(1, 3), collection="fresh"), up(["y"], vec(1, 5))])
    with pytest.raises(ValidationError, match="8-dimensional"):
        await memory_log.append(mixed)
    assert await memory_log.table.read_dims(memory_log.keys.log_id) == {"words": 8}
    assert await memory_log.append(Delta(ops=[up(["x"], vec(1, 6), collection="fresh")])) == 2


async def test_refused_delta_through_moto_writes_nothing(log: DeltaLog) -> None:
    with pytest.raises(ValidationError) as caught:
        await log.append(Delta(ops=[up(["a", "a"])]))
    assert caught.value.field == "ops[0].ids"
    await _assert_nothing_written(log)


async def _assert_nothing_written(log: DeltaLog) -> None:
    assert await log.head() == 0
    assert await read_all(log) == []
    status = await log.status()
    assert (status.head, status.entries, status.hole_count) == (0, 0, 0)
