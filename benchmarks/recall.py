"""Search quality of the index: recall@10 against brute force, build after build.

The workload is the demo's: generated receipts, their word inputs embedded
with WordLlama (256 dims), about 85 vectors a receipt, of which about 40 %
repeat another bit for bit (``THANK YOU FOR SHOPPING`` on every receipt).
The queries:

- **typed**: every merchant name and every product name, lower-cased, as a
  user types them (``walmart``, ``organic bananas``);
- **near**: stored vectors moved slightly (Gaussian noise of norm ~0.05),
  re-normalised.

Per build, ``recall`` is the share of the exact 10 nearest (ties counted as
found) that the index returned, averaged over the queries; ``worst`` is the
lowest of one query and ``misses`` how many queries found none of theirs.
Three ways of building the same vectors, each ``recall_builds`` times
(Chroma inserts in threads, in a hash order, so builds differ):

- ``raw chromadb``: a fresh collection, ``add`` in batches of Chroma's
  maximum, as the issue measured; ``query(n_results=10)``;
- ``deltalog``: the compactor's sink (``distinct="keep"``) applying the
  fold in one go, read back as a reader opens a checkpoint;
- ``deltalog incremental``: 60 % of the receipts, then the rest with 5 %
  of the first part put again and 5 % deleted (a second compaction);
- ``deltalog, old checkpoint``: the one-go directory read without its
  distinct index (what a checkpoint written before it gives a reader).

``apply_s`` is the wall time of the adds (raw) or of ``apply`` (deltalog,
distinct index included), ``index_mb`` the directory's size on disk.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import chromadb
import numpy as np
import numpy.typing as npt
from chromadb.api.client import Client
from chromadb.config import Settings

from benchmarks.harness import progress
from benchmarks.settings import Sizes
from deltalog.fold import CollectionPlan, FoldPlan, Record
from deltalog.receipts.generate import _PRODUCTS, MERCHANTS, generate_receipts
from deltalog.receipts.model import word_records
from deltalog.receipts.wordllama import WordLlamaEmbedder
from deltalog.snapshot.distinct import DISTINCT_DIR
from deltalog.snapshot.sink import ChromaSink, Distinct

__all__ = ["RecallFigures", "RecallRow", "run_recall"]

K = 10
Matrix = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class RecallRow:
    system: str
    build: int
    typed: float
    near: float
    worst: float
    misses: int
    apply_s: float
    index_mb: float


@dataclass(frozen=True, slots=True)
class RecallFigures:
    receipts: int
    vectors: int
    distinct: int
    typed_queries: int
    near_queries: int
    rows: list[RecallRow]

    def lowest(self, system: str) -> float:
        """The lowest recall (typed or near) of any build of ``system``."""
        return min(min(r.typed, r.near) for r in self.rows if r.system == system)


@dataclass(frozen=True, slots=True)
class _Workload:
    ids: list[str]
    documents: list[str]
    vectors: Matrix
    queries: Matrix
    typed: int


def _workload(receipts: int, near: int, seed: int) -> _Workload:
    ids: list[str] = []
    inputs: list[str] = []
    documents: list[str] = []
    for receipt in generate_receipts(receipts, seed=seed):
        records = word_records(receipt)
        ids += records.ids
        inputs += records.inputs
        documents += records.documents
    model = WordLlamaEmbedder()
    vectors = np.asarray(model.embed_sync(inputs), np.float32)
    names = [m.name.lower() for m in MERCHANTS]
    names += [p.lower() for products in _PRODUCTS.values() for p in products]
    typed = np.asarray(model.embed_sync(names), np.float32)
    rng = np.random.default_rng(seed)
    picked = vectors[rng.choice(len(vectors), min(near, len(vectors)), replace=False)]
    noise = rng.normal(0, 0.05 / np.sqrt(vectors.shape[1]), picked.shape).astype(np.float32)
    moved = picked + noise
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    return _Workload(ids, documents, vectors, np.vstack([typed, moved]), len(names))


def _kth(queries: Matrix, vectors: Matrix) -> npt.NDArray[np.float64]:
    """The exact 10th nearest squared L2 distance per query."""
    q, v = queries.astype(np.float64), vectors.astype(np.float64)
    d = (q * q).sum(1)[:, None] - 2.0 * (q @ v.T) + (v * v).sum(1)[None, :]
    return np.sort(d, axis=1)[:, K - 1]


def _recalls(distances: list[list[float]], kth: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.array(
        [
            min(K, sum(1 for d in row[:K] if d <= kth[i] + 1e-4)) / K
            for i, row in enumerate(distances)
        ]
    )


def _row(
    system: str, build: int, recall: npt.NDArray[np.float64], typed: int, apply_s: float, mb: float
) -> RecallRow:
    row = RecallRow(
        system,
        build,
        round(float(recall[:typed].mean()), 4),
        round(float(recall[typed:].mean()), 4),
        round(float(recall.min()), 2),
        int((recall == 0).sum()),
        round(apply_s, 2),
        round(mb, 1),
    )
    progress(
        f"recall {system} build {build}: typed {row.typed:.4f} near {row.near:.4f} "
        f"worst {row.worst:.1f} misses {row.misses} apply {row.apply_s:.1f} s {row.index_mb} MB"
    )
    return row


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _raw(work: _Workload, path: Path) -> tuple[list[list[float]], float]:
    client = chromadb.PersistentClient(str(path), settings=Settings(anonymized_telemetry=False))
    assert isinstance(client, Client)  # close() is only on the concrete client
    collection = client.create_collection("words", embedding_function=None)
    batch = client.get_max_batch_size()
    started = time.perf_counter()
    for s in range(0, len(work.ids), batch):
        collection.add(ids=work.ids[s : s + batch], embeddings=work.vectors[s : s + batch])
    seconds = time.perf_counter() - started
    got = collection.query(query_embeddings=work.queries, n_results=K, include=["distances"])
    client.close()
    return [list(row) for row in got["distances"] or []], seconds


def _plan(records: list[Record], deletes: list[str] = ()) -> FoldPlan:  # type: ignore[assignment]
    plan = CollectionPlan()
    for record in records:
        plan.put(record)
    for id_ in deletes:
        plan.delete(id_)
    return FoldPlan({"words": plan})


async def _apply(path: Path, plan: FoldPlan) -> float:
    sink = await ChromaSink.open(path, distinct="keep")
    try:
        return (await sink.apply(plan)).seconds
    finally:
        await sink.aclose()


async def _query(path: Path, queries: Matrix, distinct: Distinct) -> list[list[float]]:
    sink = await ChromaSink.open(path, distinct=distinct)
    try:
        hits = await sink.query("words", queries, K, None)
    finally:
        await sink.aclose()
    return [[h.distance or 0.0 for h in row] for row in hits]


async def _incremental(
    work: _Workload, path: Path, rng: np.random.Generator
) -> tuple[float, Matrix]:
    records = [Record(id_, work.vectors[i], work.documents[i]) for i, id_ in enumerate(work.ids)]
    first = int(len(records) * 0.6)
    seconds = await _apply(path, _plan(records[:first]))
    chosen = rng.permutation(first)
    again = [records[i] for i in chosen[: first // 20]]
    gone = [records[i].id for i in chosen[first // 20 : first // 10]]
    seconds += await _apply(path, _plan(records[first:] + again, gone))
    kept = sorted(set(range(len(records))) - {int(i) for i in chosen[first // 20 : first // 10]})
    return seconds, work.vectors[kept]


async def run_recall(sizes: Sizes, *, seed: int) -> RecallFigures:
    work = _workload(sizes.recall_receipts, sizes.recall_near_queries, seed)
    kth = _kth(work.queries, work.vectors)
    records = [Record(id_, work.vectors[i], work.documents[i]) for i, id_ in enumerate(work.ids)]
    rows: list[RecallRow] = []
    rng = np.random.default_rng(seed)
    for build in range(sizes.recall_builds):
        scratch = Path(tempfile.mkdtemp(prefix="deltalog-recall-"))
        try:
            distances, seconds = _raw(work, scratch / "raw")
            raw_mb = _size_mb(scratch / "raw")
            rows.append(
                _row("raw chromadb", build, _recalls(distances, kth), work.typed, seconds, raw_mb)
            )
            seconds = await _apply(scratch / "one", _plan(records))
            found = await _query(scratch / "one", work.queries, "use")
            mb = _size_mb(scratch / "one")
            rows.append(_row("deltalog", build, _recalls(found, kth), work.typed, seconds, mb))
            old = await _query(scratch / "one", work.queries, "off")
            mb_old = mb - _size_mb(scratch / "one" / DISTINCT_DIR)
            rows.append(
                _row("deltalog, old checkpoint", build, _recalls(old, kth), work.typed, 0.0, mb_old)
            )
            seconds, kept = await _incremental(work, scratch / "inc", rng)
            found = await _query(scratch / "inc", work.queries, "use")
            inc = _recalls(found, _kth(work.queries, kept))
            mb = _size_mb(scratch / "inc")
            rows.append(_row("deltalog incremental", build, inc, work.typed, seconds, mb))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    distinct = len(np.unique(work.vectors, axis=0))
    near = len(work.queries) - work.typed
    return RecallFigures(sizes.recall_receipts, len(work.ids), distinct, work.typed, near, rows)
