"""Bytes in, bytes out: the on-disk form of an entry.

An entry object is a 28-byte header followed by a MessagePack body::

    offset  size  field
    0       4     magic  b"DLOG"
    4       1     format version (1)
    5       1     flags (0; reserved)
    6       2     reserved (0)
    8       8     seq, little-endian u64: the entry knows where it belongs
    16      4     body length
    20      4     CRC-32 of the body
    24      4     CRC-32 of bytes 0..24

The body is a ``Batch`` or a ``Seal`` (a tagged union). Vectors travel as a
MessagePack extension (code 1): ``<rows:u32><dim:u32>`` then rows x dim
little-endian float32, decoded with ``numpy.frombuffer`` without a copy.

Encoding is split so that group commit encodes each delta once, in the
submitter's task, and an entry moved to a new seq only gets a new header.
Decoding turns every failure into ``CorruptEntry``: bytes from storage never
raise anything else.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from deltalog.entry import Delta, Entry, Seal
from deltalog.errors import CorruptEntry

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "Frame",
    "batch_body",
    "decode_entry",
    "encode_delta",
    "seal_body",
]

MAGIC = b"DLOG"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBHQII")
_HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _HEADER_CRC.size
_VECTORS_EXT = 1
_VECTORS_HEAD = struct.Struct("<II")
_LE_F32 = np.dtype("<f4")


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.ndim != 2:
            raise TypeError(f"embeddings must be 2-dimensional, got shape {obj.shape}")
        rows, dim = obj.shape
        data = np.ascontiguousarray(obj, dtype=_LE_F32).tobytes()
        return msgspec.msgpack.Ext(_VECTORS_EXT, _VECTORS_HEAD.pack(rows, dim) + data)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: memoryview) -> Any:
    if code != _VECTORS_EXT:
        raise ValueError(f"unknown extension type {code}")
    rows, dim = _VECTORS_HEAD.unpack_from(data)
    payload = data[_VECTORS_HEAD.size :]
    if len(payload) != rows * dim * 4:
        raise ValueError(f"vector block holds {len(payload)} bytes, expected {rows}x{dim}x4")
    return np.frombuffer(payload, dtype=_LE_F32).reshape(rows, dim)


def _dec_hook(kind: type, obj: Any) -> Any:
    if isinstance(obj, np.ndarray):  # the only custom type: embeddings
        return obj
    raise NotImplementedError(f"cannot decode {kind!r} from {type(obj).__name__}")


class _BatchFrame(msgspec.Struct, frozen=True, tag="batch"):
    """``Batch`` with pre-encoded deltas: the same bytes on the wire."""

    entry_id: str
    deltas: list[msgspec.Raw]
    producer_id: str
    created_at: float


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_decoder: msgspec.msgpack.Decoder[Entry] = msgspec.msgpack.Decoder(
    Entry, ext_hook=_ext_hook, dec_hook=_dec_hook
)


def encode_delta(delta: Delta) -> bytes:
    """One delta's MessagePack bytes, ready to be placed in a batch."""
    return _encoder.encode(delta)


def batch_body(
    entry_id: str, encoded_deltas: list[bytes], *, producer_id: str = "", created_at: float
) -> bytes:
    frame = _BatchFrame(entry_id, [msgspec.Raw(d) for d in encoded_deltas], producer_id, created_at)
    return _encoder.encode(frame)


def seal_body(seal: Seal) -> bytes:
    return _encoder.encode(seal)


@dataclass(frozen=True, slots=True)
class Frame:
    """An encoded body with its checksum; ``at(seq)`` gives the object bytes."""

    body: bytes

    @property
    def body_crc(self) -> int:
        return zlib.crc32(self.body)

    def at(self, seq: int, body_crc: int | None = None) -> bytes:
        crc = self.body_crc if body_crc is None else body_crc
        head = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, 0, seq, len(self.body), crc)
        return b"".join((head, _HEADER_CRC.pack(zlib.crc32(head)), self.body))


def decode_entry(data: bytes, *, seq: int | None = None, key: str | None = None) -> Entry:
    """Verify and decode one entry object; ``seq`` is where it was found."""
    body = _verified_body(data, seq=seq, key=key)
    try:
        return _decoder.decode(body)
    except Exception as exc:  # every failure to decode stored bytes is a data error
        raise CorruptEntry(f"undecodable entry body: {exc}", seq=seq, key=key) from exc


def _verified_body(data: bytes, *, seq: int | None, key: str | None) -> memoryview:
    def corrupt(reason: str) -> CorruptEntry:
        return CorruptEntry(reason, seq=seq, key=key)

    if len(data) < HEADER_SIZE:
        raise corrupt(f"entry is {len(data)} bytes, shorter than its {HEADER_SIZE}-byte header")
    magic, version, _flags, _reserved, at_seq, length, body_crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise corrupt(f"wrong magic bytes {magic!r}: not a deltalog entry")
    (header_crc,) = _HEADER_CRC.unpack_from(data, _HEADER.size)
    if zlib.crc32(memoryview(data)[: _HEADER.size]) != header_crc:
        raise corrupt("header checksum mismatch")
    if version != FORMAT_VERSION:
        raise corrupt(
            f"entry format version {version} is not supported (this deltalog reads "
            f"{FORMAT_VERSION}); upgrade deltalog to read it"
        )
    if seq is not None and at_seq != seq:
        raise corrupt(f"entry header names seq {at_seq}: the object was written for another seq")
    body = memoryview(data)[HEADER_SIZE:]
    if len(body) != length:
        raise corrupt(f"body is {len(body)} bytes, header says {length} (truncated?)")
    if zlib.crc32(body) != body_crc:
        raise corrupt("body checksum mismatch")
    return body
