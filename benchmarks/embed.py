"""The offline embedders side by side: texts embedded per second, on one core.

The texts are what ``ReceiptProducer`` embeds (each receipt's word inputs,
then its line inputs), one ``embed_sync`` call per receipt as ingest makes
them, in one thread. ``hashing`` starts each round with a fresh embedder
(its token cache cold); ``wordllama`` loads once, and the load is reported
apart (``load_seconds``: import and weights, first time in this process).
Each figure is the best of ``embed_repeats`` rounds. ``wordllama_vs_hashing``
is the ratio of their texts/s. Each row also has the embedder's search
quality on the same receipts (``benchmarks.search_quality``: precision at 20
of typed queries for lines, line inputs and words).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.harness import best_of, progress
from benchmarks.search_quality import Quality, search_quality, texts
from benchmarks.settings import Sizes
from benchmarks.workload import ReceiptData
from deltalog.receipts.embed import HashingEmbedder
from deltalog.receipts.wordllama import WordLlamaEmbedder

__all__ = ["EmbedFigures", "EmbedRow", "run_embed"]


@dataclass(frozen=True, slots=True)
class EmbedRow:
    embedder: str
    dim: int
    texts: int
    seconds: float
    texts_per_s: float
    load_seconds: float
    quality: Quality


@dataclass(frozen=True, slots=True)
class EmbedFigures:
    receipts: int
    texts: int
    rows: list[EmbedRow]
    wordllama_vs_hashing: float


def run_embed(sizes: Sizes, receipts: Sequence[ReceiptData], *, seed: int) -> EmbedFigures:
    batches = [r.inputs for r in receipts]
    count = sum(len(b) for b in batches)
    labelled = texts(len(receipts), seed=seed)

    def hashing() -> None:
        embedder = HashingEmbedder()
        for batch in batches:
            embedder.embed_sync(batch)

    hashing_s, _ = best_of(sizes.embed_repeats, hashing)
    probe = HashingEmbedder()
    model = WordLlamaEmbedder()
    model.embed_sync(["load"])
    wordllama_s, _ = best_of(
        sizes.embed_repeats, lambda: [model.embed_sync(batch) for batch in batches]
    )
    rows = [
        EmbedRow(
            embedder.name,
            embedder.dim,
            count,
            round(seconds, 4),
            round(count / seconds, 1),
            round(load, 3),
            search_quality(embedder.embed_sync, labelled),
        )
        for embedder, seconds, load in (
            (probe, hashing_s, 0.0),
            (model, wordllama_s, model.statistics().load_seconds),
        )
    ]
    for row in rows:
        progress(
            f"embed {row.embedder}: {row.texts_per_s:,.0f} texts/s "
            f"({row.texts:,} texts, load {row.load_seconds:.2f} s), P@20 of typed queries: "
            f"lines {row.quality.lines:.2f}, words {row.quality.words:.2f}"
        )
    ratio = round(rows[1].texts_per_s / rows[0].texts_per_s, 3)
    return EmbedFigures(len(receipts), count, rows, ratio)
