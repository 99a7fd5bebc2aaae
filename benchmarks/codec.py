"""The entry codec against JSON lists of floats, on the same receipt deltas.

- **entry**: what producers and the compactor do: encode each delta
  (MessagePack, vectors as little-endian float32 bytes), frame them as one
  entry (header, CRC-32); decode = verify the checksums and decode, vectors
  as ``numpy.frombuffer`` views.
- **json**: the same deltas as JSON with embeddings as lists of floats,
  encoded with the standard library and with msgspec (a fast encoder), and
  decoded back to float32 arrays.

Throughput is given in encoded bytes per second and in **vector payload**
(the float32 bytes, n x dim x 4) per second, which compares the formats on
the same work. Each figure is the best of ``codec_repeats`` (CPU only).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from benchmarks.harness import MB, best_of, progress
from benchmarks.settings import Sizes
from benchmarks.workload import ReceiptData
from deltalog.codec import Frame, batch_body, decode_entry, encode_delta
from deltalog.entry import Delta, Upsert

__all__ = ["CodecFigures", "FormatFigures", "run_codec"]


@dataclass(frozen=True, slots=True)
class FormatFigures:
    format: str
    encoded_mb: float
    encode_seconds: float
    decode_seconds: float
    encode_mb_per_s: float
    decode_mb_per_s: float
    encode_payload_mb_per_s: float
    decode_payload_mb_per_s: float


@dataclass(frozen=True, slots=True)
class CodecFigures:
    receipts: int
    vectors: int
    payload_mb: float
    formats: list[FormatFigures]

    def of(self, name: str) -> FormatFigures:
        return next(f for f in self.formats if f.format == name)


def _entry_encode(deltas: Sequence[Delta]) -> bytes:
    encoded = [encode_delta(d) for d in deltas]
    body = batch_body("0" * 32, encoded, producer_id="benchmark", created_at=0.0)
    return Frame(body).at(1)


def _as_json(delta: Delta) -> dict[str, Any]:
    ops = []
    for op in delta.ops:
        assert isinstance(op, Upsert)
        ops.append(
            {
                "type": "upsert",
                "collection": op.collection,
                "ids": op.ids,
                "embeddings": op.embeddings.tolist(),
                "documents": op.documents,
                "metadatas": op.metadatas,
            }
        )
    return {"delta_id": delta.delta_id, "ops": ops}


def _from_json(data: list[dict[str, Any]]) -> int:
    vectors = 0
    for delta in data:
        for op in delta["ops"]:
            vectors += len(np.asarray(op["embeddings"], dtype=np.float32))
    return vectors


def _figures(name: str, size: int, payload: int, encode_s: float, decode_s: float) -> FormatFigures:
    return FormatFigures(
        format=name,
        encoded_mb=round(size / MB, 3),
        encode_seconds=round(encode_s, 5),
        decode_seconds=round(decode_s, 5),
        encode_mb_per_s=round(size / MB / encode_s, 1),
        decode_mb_per_s=round(size / MB / decode_s, 1),
        encode_payload_mb_per_s=round(payload / MB / encode_s, 1),
        decode_payload_mb_per_s=round(payload / MB / decode_s, 1),
    )


def run_codec(sizes: Sizes, receipts: Sequence[ReceiptData]) -> CodecFigures:
    deltas = [r.delta() for r in receipts]
    vectors = sum(r.vectors for r in receipts)
    payload = vectors * sizes.dim * 4
    repeats = sizes.codec_repeats
    formats = []

    encode_s, data = best_of(repeats, lambda: _entry_encode(deltas))
    decode_s, _ = best_of(repeats, lambda: decode_entry(data, seq=1))
    formats.append(_figures("entry", len(data), payload, encode_s, decode_s))

    encode_s, text = best_of(repeats, lambda: json.dumps([_as_json(d) for d in deltas]).encode())
    decode_s, _ = best_of(repeats, lambda: _from_json(json.loads(text)))
    formats.append(_figures("json (stdlib)", len(text), payload, encode_s, decode_s))

    encoder = msgspec.json.Encoder()
    encode_s, text = best_of(repeats, lambda: encoder.encode([_as_json(d) for d in deltas]))
    decode_s, _ = best_of(repeats, lambda: _from_json(msgspec.json.decode(text)))
    formats.append(_figures("json (msgspec)", len(text), payload, encode_s, decode_s))

    for f in formats:
        progress(
            f"codec {f.format:15}: encode {f.encode_payload_mb_per_s:8.1f} MB/s, "
            f"decode {f.decode_payload_mb_per_s:8.1f} MB/s of vectors ({f.encoded_mb} MB)"
        )
    return CodecFigures(len(receipts), vectors, round(payload / MB, 3), formats)
