"""A local stand-in of Lambda's ``Invoke`` API, for the query fan-out through botocore.

``LambdaServer`` serves ``POST /2015-03-31/functions/{name}/invocations`` on
127.0.0.1 (port 0) from threads: the body is the event, the answer the
handler's return value as JSON, status 200. A handler that raises is
answered as Lambda answers an unhandled error: status 200, the header
``X-Amz-Function-Error: Unhandled`` and ``{"errorMessage", "errorType"}``.

Each event goes to the handler ``route(event)`` picks (the tests give every
shard its own handler: its own execution environment, event loop and
``/tmp``). Every invocation is recorded (function name and event).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["LambdaServer"]

Handler = Callable[[dict[str, Any], Any], Any]


class LambdaServer:
    """See the module docstring. Use as a context manager."""

    def __init__(self, route: Callable[[dict[str, Any]], Handler], context: Any) -> None:
        self.route = route
        self.context = context
        self.invocations: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> LambdaServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Invoke(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                parts = self.path.split("/")
                if len(parts) != 5 or parts[1:3] != ["2015-03-31", "functions"]:
                    self._answer(404, {"message": f"no route {self.path}"})
                    return
                event = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with server._lock:
                    server.invocations.append((parts[3], event))
                try:
                    result = server.route(event)(event, server.context)
                except Exception as exc:
                    error = {"errorMessage": str(exc), "errorType": type(exc).__name__}
                    self._answer(200, error, {"X-Amz-Function-Error": "Unhandled"})
                    return
                self._answer(200, result)

            def _answer(
                self, status: int, body: Any, headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return

        return Invoke
