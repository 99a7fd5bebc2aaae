"""The entry format: round trips, verification, and fuzzing of stored bytes."""

from __future__ import annotations

import struct
import zlib
from typing import Any, cast

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltalog import Batch, CorruptEntry, Delete, Delta, Seal, UpdateMetadata, Upsert
from deltalog.codec import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    Frame,
    _BatchFrame,
    _encoder,
    batch_body,
    decode_entry,
    encode_delta,
    seal_body,
)
from tests.builders import assert_delta_equal, batch_of, seal_of
from tests.conftest import examples

FUZZ = settings(max_examples=examples(300), deadline=None)


def _special_vectors() -> np.ndarray:
    """Values a lossy codec would get wrong: signed zero, subnormals, extremes."""
    bits = np.array(
        [0x80000000, 0x00000001, 0x007FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800001, 0x00800000, 1],
        dtype=np.uint32,
    )
    return np.stack([bits.view(np.float32), -bits.view(np.float32)[::-1]])


def _sample_delta() -> Delta:
    return Delta(
        ops=[
            Upsert(
                collection="words",
                ids=["a", "b"],
                embeddings=_special_vectors(),
                documents=["first", "sécond ✓"],
                metadatas=[
                    {"s": "x", "i": -(2**63), "f": 1.5, "b": True},
                    {"s": "", "i": 2**63 - 1, "f": -0.0, "b": False},
                ],
            ),
            Delete(collection="lines", ids=["z"]),
            UpdateMetadata(
                collection="words", ids=["a"], metadatas=[{"label_TOTAL": True, "old": None}]
            ),
        ],
        producer_id="p-1",
        created_at=1234.5,
        idempotency_key="key-1",
    )


def _batch_bytes(deltas: list[Delta], seq: int = 7, entry_id: str = "e-1") -> bytes:
    body = batch_body(
        entry_id, [encode_delta(d) for d in deltas], producer_id="p-1", created_at=99.25
    )
    return Frame(body).at(seq)


def test_batch_round_trip_is_exact() -> None:
    deltas = [_sample_delta(), Delta(ops=[Delete(collection="words", ids=["q"])])]
    entry = batch_of(decode_entry(_batch_bytes(deltas), seq=7))
    assert (entry.entry_id, entry.producer_id, entry.created_at) == ("e-1", "p-1", 99.25)
    assert not entry.is_seal
    assert len(entry.deltas) == 2
    for got, want in zip(entry.deltas, deltas, strict=True):
        assert_delta_equal(got, want)


def test_list_values_and_the_embedder_come_back_with_their_types() -> None:
    """chromadb 1.5's list metadata: ints stay ints, floats floats, bools bools."""
    metadata: dict[str, list[Any]] = {
        "ks": [1, -(2**63)],
        "fs": [1.0, -0.0, 2.5],
        "bs": [True, False],
        "ss": ["é"],
    }
    delta = Delta(
        ops=[
            Upsert("words", ["a"], np.ones((1, 2), np.float32), None, [dict(metadata)], "model:2"),
            UpdateMetadata("words", ["a"], [{"ks": [3], "fs": None}]),
        ]
    )
    (got,) = batch_of(decode_entry(_batch_bytes([delta]), seq=7)).deltas
    upsert, update = got.ops
    assert isinstance(upsert, Upsert) and isinstance(update, UpdateMetadata)
    assert upsert.embedder == "model:2"
    assert upsert.metadatas is not None
    typed = {
        k: [(type(x), x) for x in cast("list[Any]", v)] for k, v in upsert.metadatas[0].items()
    }
    assert typed == {k: [(type(x), x) for x in v] for k, v in metadata.items()}
    assert update.metadatas == [{"ks": [3], "fs": None}]


def test_an_upsert_without_an_embedder_decodes_from_the_previous_format() -> None:
    """Entries written before ``Upsert.embedder`` existed decode with ``embedder=None``."""

    class OldUpsert(msgspec.Struct, frozen=True, tag="upsert"):
        collection: str
        ids: list[str]
        embeddings: np.ndarray
        documents: list[str] | None = None
        metadatas: list[dict[str, str | int | float | bool]] | None = None

    class OldDelta(msgspec.Struct, frozen=True):
        ops: list[OldUpsert]

    old = OldDelta([OldUpsert("words", ["a"], np.ones((1, 2), np.float32))])
    body = batch_body("e-1", [_encoder.encode(old)], producer_id="p", created_at=1.0)
    (delta,) = batch_of(decode_entry(Frame(body).at(3), seq=3)).deltas
    (op,) = delta.ops
    assert isinstance(op, Upsert) and op.embedder is None and op.ids == ["a"]


