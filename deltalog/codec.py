"""Bytes in, bytes out: the on-disk form of an entry.

An entry object is a 28-byte header followed by a MessagePack body::

    offset  size  field
    0       4     magic  b"DLOG"
    4       1     format version (1)
    5       1     flags: bit 0 set = signed; other bits 0 (reserved)
    6       2     reserved (0)
    8       8     seq, little-endian u64: the entry knows where it belongs
    16      4     body length
    20      4     CRC-32 of the body
    24      4     CRC-32 of bytes 0..24

A signed entry (``deltalog.signing``) carries a 40-byte trailer after the
body: the 8-byte key id, then HMAC-SHA256(key, bytes 0..24 || key id ||
body). Signing needs no new format version: a reader that predates it
refuses a signed entry cleanly, since the object is longer than the header
says. A reader with trusted keys refuses unsigned entries and entries whose
signature does not verify (``UntrustedEntry``); one without reads both.

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
from deltalog.errors import CorruptEntry, UntrustedEntry
from deltalog.signing import KEY_ID_SIZE, TAG_SIZE, Signer, Verifier

__all__ = [
    "FLAG_SIGNED",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "TRAILER_SIZE",
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
FLAG_SIGNED = 0x01
TRAILER_SIZE = KEY_ID_SIZE + TAG_SIZE
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
    # numpy.str_ and numpy.float64 are str and float (validation lets them in): store them as such.
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, float):
        return float(obj)
    # msgspec's hook protocol: NotImplementedError means "not a type this hook handles".
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

    def at(self, seq: int, body_crc: int | None = None, *, signer: Signer | None = None) -> bytes:
        """The object bytes at ``seq``, signed when a ``signer`` is given."""
        crc = self.body_crc if body_crc is None else body_crc
        flags = FLAG_SIGNED if signer is not None else 0
        head = _HEADER.pack(MAGIC, FORMAT_VERSION, flags, 0, seq, len(self.body), crc)
        parts = [head, _HEADER_CRC.pack(zlib.crc32(head)), self.body]
        if signer is not None:
            parts += [signer.key_id, signer.tag(head, self.body)]
        return b"".join(parts)


def decode_entry(
    data: bytes,
    *,
    seq: int | None = None,
    key: str | None = None,
    log: str | None = None,
    verifier: Verifier | None = None,
) -> Entry:
    """Verify and decode one entry object; ``seq`` is where it was found.

    With a ``verifier``, an entry not signed by one of its keys raises
    ``UntrustedEntry`` before its body is decoded.
    """
    body = _Checked(data, seq=seq, key=key, log=log).body(verifier)
    try:
        return _decoder.decode(body)
    except Exception as exc:  # every failure to decode stored bytes is a data error
        raise CorruptEntry(f"undecodable entry body: {exc}", log=log, seq=seq, key=key) from exc


@dataclass(frozen=True, slots=True)
class _Checked:
    """One stored object being checked, and where it was found (for errors)."""

    data: bytes
    seq: int | None
    key: str | None
    log: str | None

    def corrupt(self, reason: str) -> CorruptEntry:
        return CorruptEntry(reason, log=self.log, seq=self.seq, key=self.key)

    def untrusted(self, reason: str, kid: bytes | None) -> UntrustedEntry:
        key_id = kid.hex() if kid is not None else None
        return UntrustedEntry(reason, key_id=key_id, log=self.log, seq=self.seq, key=self.key)

    def body(self, verifier: Verifier | None) -> memoryview:
        body, flags = _verified_body(self.data, self)
        if flags & FLAG_SIGNED:
            trailer = memoryview(self.data)[HEADER_SIZE + len(body) :]
            kid, tag = bytes(trailer[:KEY_ID_SIZE]), bytes(trailer[KEY_ID_SIZE:])
            if verifier is not None:
                self._check_signature(verifier, body, kid, tag)
        elif verifier is not None:
            raise self.untrusted(
                f"entry is not signed; this reader trusts only entries signed with keys "
                f"{', '.join(verifier.key_ids)}",
                None,
            )
        return body

    def _check_signature(
        self, verifier: Verifier, body: memoryview, kid: bytes, tag: bytes
    ) -> None:
        key = verifier.key_for(kid)
        if key is None:
            raise self.untrusted(
                f"entry is signed with key {kid.hex()}, which is not trusted "
                f"(trusted: {', '.join(verifier.key_ids)}); add it to verify_keys if it is yours",
                kid,
            )
        if not verifier.matches(key, self.data[: _HEADER.size], kid, body, tag):
            raise self.untrusted(
                f"signature does not match key {kid.hex()}: the entry was altered or forged",
                kid,
            )


def _verified_body(data: bytes, where: _Checked) -> tuple[memoryview, int]:
    """The body after the structural checks, and the header's flags."""
    corrupt = where.corrupt
    seq = where.seq
    if len(data) < HEADER_SIZE:
        raise corrupt(f"entry is {len(data)} bytes, shorter than its {HEADER_SIZE}-byte header")
    magic, version, flags, _reserved, at_seq, length, body_crc = _HEADER.unpack_from(data)
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
    if flags & ~FLAG_SIGNED:
        raise corrupt(
            f"entry flags {flags:#04x} are not understood (written by a newer deltalog?); "
            "upgrade deltalog to read it"
        )
    if seq is not None and at_seq != seq:
        raise corrupt(f"entry header names seq {at_seq}: the object was written for another seq")
    trailer = TRAILER_SIZE if flags & FLAG_SIGNED else 0
    if len(data) != HEADER_SIZE + length + trailer:
        signed = f" and a {TRAILER_SIZE}-byte signature" if trailer else ""
        raise corrupt(
            f"entry is {len(data)} bytes, its header says a {length}-byte body{signed} (truncated?)"
        )
    body = memoryview(data)[HEADER_SIZE : HEADER_SIZE + length]
    if zlib.crc32(body) != body_crc:
        raise corrupt("body checksum mismatch")
    return body, flags
