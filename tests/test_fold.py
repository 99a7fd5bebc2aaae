"""The fold against the test oracle (``tests.oracle``, op by op from the README's
rules): examples of each rule, then properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from deltalog.codec import Frame, batch_body, decode_entry, encode_delta
from deltalog.entry import (
    Batch,
    Delete,
    Delta,
    Entry,
    Metadata,
    MetadataPatch,
    Op,
    Seal,
    UpdateMetadata,
    Upsert,
)
from deltalog.errors import CorruptEntry, InvalidInput
from deltalog.fold import (
    Folder,
    FoldPlan,
    Record,
    State,
    apply_to_state,
    fold,
    reference_state,
    state_differences,
)
from tests import strategies
from tests.conftest import examples
from tests.oracle import oracle_state

PROPERTY = settings(max_examples=examples(100), deadline=None)
ANY = strategies.ANY_FLOATS


def vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def upsert(ids: list[str], *, meta: Metadata | None = None, doc: str | None = None) -> Upsert:
    rows = np.arange(len(ids) * 2, dtype=np.float32).reshape(len(ids), 2)
    return Upsert(
        collection="words",
        ids=ids,
        embeddings=rows,
        documents=None if doc is None else [doc] * len(ids),
        metadatas=None if meta is None else [dict(meta) for _ in ids],
    )


def patch(ids: list[str], values: MetadataPatch) -> UpdateMetadata:
    return UpdateMetadata(collection="words", ids=ids, metadatas=[dict(values) for _ in ids])


def delete(ids: list[str]) -> Delete:
    return Delete(collection="words", ids=ids)


def entries(*ops: Op) -> list[tuple[int, Entry]]:
    """One entry per op, at seqs 1, 2, ..."""
    return [(seq, Batch("e", [Delta([op])])) for seq, op in enumerate(ops, start=1)]


def folded(*ops: Op, initial: State | None = None) -> State:
    """Apply the fold of ``ops`` to a copy of ``initial``, checking it against the oracle."""
    log = entries(*ops)
    state = {name: dict(records) for name, records in (initial or {}).items()}
    apply_to_state(state, fold(log))
    assert state_differences(oracle_state(log, initial), state) == []
    return state


def test_upsert_then_delete_is_a_delete() -> None:
    plan = fold(entries(upsert(["a"]), delete(["a"])))
    words = plan.collections["words"]
    assert (words.puts, words.deletes, words.patches) == ({}, {"a"}, {})


def test_delete_then_upsert_is_a_put_of_the_whole_record() -> None:
    plan = fold(entries(upsert(["a"], meta={"k": 1}, doc="old"), delete(["a"]), upsert(["a"])))
    words = plan.collections["words"]
    assert words.deletes == set()
    assert words.puts["a"].metadata is None and words.puts["a"].document is None


def test_upsert_replaces_metadata_and_document_wholesale() -> None:
    before = folded(upsert(["a"], meta={"k": 1, "j": 2}, doc="old"))
    after = folded(upsert(["a"], meta={"z": True}), initial=before)
    assert after["words"]["a"].metadata == {"z": True}
    assert after["words"]["a"].document is None


def test_upsert_then_patch_is_a_put_with_merged_metadata() -> None:
    plan = fold(entries(upsert(["a"], meta={"k": 1, "j": 2}), patch(["a"], {"k": None, "n": "x"})))
    words = plan.collections["words"]
    assert words.patches == {}
    assert words.puts["a"].metadata == {"j": 2, "n": "x"}


def test_patch_then_patch_merges_and_keeps_removals() -> None:
    plan = fold(entries(patch(["a"], {"k": 1, "j": None}), patch(["a"], {"k": None, "n": 2})))
    assert plan.collections["words"].patches == {"a": {"k": None, "j": None, "n": 2}}


def test_patch_then_delete_is_a_delete() -> None:
    plan = fold(entries(patch(["a"], {"k": 1}), delete(["a"])))
    words = plan.collections["words"]
    assert (words.patches, words.deletes) == ({}, {"a"})


def test_patch_after_delete_does_nothing() -> None:
    plan = fold(entries(delete(["a"]), patch(["a"], {"k": 1})))
    words = plan.collections["words"]
    assert (words.patches, words.deletes) == ({}, {"a"})


def test_patch_of_an_absent_id_does_nothing() -> None:
    state = folded(upsert(["a"], meta={"k": 1}), patch(["b"], {"k": 2}))
    assert list(state["words"]) == ["a"]


def test_patch_that_removes_every_key_leaves_no_metadata() -> None:
    before = folded(upsert(["a", "b"], meta={"k": 1}))
    after = folded(patch(["a"], {"k": None}), initial=before)
    assert after["words"]["a"].metadata is None
    assert (
        folded(upsert(["a"], meta={"k": 1}), patch(["a"], {"k": None}))["words"]["a"].metadata
        is None
    )


def test_patch_keeps_vector_and_document() -> None:
    before = folded(upsert(["a"], meta={"k": 1}, doc="text"))
    after = folded(patch(["a"], {"k": 2}), initial=before)
    assert after["words"]["a"] == Record("a", vec(0, 1), "text", {"k": 2})


def test_ops_within_a_delta_and_deltas_within_an_entry_apply_in_order() -> None:
    entry = Batch("e", [Delta([upsert(["a"]), delete(["a"])]), Delta([upsert(["b"])])])
    plan = fold([(1, entry)])
    assert set(plan.collections["words"].puts) == {"b"}
    assert plan.collections["words"].deletes == {"a"}


def test_seal_changes_nothing_but_counts() -> None:
    folder = Folder()
    folder.add(1, Seal(sealed_by="me", reason="hole"))
    plan = folder.plan()
    assert plan == FoldPlan({}, 1, 1, 1)
    assert plan.is_empty
    assert (folder.statistics().seals, folder.entries) == (1, 1)


def test_plan_counts() -> None:
    plan = fold(entries(upsert(["a", "b", "c"]), delete(["c", "d"]), patch(["e"], {"k": 1})))
    assert (plan.vectors_upserted, plan.ids_deleted, plan.ids_patched) == (2, 2, 1)
    assert (plan.first_seq, plan.last_seq, plan.entries) == (1, 3, 3)


def test_entries_must_arrive_in_increasing_seq() -> None:
    folder = Folder(log="receipts")
    folder.add(5, Seal(sealed_by="me", reason="hole"))
    with pytest.raises(InvalidInput, match=r"got 5 after 5.*log=receipts, seq=5"):
        folder.add(5, Seal(sealed_by="me", reason="hole"))


def test_an_op_with_mismatched_lengths_is_corrupt() -> None:
    bad = Upsert(collection="words", ids=["a", "b"], embeddings=np.zeros((1, 2), np.float32))
    with pytest.raises(CorruptEntry, match=r"2 ids but 1 embeddings.*log=receipts, seq=7"):
        fold([(7, Batch("e", [Delta([bad])]))], log="receipts")


def test_a_bad_op_leaves_nothing_of_its_entry_folded() -> None:
    folder = Folder(log="receipts")
    folder.add(1, entries(upsert(["a"]))[0][1])
    before, counted = folder.plan(), folder.statistics()
    bad = Upsert(collection="words", ids=["x", "y"], embeddings=np.zeros((1, 2), np.float32))
    entry = Batch("e", [Delta([upsert(["b"]), delete(["a"])]), Delta([bad])])
    with pytest.raises(CorruptEntry, match=r"2 ids but 1 embeddings.*seq=2"):
        folder.add(2, entry)
    assert folder.plan() == before and folder.statistics() == counted
    folder.add(2, Seal(sealed_by="quarantine", reason="bad", kind="quarantine"))  # passed over
    assert set(folder.plan().collections["words"].puts) == {"a"}


def test_plan_is_a_copy_and_reset_starts_a_new_chunk() -> None:
    folder = Folder()
    folder.add(1, entries(upsert(["a"]))[0][1])
    first = folder.plan()
    folder.add(2, entries(delete(["a"]))[0][1])
    assert set(first.collections["words"].puts) == {"a"}
    folder.reset()
    folder.add(3, entries(upsert(["b"]))[0][1])
    second = folder.plan()
    assert (second.first_seq, second.last_seq, second.entries) == (3, 3, 1)
    assert set(second.collections["words"].puts) == {"b"}
    stats = folder.statistics()
    assert (stats.entries, stats.vectors, stats.deletes, stats.last_seq) == (3, 2, 1, 3)
    with pytest.raises(InvalidInput):
        folder.add(2, Seal(sealed_by="me", reason="hole"))


def test_record_equality_is_exact() -> None:
    base = Record("a", vec(0.0, 1.0), "d", {"k": 1})
    assert base == Record("a", vec(0.0, 1.0), "d", {"k": 1})
    assert base != Record("a", vec(-0.0, 1.0), "d", {"k": 1})
    assert base != Record("a", vec(0.0, 1.0), "d", {"k": True})
    assert base != Record("a", vec(0.0, 1.0), "d", {"k": 1.0})
    assert base != Record("a", vec(0.0, 1.0), None, {"k": 1})
    assert base != Record("b", vec(0.0, 1.0), "d", {"k": 1})


def test_state_differences_names_each_difference() -> None:
    expected: State = {"words": {"a": Record("a", vec(1)), "b": Record("b", vec(2), "x")}}
    actual: State = {
        "words": {"b": Record("b", vec(3), "y"), "c": Record("c", vec(1))},
        "lines": {},
    }
    assert state_differences(expected, actual) == [
        "lines: collection only in actual",
        "words/a: missing",
        "words/b: vector",
        "words/b: document 'x' != 'y'",
        "words/c: unexpected",
    ]


def test_fold_of_decoded_entries_equals_fold_of_originals(rng: np.random.Generator) -> None:
    ops: list[Op] = [
        Upsert("words", ["a", "b"], rng.standard_normal((2, 4), dtype=np.float32)),
        patch(["a"], {"k": 1}),
    ]
    delta = Delta(ops)
    stored = Frame(batch_body("e", [encode_delta(delta)], created_at=0.0)).at(1)
    decoded = decode_entry(stored, seq=1)
    assert fold([(1, decoded)]).collections == fold([(1, Batch("e", [delta]))]).collections


@PROPERTY
@given(before=strategies.logs(floats=ANY), log=strategies.logs(floats=ANY))
def test_fold_applied_equals_op_by_op(
    before: list[tuple[int, Entry]], log: list[tuple[int, Entry]]
) -> None:
    initial = oracle_state(before)
    state = {name: dict(records) for name, records in initial.items()}
    plan = fold(log)
    assert_disjoint(plan)
    apply_to_state(state, plan)
    assert state_differences(oracle_state(log, initial), state) == []
    assert state == oracle_state(log, initial)


@PROPERTY
@given(before=strategies.logs(floats=ANY), log=strategies.logs(floats=ANY))
def test_reference_state_equals_the_oracle(
    before: list[tuple[int, Entry]], log: list[tuple[int, Entry]]
) -> None:
    """``reference_state`` stays in the library for the soak's check; it must agree."""
    initial = oracle_state(before)
    assert state_differences(oracle_state(log, initial), reference_state(log, initial)) == []


def assert_disjoint(plan: FoldPlan) -> None:
    for changes in plan.collections.values():
        assert not changes.deletes & changes.puts.keys()
        assert not changes.deletes & changes.patches.keys()
        assert not changes.puts.keys() & changes.patches.keys()
        assert all(record.id == id_ for id_, record in changes.puts.items())
        assert all(changes.patches.values())
        assert all(record.metadata != {} for record in changes.puts.values())


@PROPERTY
@given(chunks=strategies.split_logs(floats=ANY))
def test_folding_in_chunks_equals_folding_at_once(chunks: list[list[tuple[int, Entry]]]) -> None:
    whole: State = {}
    apply_to_state(whole, fold(e for chunk in chunks for e in chunk))
    piecewise: State = {}
    folder = Folder()
    for chunk in chunks:
        for seq, entry in chunk:
            folder.add(seq, entry)
        apply_to_state(piecewise, folder.plan())
        folder.reset()
    assert state_differences(whole, piecewise) == []
