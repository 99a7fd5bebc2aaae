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

**Bounds**: one answer holds at most ``DELTALOG_QUERY_MAX_RESULTS`` records
(1,000: ``n_results`` times the number of queries, or a get's ``limit``,
which must be 1 to that bound; a get without a limit that matches more is
refused rather than cut short) and at most ``DELTALOG_QUERY_MAX_ANSWER_BYTES``
of JSON (5 MiB: Lambda cannot answer more than 6 MB).

A request that is wrong, or whose answer would break a bound, gets ``400``
and ``{"error": "..."}`` saying what to fix and naming the bound; a
transient failure ``503``.
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


def parse_request(body: Any, *, max_results: int = 1_000) -> QueryRequest:
    """The request, within the bounds; ``InvalidInput`` saying what to fix."""
    try:
        request = msgspec.convert(body, QueryRequest)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"bad query request: {exc}") from exc
    if request.query_texts is not None and request.query_embeddings is not None:
        raise InvalidInput("give query_texts or query_embeddings, not both")
    queries = len(request.query_texts or request.query_embeddings or [])
    if request.is_query and not 1 <= request.n_results * max(1, queries) <= max_results:
        raise InvalidInput(
            f"n_results ({request.n_results}) times the {queries} queries must be 1 to "
            f"{max_results} (DELTALOG_QUERY_MAX_RESULTS): ask for fewer"
        )
    if request.limit is not None and not 1 <= request.limit <= max_results:
        raise InvalidInput(
            f"limit must be 1 to {max_results} (DELTALOG_QUERY_MAX_RESULTS), not {request.limit}"
        )
    if request.ids is not None and len(request.ids) > max_results:
        raise InvalidInput(
            f"{len(request.ids)} ids: ask for at most {max_results} "
            "(DELTALOG_QUERY_MAX_RESULTS) at once"
        )
    return request


class QueryHandler(Handler):
    """Lambda's entry point for queries; see the module docstring."""

    def __call__(self, event: dict[str, Any], context: Context | None) -> dict[str, Any]:
        s = self.settings
        try:
            request = parse_request(request_body(event), max_results=s.query_max_results)
            name = request.log or s.default_log
            s.check_log(name)
            reader = self.reader(name, request.consistency)
            embedder = self.embedder() if request.query_texts is not None else None
            answer = self.runtime.call(_answer, reader, embedder, request, s.query_max_results)
            body = _bounded(answer, s.query_max_answer_bytes)
        except InvalidInput as exc:
            return _response(400, {"error": str(exc)})
        except Unavailable as exc:
            self.runtime.reset()
            return _response(503, {"error": str(exc)})
        except DeltalogError:
            self.runtime.reset()
            raise
        return _response(200, body)


async def _answer(
    reader: Reader, embedder: Embedder | None, request: QueryRequest, max_results: int
) -> Any:
    if not request.is_query:
        # Without a limit, one record past the bound tells a complete answer from a cut one.
        limit = request.limit if request.limit is not None else max_results + 1
        got = await reader.get(
            collection=request.collection, ids=request.ids, where=request.where, limit=limit
        )
        if len(got["ids"]) > max_results:
            raise InvalidInput(
                f"more than {max_results} records match (DELTALOG_QUERY_MAX_RESULTS): give a "
                "limit, or a narrower where or ids"
            )
        return got
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


def _bounded(answer: Any, max_bytes: int) -> str:
    """The answer as JSON, refused when over ``max_bytes`` (Lambda answers at most 6 MB)."""
    body = json.dumps(answer)
    size = len(body.encode())
    if size > max_bytes:
        raise InvalidInput(
            f"the answer is {size} bytes, over {max_bytes} (DELTALOG_QUERY_MAX_ANSWER_BYTES; "
            "Lambda answers at most 6 MB): ask for fewer records (n_results, limit)"
        )
    return body


def _response(status: int, body: Any) -> dict[str, Any]:
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json"},
        "body": body if isinstance(body, str) else json.dumps(body),
    }


_handler: QueryHandler | None = None


def handler(event: dict[str, Any], context: Context | None) -> dict[str, Any]:
    """The function Lambda calls (``deltalog_lambda.query.handler``)."""
    global _handler
    if _handler is None:
        _handler = QueryHandler()
    return _handler(event, context)
