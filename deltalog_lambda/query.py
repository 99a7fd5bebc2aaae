"""The query handler: a Chroma-shaped answer behind a function URL.

``handler(event, context)`` (the template's optional ``QueryFunction``,
behind a function URL with IAM auth) takes a POST whose JSON body is

- a **query**: ``{"collection": "words", "query_texts": ["TOTAL"]`` (or
  ``"query_embeddings": [[...]]``) ``, "n_results": 10, "where": {...},
  "log": "receipts", "consistency": "snapshot"}``, answered as Chroma's
  ``query`` answers: ``{"ids": [[...]], "distances": [[...]],
  "documents": [[...]], "metadatas": [[...]]}``, one inner list per query;
- or a **get** (no query texts or embeddings): ``{"collection": "words",
  "ids": [...], "where": {...}, "limit": 100}``, answered as Chroma's
  ``get``: ``{"ids": [...], "documents": [...], "metadatas": [...]}``.

``log`` defaults to ``DELTALOG_LOG``; ``consistency`` is ``snapshot``
(the default) or ``fresh`` (the committed snapshot merged with the tail).
Texts are embedded with the deployment's embedder. The reader stays open
across warm invocations, its snapshot cached under ``/tmp``.

A request that is wrong gets ``400`` and ``{"error": "..."}`` saying what
to fix; a transient failure ``503``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import msgspec

from deltalog.errors import DeltalogError, InvalidInput, Unavailable
from deltalog.reader import Consistency, Reader
from deltalog.receipts.embed import Embedder
from deltalog_lambda.events import request_body
from deltalog_lambda.handler import Context, Handler

__all__ = ["QueryHandler", "QueryRequest", "handler"]

log = logging.getLogger("deltalog_lambda.query")


class QueryRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The JSON body of a query or get request."""

    collection: str
    log: str | None = None
    query_texts: list[str] | None = None
    query_embeddings: list[list[float]] | None = None
    n_results: int = 10
    where: dict[str, Any] | None = None
    ids: list[str] | None = None
    limit: int | None = None
    consistency: Consistency = "snapshot"

    @property
    def is_query(self) -> bool:
        return self.query_texts is not None or self.query_embeddings is not None


def parse_request(body: Any) -> QueryRequest:
    try:
        request = msgspec.convert(body, QueryRequest)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"bad query request: {exc}") from exc
    if request.query_texts is not None and request.query_embeddings is not None:
        raise InvalidInput("give query_texts or query_embeddings, not both")
    return request


class QueryHandler(Handler):
    """Lambda's entry point for queries; see the module docstring."""

    def __call__(self, event: dict[str, Any], context: Context | None) -> dict[str, Any]:
        try:
            request = parse_request(request_body(event))
            name = request.log or self.settings.default_log
            self.settings.check_log(name)
            reader = self.reader(name, request.consistency)
            embedder = self.embedder() if request.query_texts is not None else None
            answer = self.runtime.call(_answer, reader, embedder, request)
        except InvalidInput as exc:
            return _response(400, {"error": str(exc)})
        except Unavailable as exc:
            self.runtime.reset()
            return _response(503, {"error": str(exc)})
        except DeltalogError:
            self.runtime.reset()
            raise
        return _response(200, answer)


async def _answer(reader: Reader, embedder: Embedder | None, request: QueryRequest) -> Any:
    if not request.is_query:
        return await reader.get(
            collection=request.collection, ids=request.ids, where=request.where, limit=request.limit
        )
    if request.query_texts is not None:
        assert embedder is not None
        vectors: Any = await embedder.embed(request.query_texts)
    else:
        vectors = request.query_embeddings
    return await reader.query(
        collection=request.collection,
        query_embeddings=vectors,
        n_results=request.n_results,
        where=request.where,
    )


def _response(status: int, body: Any) -> dict[str, Any]:
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json"},
        "body": json.dumps(body),
    }


_handler: QueryHandler | None = None


def handler(event: dict[str, Any], context: Context | None) -> dict[str, Any]:
    """The function Lambda calls (``deltalog_lambda.query.handler``)."""
    global _handler
    if _handler is None:
        _handler = QueryHandler()
    return _handler(event, context)
