"""A fault-injecting HTTP proxy for the S3 and DynamoDB endpoint, on loopback.

``FaultProxy`` sits between deltalog and the endpoint (point a
``LogConfig(endpoint_url=proxy.url)`` at it) and, request by request, either
forwards faithfully or injects a **fault**:

- **refusals** (nothing reaches the endpoint, nothing happens):
  ``THROTTLE`` (S3 ``503 SlowDown``, DynamoDB ``400
  ProvisionedThroughputExceededException``), ``INTERNAL_ERROR`` (500),
  ``UNAVAILABLE`` (503), ``RESET`` (the connection is reset);
- **ambiguous** faults (the request is forwarded and takes effect, the answer
  is lost): ``DROP`` (the connection closes without an answer), ``TRUNCATE``
  (part of the answer, then the connection closes);
- ``DELAY``: forwarded and answered, late (or, scripted with ``until``, held
  until the caller lets it go).

Each request is named by its **operation**: DynamoDB's from the
``X-Amz-Target`` header (``UpdateItem``, ``GetItem``,
``TransactWriteItems``, ...), S3's from the method, path and query
(``PutObject``, ``GetObject``, ``ListObjectsV2``, ...). Faults come from a
**script** (queued for the next matching requests) or, failing that, from a
seeded random ``FaultPolicy``: a fault rate per operation and the share of
faults that are ambiguous. ``statistics()`` counts what was injected.

botocore retries under deltalog's own (standard mode: 3 retries, 4 attempts):
a fault usually reaches deltalog only when botocore's attempts are spent, or
as the 412 of a retried conditional write whose first attempt landed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import random
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

__all__ = ["Fault", "FaultPolicy", "FaultProxy", "FaultStatistics", "Request"]

_LIMIT = 1 << 20
_REFUSALS_BODY = "injected by deltalog.faults"


class Fault(enum.Enum):
    THROTTLE = "throttle"
    INTERNAL_ERROR = "internal-error"
    UNAVAILABLE = "unavailable"
    RESET = "reset"
    DROP = "drop"
    TRUNCATE = "truncate"
    DELAY = "delay"

    @property
    def ambiguous(self) -> bool:
        """True when the request took effect although its answer is lost."""
        return self in (Fault.DROP, Fault.TRUNCATE)


REFUSALS = (Fault.THROTTLE, Fault.INTERNAL_ERROR, Fault.UNAVAILABLE, Fault.RESET)
AMBIGUOUS = (Fault.DROP, Fault.TRUNCATE)


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the proxy saw it."""

    service: str
    """``s3``, ``dynamodb`` or ``moto`` (moto's own API: never faulted)."""
    operation: str
    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    """Lower-cased names."""
    body: bytes


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """Seeded random faults: ``rate`` of the requests (``rates`` per operation)."""

    rate: float = 0.0
    ambiguous: float = 0.5
    """The share of faults drawn from ``AMBIGUOUS`` rather than ``REFUSALS``."""
    rates: Mapping[str, float] = field(default_factory=dict)
    delay_rate: float = 0.0
    """The share of the other requests answered late, by up to ``max_delay`` s."""
    max_delay: float = 0.05

    def choose(self, request: Request, rng: random.Random) -> tuple[Fault, float] | None:
        if rng.random() < self.rates.get(request.operation, self.rate):
            kinds = AMBIGUOUS if rng.random() < self.ambiguous else REFUSALS
            return rng.choice(kinds), 0.0
        if self.delay_rate and rng.random() < self.delay_rate:
            return Fault.DELAY, rng.uniform(0, self.max_delay)
        return None


@dataclass(slots=True)
class _Scripted:
    fault: Fault
    operation: str | None
    when: Callable[[Request], bool] | None
    times: int
    delay: float
    until: Callable[[], Awaitable[object]] | None = None

    def matches(self, request: Request) -> bool:
        return (self.operation is None or self.operation == request.operation) and (
            self.when is None or self.when(request)
        )


@dataclass(frozen=True, slots=True)
class FaultStatistics:
    requests: int
    forwarded: int
    operations: dict[str, int]
    """Requests by operation."""
    faults: dict[str, int]
    """Faults injected, by kind (``Fault.value``)."""
    by_operation: dict[str, int]
    """Faults (delays excluded) by operation."""
    by_service: dict[str, int]
    """Faults (delays excluded) by service."""

    @property
    def injected(self) -> int:
        return sum(n for kind, n in self.faults.items() if kind != Fault.DELAY.value)

    @property
    def ambiguous(self) -> int:
        return sum(self.faults.get(kind.value, 0) for kind in AMBIGUOUS)


