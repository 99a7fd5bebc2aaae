"""A real Chroma server for tests: ``chroma run`` in a child process on loopback.

``ChromaServer`` starts the ``chroma`` command that ships with chromadb
(offline: it needs no network) on a free port, waits until it answers its
heartbeat, and kills it on exit. ``new_database`` creates a database of its
own for one test, so tests share a server without sharing state.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from deltalog.snapshot.server import close_http_session

__all__ = ["ChromaServer", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _chroma_command() -> str:
    beside = Path(sys.executable).parent / "chroma"
    return str(beside) if beside.exists() else (shutil.which("chroma") or "chroma")


class ChromaServer:
    """``chroma run --path DIR --port P``; use as a context manager."""

    def __init__(self, path: Path, *, port: int | None = None, startup: float = 60.0) -> None:
        self.path = path
        self.port = port or free_port()
        self.startup = startup
        self.process: subprocess.Popen[bytes] | None = None
        self._log = path.parent / f"chroma-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [_chroma_command(), "run", "--path", str(self.path), "--port", str(self.port)]
        with self._log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chroma run exited: {self._log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/api/v2/heartbeat", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"chroma run did not answer within {self.startup}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None

    def __enter__(self) -> ChromaServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def new_database(self, tenant: str = "default_tenant") -> str:
        """A fresh, empty database on this server."""
        name = f"db{uuid.uuid4().hex[:12]}"
        answer = httpx.post(
            f"{self.url}/api/v2/tenants/{tenant}/databases", json={"name": name}, timeout=30
        )
        answer.raise_for_status()
        return name

    @contextmanager
    def client(self, database: str, tenant: str = "default_tenant") -> Iterator[Any]:
        """A plain ``chromadb.HttpClient`` on one database, closed on exit."""
        import chromadb
        from chromadb.config import Settings

        client: Any = chromadb.HttpClient(
            host="127.0.0.1",
            port=self.port,
            tenant=tenant,
            database=database,
            settings=Settings(anonymized_telemetry=False),
        )
        try:
            yield client
        finally:
            client.close()
            close_http_session(client)