def test_vectors_come_back_bit_exact_as_float32(rng: np.random.Generator) -> None:
    raw = rng.integers(0, 2**32, size=(5, 8), dtype=np.uint32)
    raw[raw & 0x7F800000 == 0x7F800000] = 1  # no NaN/inf patterns: those are refused earlier
    delta = Delta(ops=[Upsert(collection="words", ids=list("abcde"), embeddings=raw.view("<f4"))])
    entry = batch_of(decode_entry(_batch_bytes([delta])))
    got = entry.deltas[0].ops[0]
    assert isinstance(got, Upsert)
    assert got.embeddings.dtype == np.float32 and got.embeddings.shape == (5, 8)
    assert np.array_equal(got.embeddings.view(np.uint32), raw)


def test_big_endian_float64_and_int_input_are_stored_as_little_endian_float32() -> None:
    values = np.array([[1.0, -2.0, 3.0, 0.1]])
    for given_array, want in (
        (values.astype(">f4"), values.astype(np.float32)),
        (values, values.astype(np.float32)),
        (np.array([[1, -2, 3]]), np.array([[1.0, -2.0, 3.0]], dtype=np.float32)),
    ):
        op = Upsert(collection="words", ids=["a"], embeddings=given_array)
        entry = batch_of(decode_entry(_batch_bytes([Delta(ops=[op])])))
        got = entry.deltas[0].ops[0]
        assert isinstance(got, Upsert)
        assert got.embeddings.dtype == np.dtype("<f4")
        assert got.embeddings.tobytes() == want.astype("<f4").tobytes()


def test_seal_round_trip() -> None:
    seal = Seal(sealed_by="compactor-1", reason="hole older than 60s", sealed_at=5.0)
    entry = seal_of(decode_entry(Frame(seal_body(seal)).at(3), seq=3))
    assert entry == seal
    assert entry.is_seal and entry.deltas == [] and entry.kind == "hole"
    quarantine = Seal(sealed_by="operator", reason="bad bytes", kind="quarantine")
    assert decode_entry(Frame(seal_body(quarantine)).at(4)) == quarantine


def test_batch_frame_encodes_exactly_like_batch() -> None:
    deltas = [_sample_delta(), Delta(ops=[Delete(collection="words", ids=["q"])])]
    batch = Batch(entry_id="e-9", deltas=deltas, producer_id="p-2", created_at=12.0)
    frame = _BatchFrame("e-9", [msgspec.Raw(encode_delta(d)) for d in deltas], "p-2", 12.0)
    assert _encoder.encode(frame) == _encoder.encode(batch)
    body = batch_body("e-9", [encode_delta(d) for d in deltas], producer_id="p-2", created_at=12.0)
    assert body == _encoder.encode(batch)
    decoded = batch_of(decode_entry(Frame(body).at(1)))
    for got, want in zip(decoded.deltas, deltas, strict=True):
        assert_delta_equal(got, want)


def test_frame_at_reheaders_the_same_body() -> None:
    frame = Frame(batch_body("e-1", [encode_delta(_sample_delta())], created_at=1.0))
    first, second = frame.at(1), frame.at(2)
    assert first[HEADER_SIZE:] == second[HEADER_SIZE:] == frame.body
    assert first[:HEADER_SIZE] != second[:HEADER_SIZE]
    assert batch_of(decode_entry(second, seq=2)).entry_id == "e-1"
    with pytest.raises(CorruptEntry, match="names seq 1"):
        decode_entry(first, seq=2)


def test_unknown_fields_are_ignored() -> None:
    """Old readers survive new writers: a field they do not know is skipped."""
    newer = msgspec.msgpack.encode(
        {"type": "seal", "sealed_by": "x", "reason": "r", "kind": "hole", "future": [1, 2]}
    )
    assert decode_entry(Frame(newer).at(1)) == Seal(sealed_by="x", reason="r")


# -- verification ----------------------------------------------------------


def _valid() -> bytes:
    return _batch_bytes([_sample_delta()], seq=7)


