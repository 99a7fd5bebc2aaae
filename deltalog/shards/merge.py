"""Answers of several shards as one: the nearest of every shard's nearest.

Each shard answers a query with its own nearest ``n`` records per query
vector (Chroma's shape: ``ids``, ``distances``, ``documents``,
``metadatas``, one list per query vector); the log's answer is the
nearest ``n`` of their union, by distance, then id (a stable order for
ties, whatever order the shards answered in). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["merge_nearest"]


def merge_nearest(answers: Sequence[Mapping[str, Any]], n_results: int) -> dict[str, Any]:
    """The nearest ``n_results`` per query among the shards' ``answers``."""
    result: dict[str, Any] = {"ids": [], "distances": [], "documents": [], "metadatas": []}
    queries = len(answers[0]["ids"]) if answers else 0
    for q in range(queries):
        rows = sorted(
            (
                (a["distances"][q][i], a["ids"][q][i], a["documents"][q][i], a["metadatas"][q][i])
                for a in answers
                for i in range(len(a["ids"][q]))
            ),
            key=lambda row: (row[0], row[1]),
        )[:n_results]
        result["ids"].append([r[1] for r in rows])
        result["distances"].append([r[0] for r in rows])
        result["documents"].append([r[2] for r in rows])
        result["metadatas"].append([r[3] for r in rows])
    return result
