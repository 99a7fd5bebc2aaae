"""Tiny HTTP servers on loopback that misbehave the way real endpoints can.

- ``forwarding(upstream, drop=...)``: a proxy in front of moto's server that
  drops request headers on the way, e.g. ``If-None-Match``: an S3-compatible
  store that ignores conditional writes.
- ``denying()``: an endpoint that refuses every request as AWS does for
  unknown credentials: S3's XML ``403 InvalidAccessKeyId`` and DynamoDB's
  JSON ``400 UnrecognizedClientException`` (recognised by ``X-Amz-Target``).
- ``not_implementing(header)``: an S3-compatible store that answers ``501
  NotImplemented`` to requests carrying ``header`` (e.g. ``If-None-Match``).
- ``closed_port()``: a loopback port nothing listens on (connections are
  refused): an endpoint that is down or was never there.

Each runs in a daemon thread of the test process (``StubServer``), so the
code under test talks real HTTP to it, in process or from a subprocess.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

Answer = tuple[int, dict[str, str], bytes]
Handler = Callable[[BaseHTTPRequestHandler, bytes], Answer]

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


def closed_port() -> int:
    """A loopback port that was free a moment ago: connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class StubServer:
    """Serves ``handler(request, body) -> (status, headers, body)`` on 127.0.0.1."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._request_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def _request_class(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Request(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                body = _read_body(self)
                stub.requests.append((self.command, self.path, dict(self.headers.items())))
                status, headers, answer = stub.handler(self, body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.send_header("Connection", "close")  # no connection outlives a stub
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

            def log_message(self, format: str, *args: object) -> None:
                return None

        return Request

    def __enter__(self) -> StubServer:
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
        self._thread.join(timeout=5)


def _read_body(request: BaseHTTPRequestHandler) -> bytes:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while size := int(request.rfile.readline().split(b";")[0], 16):
            chunks.append(request.rfile.read(size))
            request.rfile.readline()
        while request.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers end with an empty line
        return b"".join(chunks)
    return request.rfile.read(int(request.headers.get("Content-Length") or 0))


def forwarding(upstream: str, *, drop: set[str]) -> Handler:
    """Forward every request to ``upstream`` without the headers named in ``drop``."""
    target = urlsplit(upstream)
    dropped = {name.lower() for name in drop} | _HOP_BY_HOP | {"content-length"}

    def handle(request: BaseHTTPRequestHandler, body: bytes) -> Answer:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in dropped}
        headers["Content-Length"] = str(len(body))
        connection = http.client.HTTPConnection(target.hostname or "", target.port, timeout=30)
        try:
            connection.request(request.command, request.path, body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
            kept = {
                k: v
                for k, v in response.getheaders()
                if k.lower() not in _HOP_BY_HOP | {"content-length"}
            }
            return response.status, kept, answer
        finally:
            connection.close()

    return handle


def _s3_error(status: int, code: str, message: str) -> Answer:
    xml = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>stub</RequestId></Error>"
    )
    return status, {"Content-Type": "application/xml"}, xml.encode()


def not_implementing(header: str) -> Handler:
    """Answer 501 to requests with ``header``; 200 with an empty body to the rest."""

    def handle(request: BaseHTTPRequestHandler, body: bytes) -> Answer:
        if header in request.headers:
            message = "A header you provided implies functionality that is not implemented"
            return _s3_error(501, "NotImplemented", message)
        return 200, {}, b""

    return handle


def denying() -> Handler:
    """Refuse everything as AWS refuses unknown credentials."""

    def handle(request: BaseHTTPRequestHandler, body: bytes) -> Answer:
        if request.headers.get("X-Amz-Target", "").startswith("DynamoDB_"):
            error = {
                "__type": "com.amazonaws.dynamodb.v20120810#UnrecognizedClientException",
                "message": "The security token included in the request is invalid.",
            }
            return 400, {"Content-Type": "application/x-amz-json-1.0"}, json.dumps(error).encode()
        message = "The AWS Access Key Id you provided does not exist in our records."
        return _s3_error(403, "InvalidAccessKeyId", message)

    return handle
