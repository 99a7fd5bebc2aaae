"""A local stand-in of Pinecone's data-plane REST API, for the official SDK.

``PineconeServer`` serves, on 127.0.0.1 (port 0) from a thread, the
endpoints an import uses, in the JSON wire format the SDK decodes (camelCase
fields, as the API sends them):

- ``GET /vectors/list?namespace=&limit=&paginationToken=``: ids in sorted
  order, ``{"vectors": [{"id"}], "pagination": {"next"}, "namespace",
  "usage"}``; the token is opaque (base64 of the last id listed) and absent
  on the last page;
- ``GET /vectors/fetch?ids=..&ids=..&namespace=``: ``{"vectors": {id: {"id",
  "values", "metadata"}}, "namespace", "usage"}``, absent ids left out;
- ``POST /describe_index_stats``: ``{"namespaces": {ns: {"vectorCount"}},
  "dimension", "indexFullness", "totalVectorCount", "metric", "vectorType"}``;
- ``GET /namespaces``: ``{"namespaces": [{"name", "record_count"}],
  "pagination", "total_count"}`` (record counts as strings, as the API does).

The default namespace is ``""`` in requests and ``"__default__"`` in
listings. The ``Api-Key`` header is checked (401 otherwise). ``fail_fetches_after``
makes every fetch after that many answer 503 (with ``Retry-After: 0``, so
the SDK's retries do not sleep) until it is set back to None. Every request
is counted per path.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["API_KEY", "PineconeServer"]

API_KEY = "pc-test-deltalog"
DEFAULT = "__default__"


class PineconeServer:
    """See the module docstring. Use as a context manager."""

    def __init__(self, *, dim: int = 8, api_key: str = API_KEY) -> None:
        self.dim = dim
        self.api_key = api_key
        self.namespaces: dict[str, dict[str, dict[str, Any]]] = {}
        self.requests: Counter[str] = Counter()
        self.fetched_ids: Counter[str] = Counter()
        self.fail_fetches_after: int | None = None
        self._fetches = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, namespace: str, id_: str, values: list[float], metadata: dict[str, Any]) -> None:
        self.namespaces.setdefault(namespace, {})[id_] = {
            "id": id_,
            "values": values,
            "metadata": metadata,
        }

    def __enter__(self) -> PineconeServer:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # -- the API ----------------------------------------------------------------------

    def _list(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        namespace = _namespace(query)
        limit = int(query.get("limit", ["100"])[0])
        token = query.get("paginationToken", [""])[0]
        after = base64.urlsafe_b64decode(token.encode()).decode() if token else None
        ids = sorted(self.namespaces.get(namespace, {}))
        if after is not None:
            ids = [i for i in ids if i > after]
        page, rest = ids[:limit], ids[limit:]
        body: dict[str, Any] = {
            "vectors": [{"id": i} for i in page],
            "namespace": query.get("namespace", [""])[0],
            "usage": {"readUnits": 1},
        }
        if rest:
            body["pagination"] = {"next": base64.urlsafe_b64encode(page[-1].encode()).decode()}
        return 200, body

    def _fetch(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self._fetches += 1
            if self.fail_fetches_after is not None and self._fetches > self.fail_fetches_after:
                return 503, {"error": {"code": "UNAVAILABLE", "message": "scripted outage"}}
        records = self.namespaces.get(_namespace(query), {})
        ids = query.get("ids", [])
        self.fetched_ids.update(ids)
        vectors = {i: records[i] for i in ids if i in records}
        return 200, {
            "vectors": vectors,
            "namespace": query.get("namespace", [""])[0],
            "usage": {"readUnits": len(ids)},
        }

    def _stats(self) -> tuple[int, dict[str, Any]]:
        spaces = {(ns or DEFAULT): {"vectorCount": len(r)} for ns, r in self.namespaces.items()}
        return 200, {
            "namespaces": spaces,
            "dimension": self.dim,
            "indexFullness": 0.0,
            "totalVectorCount": sum(len(r) for r in self.namespaces.values()),
            "metric": "cosine",
            "vectorType": "dense",
        }

    def _namespaces(self) -> tuple[int, dict[str, Any]]:
        listed = [
            {"name": ns or DEFAULT, "record_count": str(len(r))}
            for ns, r in sorted(self.namespaces.items())
        ]
        return 200, {"namespaces": listed, "pagination": None, "total_count": len(listed)}

    def _answer(self, method: str, url: str, key: str | None) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(url)
        self.requests[parts.path] += 1
        if key != self.api_key:
            return 401, {"error": {"code": "UNAUTHENTICATED", "message": "Invalid API Key"}}
        query = parse_qs(parts.query, keep_blank_values=True)
        if method == "GET" and parts.path == "/vectors/list":
            return self._list(query)
        if method == "GET" and parts.path == "/vectors/fetch":
            return self._fetch(query)
        if method == "POST" and parts.path == "/describe_index_stats":
            return self._stats()
        if method == "GET" and parts.path == "/namespaces":
            return self._namespaces()
        return 404, {"error": {"code": "NOT_FOUND", "message": f"no route {parts.path}"}}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                status, body = server._answer(method, self.path, self.headers.get("Api-Key"))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 503:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def log_message(self, format: str, *args: Any) -> None:
                return None

        return Handler


def _namespace(query: dict[str, list[str]]) -> str:
    namespace = query.get("namespace", [""])[0]
    return "" if namespace == DEFAULT else namespace
