"""What the benchmarks write: synthetic receipts (RECEIPTS.md shapes) with fixed embeddings.

- A **receipt delta** is what ``ReceiptProducer`` appends for one receipt:
  one delta holding an upsert into ``words`` and one into ``lines``, about
  100 vectors (0.6 MiB at 1536 dims).
- A **label delta** is a label update of one word: an ``UpdateMetadata``
  without vectors, a few hundred bytes, the smallest delta production writes.
- Embeddings are random unit vectors drawn from a seed (OpenAI's are unit
  length too): embedding is not what is measured, and every pipeline gets the
  very same vectors.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import numpy as np
import numpy.typing as npt

from deltalog.entry import Delta, Metadata, MetadataPatch, Op, UpdateMetadata, Upsert
from deltalog.log import DeltaLog
from deltalog.receipts.generate import generate_receipts
from deltalog.receipts.model import Receipt, Records, line_records, word_records

__all__ = [
    "LINES",
    "WORDS",
    "PrecomputedEmbedder",
    "ReceiptData",
    "append_each",
    "label_delta",
    "receipts",
    "unit_vectors",
    "word_delta",
]

WORDS = "words"
LINES = "lines"
Vectors = npt.NDArray[np.float32]


def unit_vectors(rng: np.random.Generator, rows: int, dim: int) -> Vectors:
    vectors = rng.standard_normal((rows, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


@dataclass(frozen=True, slots=True)
class ReceiptData:
    """One receipt, its records in both collections, and their embeddings."""

    receipt: Receipt
    words: Records
    lines: Records
    word_vectors: Vectors
    line_vectors: Vectors

    @property
    def vectors(self) -> int:
        return len(self.words.ids) + len(self.lines.ids)

    @property
    def inputs(self) -> list[str]:
        """The texts ``ReceiptProducer`` embeds, in its order."""
        return self.words.inputs + self.lines.inputs

    def ops(self) -> list[Op]:
        words, lines = self.words, self.lines
        return [
            Upsert(WORDS, words.ids, self.word_vectors, words.documents, words.metadatas),
            Upsert(LINES, lines.ids, self.line_vectors, lines.documents, lines.metadatas),
        ]

    def delta(self) -> Delta:
        """A new delta (a fresh ``delta_id``) with this receipt's upserts."""
        return Delta(ops=self.ops())


def receipts(count: int, *, seed: int, dim: int) -> list[ReceiptData]:
    """``count`` synthetic receipts with embeddings, the same for the same seed."""
    rng = np.random.default_rng(seed)
    out = []
    for receipt in generate_receipts(count, seed=seed):
        words, lines = word_records(receipt), line_records(receipt)
        out.append(
            ReceiptData(
                receipt,
                words,
                lines,
                unit_vectors(rng, len(words.ids), dim),
                unit_vectors(rng, len(lines.ids), dim),
            )
        )
    return out


def label_delta(data: ReceiptData, n: int) -> Delta:
    """A label update of the ``n``-th word of a receipt (no vectors)."""
    word = data.words.ids[n % len(data.words.ids)]
    patch: MetadataPatch = {
        "label_GRAND_TOTAL": True,
        "label_status": "validated",
    }
    return Delta(ops=[UpdateMetadata(WORDS, [word], [patch])])


def word_delta(rng: np.random.Generator, vectors: int, dim: int, merchant: str) -> Delta:
    """A small upsert: ``vectors`` new words of one line of a new receipt."""
    image = uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | int(rng.integers(0, 2**63)))
    ids = [f"IMAGE#{image}#RECEIPT#00001#LINE#00001#WORD#{w:05d}" for w in range(1, vectors + 1)]
    metadatas: list[Metadata] = [
        {"merchant_name": merchant, "line_id": 1, "word_id": w, "label_status": "unvalidated"}
        for w in range(1, vectors + 1)
    ]
    return Delta(
        ops=[Upsert(WORDS, ids, unit_vectors(rng, vectors, dim), [f"W{w}" for w in ids], metadatas)]
    )


class PrecomputedEmbedder:
    """The ``Embedder`` seam answering with the benchmark's fixed vectors.

    ``ReceiptProducer`` embeds a receipt's word and line inputs in one call;
    this embedder looks that call up, so deltalog's ingest gets exactly the
    vectors the baseline pipeline writes.
    """

    def __init__(self, data: Sequence[ReceiptData], dim: int) -> None:
        self.name = "benchmark-precomputed"
        self.dim = dim
        self._vectors = {
            "\x1f".join(r.inputs): np.concatenate([r.word_vectors, r.line_vectors]) for r in data
        }

    async def embed(self, texts: Sequence[str]) -> Vectors:
        return self._vectors["\x1f".join(texts)]

    async def aclose(self) -> None:
        return None


async def append_each(log: DeltaLog, deltas: Sequence[Delta], *, tasks: int = 32) -> None:
    """One entry per delta, from ``tasks`` concurrent tasks."""
    queue = iter(deltas)

    async def worker() -> None:
        for delta in queue:
            await log.append(delta)

    async with anyio.create_task_group() as tg:
        for _ in range(min(tasks, len(deltas))):
            tg.start_soon(worker)