class FaultProxy:
    """The proxy; use as ``async with FaultProxy(upstream) as proxy`` (``proxy.url``)."""

    def __init__(self, upstream: str, *, policy: FaultPolicy | None = None, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"the upstream must be an http:// URL, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.policy = policy
        self.rng = random.Random(seed)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._script: list[_Scripted] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._closing = False
        self._requests = self._forwarded = 0
        self._operations: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._by_operation: Counter[str] = Counter()
        self._by_service: Counter[str] = Counter()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.url

    async def aclose(self) -> None:
        """Stop listening and cut every open connection.

        A connection accepted in the last instant has its ``_serve`` task still to
        run: the proxy yields to it (it closes the connection at once) and cuts
        again, so no connection outlives the proxy.
        """
        self._closing = True
        if self._server is not None:
            self._server.close()
        for _ in range(2):
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await asyncio.sleep(0)  # a connection accepted just now starts, sees closing
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def script(
        self,
        fault: Fault,
        *,
        operation: str | None = None,
        when: Callable[[Request], bool] | None = None,
        times: int = 1,
        delay: float = 0.0,
        until: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """Inject ``fault`` into the next ``times`` requests that match (before the policy).

        With ``Fault.DELAY``, ``until`` holds each request until it returns
        (after ``delay``): a request that hangs until the caller lets it go.
        """
        if until is not None and fault is not Fault.DELAY:
            raise ValueError("until holds a request: it needs Fault.DELAY")
        self._script.append(_Scripted(fault, operation, when, times, delay, until))

    def pending(self) -> int:
        """Scripted faults not injected yet."""
        return sum(s.times for s in self._script)

    def statistics(self) -> FaultStatistics:
        return FaultStatistics(
            self._requests,
            self._forwarded,
            dict(self._operations),
            dict(self._faults),
            dict(self._by_operation),
            dict(self._by_service),
        )

    def _choose(self, request: Request) -> _Scripted | None:
        if request.service == "moto":
            return None
        for scripted in self._script:
            if scripted.matches(request):
                scripted.times -= 1
                if not scripted.times:
                    self._script.remove(scripted)
                return scripted
        chosen = self.policy.choose(request, self.rng) if self.policy else None
        return _Scripted(chosen[0], None, None, 1, chosen[1]) if chosen else None

    def _count(self, request: Request, fault: Fault) -> None:
        self._faults[fault.value] += 1
        if fault is not Fault.DELAY:
            self._by_operation[request.operation] += 1
            self._by_service[request.service] += 1

    # -- connections ----------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        upstream = _Upstream(*self.upstream)
        try:
            while not self._closing and await self._exchange(reader, writer, upstream):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # the client went away or spoke nonsense: drop the connection
        except asyncio.CancelledError:
            pass  # aclose() cuts the connection; nothing awaits this root task
        finally:
            self._connections.discard(task)
            upstream.close()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: _Upstream
    ) -> bool:
        """Serve one request; False when the client connection must close."""
        head = await _read_head(reader)
        if head is None:
            return False
        if b"100-continue" in head.lower():
            # botocore waits for it before sending a PutObject body.
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            head = _without_header(head, b"expect")
        body, _ = await _read_body(reader, head, head_request=False, response=False)
        request = _describe(head, body)
        self._requests += 1
        self._operations[request.operation] += 1
        choice = self._choose(request)
        fault = choice.fault if choice else None
        if fault is not None:
            self._count(request, fault)
        if fault in REFUSALS:
            return await self._refuse(request, fault, writer)
        if choice is not None and fault is Fault.DELAY:
            await asyncio.sleep(choice.delay)
            if choice.until is not None:
                await choice.until()
        answer, keep = await upstream.exchange(head + body, head_request=request.method == "HEAD")
        self._forwarded += 1
        if fault is Fault.DROP:
            return False
        if fault is Fault.TRUNCATE:
            writer.write(answer[: self._cut(answer)])
            await writer.drain()
            return False
        writer.write(answer)
        await writer.drain()
        return keep and b"connection: close" not in head.lower()

    async def _refuse(self, request: Request, fault: Fault, writer: asyncio.StreamWriter) -> bool:
        if fault is Fault.RESET:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        writer.write(_error_answer(request, fault))
        await writer.drain()
        return True

    def _cut(self, answer: bytes) -> int:
        """Where to cut an answer: inside the body, or inside the head if there is none."""
        head_end = answer.find(b"\r\n\r\n") + 4
        if len(answer) > head_end:
            return self.rng.randrange(head_end, len(answer))
        return self.rng.randrange(1, head_end)


class _Upstream:
    """One kept-alive connection to the endpoint, opened when needed."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def exchange(self, request: bytes, *, head_request: bool) -> tuple[bytes, bool]:
        """Send a request, return the raw answer and whether the connection stays open."""
        reused = self._streams is not None
        try:
            return await self._exchange(request, head_request)
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.close()
            # A kept-alive connection the endpoint had closed before reading
            # the request: send it again, once, on a fresh connection.
            if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise
            return await self._exchange(request, head_request)

    async def _exchange(self, request: bytes, head_request: bool) -> tuple[bytes, bool]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(*self.address, limit=_LIMIT)
        reader, writer = self._streams
        writer.write(request)
        await writer.drain()
        while True:
            head = await _read_head(reader)
            if head is None:
                raise asyncio.IncompleteReadError(b"", None)
            body, to_eof = await _read_body(reader, head, head_request=head_request, response=True)
            if not head.startswith(b"HTTP/1.1 1"):  # skip interim 1xx answers
                break
        keep = not to_eof and b"connection: close" not in head.lower()
        keep = keep and head.startswith(b"HTTP/1.1")
        if not keep:
            self.close()
        return head + body, keep

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The head of the next message; None at a clean EOF."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise


async def _read_body(
    reader: asyncio.StreamReader, head: bytes, *, head_request: bool, response: bool
) -> tuple[bytes, bool]:
    """The raw body after ``head``, and whether it ran to EOF."""
    headers = _headers(head)
    status = int(head.split(b" ", 2)[1]) if response else 0
    if head_request or 100 <= status < 200 or status in (204, 304):
        return b"", False
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader), False
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"])), False
    if not response:
        return b"", False
    return await reader.read(), True


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    raw = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        raw += line
        size = int(line.split(b";")[0], 16)
        if size == 0:
            break
        raw += await reader.readexactly(size + 2)
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        raw += line
    return bytes(raw + b"\r\n")


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {name.strip().lower(): value.strip() for name, value in pairs}


def _without_header(head: bytes, name: bytes) -> bytes:
    lines = head.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(name + b":"))


def _describe(head: bytes, body: bytes) -> Request:
    method, target = head.split(b" ", 2)[:2]
    parts = urlsplit(target.decode("latin-1"))
    headers = _headers(head)
    method_name = method.decode("latin-1")
    service, operation = _operation(method_name, parts.path, parts.query, headers)
    return Request(service, operation, method_name, parts.path, parts.query, headers, body)


def _operation(method: str, path: str, query: str, headers: Mapping[str, str]) -> tuple[str, str]:
    target = headers.get("x-amz-target", "")
    if target.startswith("DynamoDB_"):
        return "dynamodb", target.split(".", 1)[1]
    if path.startswith("/moto-api"):
        return "moto", "moto-api"
    params = parse_qs(query, keep_blank_values=True)
    on_object = len([p for p in path.split("/") if p]) > 1
    if method == "GET" and not on_object:
        return "s3", "ListObjectsV2" if params.get("list-type") == ["2"] else "ListObjects"
    if method == "POST" and "delete" in params:
        return "s3", "DeleteObjects"
    noun = "Object" if on_object else "Bucket"
    verb = {"GET": "Get", "PUT": "Put", "HEAD": "Head", "DELETE": "Delete"}.get(method, method)
    if noun == "Bucket" and verb == "Put":
        verb = "Create"
    return "s3", f"{verb}{noun}"


_S3_ERRORS = {
    Fault.THROTTLE: (503, "Service Unavailable", "SlowDown"),
    Fault.INTERNAL_ERROR: (500, "Internal Server Error", "InternalError"),
    Fault.UNAVAILABLE: (503, "Service Unavailable", "ServiceUnavailable"),
}
_DYNAMODB = "com.amazonaws.dynamodb.v20120810#"
_DYNAMODB_ERRORS = {
    Fault.THROTTLE: (400, "Bad Request", _DYNAMODB + "ProvisionedThroughputExceededException"),
    Fault.INTERNAL_ERROR: (500, "Internal Server Error", _DYNAMODB + "InternalServerError"),
    Fault.UNAVAILABLE: (503, "Service Unavailable", _DYNAMODB + "ServiceUnavailable"),
}


def _error_answer(request: Request, fault: Fault) -> bytes:
    """The answer the real service gives when it refuses a request this way."""
    if request.service == "dynamodb":
        status, reason, code = _DYNAMODB_ERRORS[fault]
        body = json.dumps({"__type": code, "message": _REFUSALS_BODY}).encode()
        kind = "application/x-amz-json-1.0"
    else:
        status, reason, code = _S3_ERRORS[fault]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{_REFUSALS_BODY}</Message>"
            f"<Resource>{request.path}</Resource><RequestId>0</RequestId></Error>"
        ).encode()
        kind = "application/xml"
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(body)}\r\nx-amzn-RequestId: 0\r\n\r\n"
    )
    return head.encode() + body
