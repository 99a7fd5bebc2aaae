"""An embedded S3 + DynamoDB endpoint on loopback, for the demo and tests.

It runs moto's server in a child process (an in-process server would
share the GIL with the code it serves) on ``127.0.0.1`` and a free port,
and speaks the real wire protocol: deltalog talks to it exactly as it
talks to AWS. Nothing it stores survives ``stop()``.

moto's backends are not thread-safe, and its server handles each connection
in a thread: two concurrent ``ADD next_seq 1`` could return the same value,
and two concurrent ``PutObject If-None-Match: *`` of one key could both
succeed. The child therefore serves one request at a time (connections stay
kept alive), which makes counters and conditional writes atomic, as in AWS.
A request's body is read in full before its turn: a client that stops
mid-request (a process paused with ``SIGSTOP``, a dropped connection) holds
up only itself, as on AWS, not every other client of the endpoint.

``min_part_size`` lowers S3's 5 MiB minimum for a multipart upload's parts
(all but the last), so tests can stream archives of many small parts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import TracebackType

from deltalog.errors import ConfigurationError

__all__ = ["EmbeddedEndpoint", "FAKE_CREDENTIALS"]

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


_SERVER = """
import io, sys, threading
from werkzeug.serving import make_server
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication, MotoRequestHandler, create_backend_app,
)
app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()
def body(environ):
    stream = environ["wsgi.input"]
    if environ.get("wsgi.input_terminated"):
        return stream.read()
    length = int(environ.get("CONTENT_LENGTH") or 0)
    return stream.read(length) if length > 0 else b""
def serialized(environ, start_response):
    environ["wsgi.input"] = io.BytesIO(body(environ))
    with lock:
        return list(app(environ, start_response))
make_server(
    sys.argv[1], int(sys.argv[2]), serialized, threaded=True, request_handler=MotoRequestHandler
).serve_forever()
"""
"""moto's server, one request at a time (see the module docstring)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedEndpoint:
    """moto's server as a child process; ``url`` once started."""

    def __init__(
        self,
        *,
        startup_timeout: float = 30.0,
        min_part_size: int | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        """``port`` 0 picks a free one (``url`` says which, once started)."""
        self.startup_timeout = startup_timeout
        self.min_part_size = min_part_size
        self.host = host
        self.port = port
        self._fixed_port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        """Start the server and wait until it answers; return its URL."""
        for _ in range(1 if self._fixed_port else 3):
            self.port = self._fixed_port or _free_port()
            self._process = subprocess.Popen(
                [sys.executable, "-c", _SERVER, self.host, str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=self._environment(),
            )
            if self._wait_ready():
                return self.url
            self.stop()
        taken = f" (is port {self._fixed_port} free?)" if self._fixed_port else ""
        raise ConfigurationError(
            f"could not start the embedded S3/DynamoDB endpoint (moto server){taken}; "
            "is the 'moto[server]' package installed?"
        )

    def _environment(self) -> dict[str, str]:
        env = {**os.environ, **FAKE_CREDENTIALS, "PYTHONUNBUFFERED": "1"}
        if self.min_part_size is not None:
            env["S3_UPLOAD_PART_MIN_SIZE"] = str(self.min_part_size)
            env.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(5 * 1024 * 1024 - 1024))
        return env

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                    return True
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def reset(self) -> None:
        """Forget everything stored (moto's reset API)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def __enter__(self) -> EmbeddedEndpoint:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