def _header(
    *, magic: bytes = MAGIC, version: int = FORMAT_VERSION, seq: int = 7, body: bytes = b"x"
) -> bytes:
    head = struct.pack("<4sBBHQII", magic, version, 0, 0, seq, len(body), zlib.crc32(body))
    return head + struct.pack("<I", zlib.crc32(head)) + body


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than its 28-byte header"),
        (_valid()[: HEADER_SIZE - 1], "shorter than its 28-byte header"),
        (_valid()[:-1], "truncated"),
        (_valid() + b"\0", "truncated"),
        (_header(magic=b"DLOG"[::-1]), "wrong magic"),
        (b"PK\x03\x04" + _valid()[4:], "wrong magic"),
        (_header(version=FORMAT_VERSION + 1), "upgrade deltalog"),
        (_header(version=0), "not supported"),
        (Frame(b"body").at(7, body_crc=zlib.crc32(b"body") ^ 1), "body checksum"),
        (_header(body=b"\xc1"), "undecodable"),
        (Frame(msgspec.msgpack.encode({"type": "nope"})).at(7), "undecodable"),
        (Frame(msgspec.msgpack.encode([1, 2])).at(7), "undecodable"),
    ],
    ids=[
        "empty",
        "short-header",
        "truncated-body",
        "extra-byte",
        "reversed-magic",
        "zip-magic",
        "future-version",
        "version-0",
        "body-crc",
        "reserved-msgpack-byte",
        "unknown-tag",
        "not-an-entry",
    ],
)
def test_bad_bytes_are_corrupt_entries(data: bytes, reason: str) -> None:
    with pytest.raises(CorruptEntry, match=reason) as caught:
        decode_entry(data, seq=7, key="root/log/entries/7")
    assert (caught.value.seq, caught.value.key) == (7, "root/log/entries/7")


def test_wrong_seq_is_a_corrupt_entry() -> None:
    with pytest.raises(CorruptEntry, match="another seq"):
        decode_entry(_valid(), seq=8)
    assert batch_of(decode_entry(_valid(), seq=7)).entry_id == "e-1"
    assert batch_of(decode_entry(_valid())).entry_id == "e-1"


@pytest.mark.parametrize("bit", range(8))
def test_every_single_bit_flip_is_detected(bit: int) -> None:
    valid = _valid()
    for offset in range(len(valid)):
        damaged = bytearray(valid)
        damaged[offset] ^= 1 << bit
        with pytest.raises(CorruptEntry):
            decode_entry(bytes(damaged), seq=7)


def test_header_flip_is_reported_as_header_damage() -> None:
    damaged = bytearray(_valid())
    damaged[10] ^= 0x10  # inside the seq field
    with pytest.raises(CorruptEntry, match="header checksum"):
        decode_entry(bytes(damaged), seq=7)
    damaged = bytearray(_valid())
    damaged[HEADER_SIZE + 3] ^= 0x01
    with pytest.raises(CorruptEntry, match="body checksum"):
        decode_entry(bytes(damaged), seq=7)


def test_bad_vector_block_is_corrupt() -> None:
    """A vector extension whose size disagrees with its shape, behind a valid checksum."""
    body = bytearray(_encoder.encode(Batch(entry_id="e", deltas=[_sample_delta()])))
    head = struct.pack("<II", 2, 8)
    at = bytes(body).index(head)
    body[at : at + 8] = struct.pack("<II", 3, 8)
    with pytest.raises(CorruptEntry, match="vector block"):
        decode_entry(Frame(bytes(body)).at(1))


# -- fuzzing ---------------------------------------------------------------


def _decodes_or_is_corrupt(data: bytes) -> None:
    """Stored bytes either decode to an entry or raise CorruptEntry, nothing else."""
    try:
        entry = decode_entry(data, seq=7, key="k")
    except CorruptEntry as exc:
        error = exc
    else:
        assert isinstance(entry, Batch | Seal)
        return
    assert (error.seq, error.key) == (7, "k")


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_are_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptEntry):
        decode_entry(data, seq=7)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bodies_behind_a_valid_header_never_escape(body: bytes) -> None:
    _decodes_or_is_corrupt(Frame(body).at(7))


@FUZZ
@given(st.data())
def test_mutated_entries_are_corrupt(data: st.DataObject) -> None:
    """Any change of up to 4 adjacent bytes is caught by a CRC-32."""
    valid = _valid()
    at = data.draw(st.integers(0, len(valid) - 1))
    size = data.draw(st.integers(1, min(4, len(valid) - at)))
    new = data.draw(st.binary(min_size=size, max_size=size))
    mutated = valid[:at] + new + valid[at + size :]
    if mutated == valid:
        return
    with pytest.raises(CorruptEntry):
        decode_entry(mutated, seq=7)


@FUZZ
@given(st.data())
def test_mutated_bodies_with_recomputed_checksums_never_escape(data: st.DataObject) -> None:
    """A writer bug, not bit rot: the checksum matches but the body is wrong."""
    body = _valid()[HEADER_SIZE:]
    edits = data.draw(
        st.lists(st.tuples(st.integers(0, len(body) - 1), st.integers(0, 255)), max_size=8)
    )
    mutated = bytearray(body)
    for at, value in edits:
        mutated[at] = value
    cut = data.draw(st.integers(0, len(mutated)))
    _decodes_or_is_corrupt(Frame(bytes(mutated[:cut])).at(7))


@FUZZ
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from(["type", "deltas", "ops", "x"]), inner, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_arbitrary_messagepack_never_escapes(value: object) -> None:
    _decodes_or_is_corrupt(Frame(msgspec.msgpack.encode(value)).at(7))
