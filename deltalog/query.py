"""``deltalog query``: embed a text and search a collection.

``--where key=value`` (repeatable; values typed: ``true``/``false`` are
bools, numbers are numbers, anything else a string) or ``--where-json``
for Chroma's full filter syntax. The text is embedded with the configured
embedder, which must be the one the collection was written with (the
dimensions are checked).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deltalog.errors import InvalidInput
from deltalog.reader import QueryResult, Reader

__all__ = ["parse_where", "run_query"]


def _typed(text: str) -> str | int | float | bool:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def parse_where(pairs: list[str] | None, raw_json: str | None) -> dict[str, Any] | None:
    """The filter named by ``--where k=v`` flags and ``--where-json``."""
    where: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--where takes key=value, got {pair!r}")
        where[key] = _typed(value)
    if raw_json:
        try:
            extra = json.loads(raw_json)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"--where-json is not valid JSON: {exc}") from exc
        if not isinstance(extra, dict):
            raise InvalidInput("--where-json must be a JSON object")
        where.update(extra)
    return where or None


def _print(result: QueryResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    ids, distances = result["ids"][0], result["distances"][0]
    documents, metadatas = result["documents"][0], result["metadatas"][0]
    if not ids:
        print("no results")
    for rank, (id_, distance, document, metadata) in enumerate(
        zip(ids, distances, documents, metadatas, strict=True), start=1
    ):
        merchant = (metadata or {}).get("merchant_name", "")
        print(f"{rank:>3}. {distance:8.4f}  {document!r:<24} {merchant:<20} {id_}")


async def run_query(args: argparse.Namespace) -> int:
    from deltalog.cli import config_from
    from deltalog.embed import make_embedder

    where = parse_where(args.where, args.where_json)
    embedder = make_embedder(args.embedder, dim=args.dim)
    try:
        vectors = await embedder.embed([args.text])
        async with Reader.open(
            config_from(args), consistency=args.consistency, cache_dir=Path(args.cache_dir)
        ) as reader:
            result = await reader.query(
                collection=args.collection, query_embeddings=vectors, n_results=args.k, where=where
            )
    finally:
        await embedder.aclose()
    _print(result, args.json)
    return 0


def add_query_command(commands: Any) -> None:
    from deltalog.cli import add_location_flags

    query = commands.add_parser("query", help="embed a text and search a collection")
    add_location_flags(query)
    query.add_argument("--collection", required=True, help="words or lines")
    query.add_argument("--text", required=True, help="the text to embed and search for")
    query.add_argument("-k", type=int, default=10, help="results to return")
    query.add_argument("--where", action="append", help="metadata filter key=value (repeatable)")
    query.add_argument("--where-json", help="a Chroma where filter as JSON")
    query.add_argument("--consistency", choices=["snapshot", "fresh"], default="snapshot")
    query.add_argument("--embedder", default="auto", help="auto, openai or hash")
    query.add_argument("--dim", type=int, help="embedding dimension (hash; OpenAI dimensions)")
    query.add_argument("--cache-dir", default=".deltalog/cache", help="local snapshot cache")
    query.add_argument("--json", action="store_true", help="print JSON")
    query.set_defaults(run=run_query)
