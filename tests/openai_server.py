"""A local OpenAI-compatible embeddings server for tests of the real client.

``OpenAIServer`` serves ``POST /v1/embeddings`` on 127.0.0.1 (port 0) from a
thread, speaking the real wire format: ``{"object": "list", "data": [{"object":
"embedding", "index": i, "embedding": ...}], "model": ..., "usage": {...}}``
with each embedding as base64 little-endian float32 when the request's
``encoding_format`` is ``"base64"`` and a list of floats otherwise. Errors use
the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``.

It checks the bearer key (401 ``invalid_api_key`` when wrong), refuses what
the API refuses (empty inputs, more than 2,048 inputs, inputs over the token
limit, counted here as UTF-8 bytes), and can be scripted: ``faults`` are
answered in order before normal service resumes, ``outage_after = n``
serves n more requests and then answers 503 to every one, ``delay`` holds each request, ``shuffle``
returns the data in reverse order, ``floats_only`` ignores
``encoding_format``. Every request is recorded with its timing, and
``max_in_flight`` is the most requests it served at once.

``hold()`` makes every request wait until the test lets one go with
``release()``; with ``wait_for_requests(n)`` a test steps through requests by
events instead of timing them: which ones are held at once is then exactly
what the client sent concurrently.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["API_KEY", "Fault", "OpenAIServer", "RecordedRequest", "vector_for"]

API_KEY = "sk-test-deltalog"


def vector_for(text: str, dim: int) -> npt.NDArray[np.float32]:
    """The server's embedding of ``text``: deterministic, distinct per text."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


@dataclass(frozen=True)
class Fault:
    """One scripted error answer."""

    status: int
    message: str = "scripted fault"
    code: str | None = None
    type: str = "invalid_request_error"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class RecordedRequest:
    inputs: list[str]
    model: str
    encoding_format: str | None
    dimensions: int | None
    authorization: str
    received: float
    responded: float = 0.0
    status: int = 0


class OpenAIServer:
    """See the module docstring. Use as a context manager."""

    def __init__(
        self,
        *,
        dim: int = 8,
        api_key: str = API_KEY,
        max_input_tokens: int = 8191,
        max_request_tokens: int = 300_000,
    ) -> None:
        self.dim = dim
        self.api_key = api_key
        self.max_input_tokens = max_input_tokens
        self.max_request_tokens = max_request_tokens
        self.faults: deque[Fault] = deque()
        self.outage_after: int | None = None
        self.delay = 0.0
        self.shuffle = False
        self.floats_only = False
        self.requests: list[RecordedRequest] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._holding = False
        self._permits = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def __enter__(self) -> OpenAIServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def settle(self, quiet: float = 0.1, timeout: float = 5.0) -> None:
        """Wait until nothing arrived or was in flight for ``quiet`` seconds.

        Requests a test cancelled may still reach the server after it ended;
        settling keeps them out of the next test's record.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                last = max((r.received for r in self.requests), default=0.0)
                busy = self._in_flight > 0
            if not busy and time.monotonic() - last >= quiet:
                return
            time.sleep(quiet / 4)
        raise TimeoutError("the fake OpenAI server did not settle")

    def hold(self) -> None:
        """Hold each request from now on until ``release`` lets it go."""
        with self._lock:
            self._holding = True

    def release(self, count: int = 1) -> None:
        """Let ``count`` held (or future) requests be answered."""
        with self._changed:
            self._permits += count
            self._changed.notify_all()

    def wait_for_requests(self, count: int, timeout: float = 30.0) -> None:
        """Block until ``count`` requests have arrived in all (a bound, not a timing)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.requests) >= count, timeout):
                raise TimeoutError(f"{len(self.requests)} requests arrived, waited for {count}")

    def _wait_for_permit(self) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self._permits > 0 or not self._holding, 60):
                raise TimeoutError("a held request was never released")
            if self._holding:
                self._permits -= 1

    def reset(self) -> None:
        with self._changed:
            self._holding = False
            self._permits = 0
            self._changed.notify_all()
            self.faults.clear()
            self.outage_after = None
            self.delay = 0.0
            self.shuffle = False
            self.floats_only = False
            self.requests = []
            self.max_in_flight = 0

    # -- serving ---------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up (a cancelled request)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                status, headers, payload = server._serve(
                    self.path, dict(self.headers.items()), body
                )
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None  # keep test output clean

        return Handler

    def _serve(
        self, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        request = json.loads(body or b"{}")
        inputs = request.get("input")
        record = RecordedRequest(
            inputs=list(inputs) if isinstance(inputs, list) else [inputs],
            model=request.get("model", ""),
            encoding_format=request.get("encoding_format"),
            dimensions=request.get("dimensions"),
            authorization=headers.get("Authorization", headers.get("authorization", "")),
            received=time.monotonic(),
        )
        with self._changed:
            self.requests.append(record)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            fault = self.faults.popleft() if self.faults else self._outage()
            self._changed.notify_all()
        try:
            self._wait_for_permit()
            if self.delay:
                time.sleep(self.delay)
            status, extra, payload = self._answer(path, record, fault)
        finally:
            with self._lock:
                self._in_flight -= 1
        record.status = status
        record.responded = time.monotonic()
        return status, extra, payload

    def _outage(self) -> Fault | None:
        """The outage's answer once ``outage_after`` requests were served (under the lock)."""
        if self.outage_after is None:
            return None
        if self.outage_after > 0:
            self.outage_after -= 1
            return None
        return Fault(503, "The server is overloaded or not ready yet.", None, "server_error")

    def _answer(
        self, path: str, record: RecordedRequest, fault: Fault | None
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        if path.rstrip("/") != "/v1/embeddings":
            return 404, {}, _error(f"unknown path {path}", "not_found", "invalid_request_error")
        if record.authorization != f"Bearer {self.api_key}":
            message = "Incorrect API key provided. You can find your API key in your account."
            return 401, {}, _error(message, "invalid_api_key", "invalid_request_error")
        if fault is not None:
            return fault.status, fault.headers, _error(fault.message, fault.code, fault.type)
        refused = self._refusal(record.inputs)
        if refused is not None:
            return 400, {}, _error(refused, None, "invalid_request_error")
        return 200, {}, self._embeddings(record)

    def _refusal(self, inputs: list[Any]) -> str | None:
        if not inputs or len(inputs) > 2048:
            return "'$.input' is invalid: send 1 to 2048 inputs"
        total = 0
        for i, text in enumerate(inputs):
            if not isinstance(text, str) or not text:
                return f"'$.input[{i}]' is invalid: expected a non-empty string"
            size = len(text.encode())
            if size > self.max_input_tokens:
                return (
                    f"This model's maximum context length is {self.max_input_tokens} tokens, "
                    f"however you requested {size} tokens"
                )
            total += size
        if total > self.max_request_tokens:
            return f"Requested {total} tokens, max {self.max_request_tokens} tokens per request"
        return None

    def _embeddings(self, record: RecordedRequest) -> dict[str, Any]:
        dim = record.dimensions or self.dim
        as_base64 = record.encoding_format == "base64" and not self.floats_only
        data = []
        for index, text in enumerate(record.inputs):
            vector = vector_for(text, dim)
            embedding: Any = (
                base64.b64encode(vector.astype("<f4").tobytes()).decode()
                if as_base64
                else [float(x) for x in vector]
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        if self.shuffle:
            data.reverse()
        tokens = sum(len(t.split()) for t in record.inputs)
        return {
            "object": "list",
            "data": data,
            "model": record.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def _error(message: str, code: str | None, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
