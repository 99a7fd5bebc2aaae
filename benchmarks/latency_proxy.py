"""A loopback proxy that adds 20-100 ms to every request, like S3 seen from the same region.

It relays TCP between clients and an upstream HTTP server (moto) and holds
the first bytes a client sends after the server last spoke for a random
delay, uniform in ``[low, high]`` ms. HTTP/1.1 clients send one request at a
time per connection and wait for its answer, so that is one delay per
request, whatever the body's framing (``Content-Length`` or chunked). An
interim ``100 Continue`` (botocore asks for one on every S3 upload) does not
end the request: its body goes on without a second delay.

It runs in a child process (``LatencyProxy``), so relaying costs the
benchmark's process nothing: ``python -m benchmarks.latency_proxy
--upstream http://127.0.0.1:PORT`` prints ``listening PORT`` once ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

__all__ = ["LatencyProxy", "serve"]

_CHUNK = 1 << 18
_CONTINUE = b"HTTP/1.1 100 "
_ROOT = Path(__file__).resolve().parent.parent
"""Where ``python -m benchmarks.latency_proxy`` finds the package."""


class _Turn:
    """Whose turn it is on one connection: a new request starts when the client speaks next."""

    def __init__(self) -> None:
        self.new_request = True


async def _client_to_upstream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    turn: _Turn,
    delay: tuple[float, float],
    rng: random.Random,
) -> None:
    while data := await reader.read(_CHUNK):
        if turn.new_request:
            turn.new_request = False
            await asyncio.sleep(rng.uniform(*delay))
        writer.write(data)
        await writer.drain()


async def _upstream_to_client(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, turn: _Turn
) -> None:
    while data := await reader.read(_CHUNK):
        if not data.startswith(_CONTINUE):  # an interim answer: the request goes on
            turn.new_request = True
        writer.write(data)
        await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream: tuple[str, int],
    delay: tuple[float, float],
    rng: random.Random,
) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection(*upstream)
    except OSError:
        await _close(client_writer)
        return
    turn = _Turn()
    pumps = [
        asyncio.ensure_future(_client_to_upstream(client_reader, up_writer, turn, delay, rng)),
        asyncio.ensure_future(_upstream_to_client(up_reader, client_writer, turn)),
    ]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    except OSError:
        pass
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await _close(up_writer)
        await _close(client_writer)


async def serve(
    upstream: str, *, low_ms: float, high_ms: float, port: int = 0, seed: int = 0
) -> None:
    """Relay ``127.0.0.1:port`` to ``upstream`` until cancelled; print ``listening PORT``."""
    target = urlsplit(upstream)
    host, up_port = target.hostname or "127.0.0.1", target.port or 80
    delay = (low_ms / 1000, high_ms / 1000)
    rng = random.Random(seed)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _relay(reader, writer, (host, up_port), delay, rng)

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening {bound}", flush=True)
    async with server:
        await server.serve_forever()


class LatencyProxy:
    """The proxy in a child process; ``url`` once started. Use as a context manager."""

    def __init__(self, upstream: str, *, low_ms: float = 20.0, high_ms: float = 100.0) -> None:
        if not 0 <= low_ms <= high_ms:
            raise ValueError("need 0 <= low_ms <= high_ms")
        self.upstream = upstream
        self.low_ms = low_ms
        self.high_ms = high_ms
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        command = [sys.executable, "-m", "benchmarks.latency_proxy", "--upstream", self.upstream]
        command += ["--low-ms", str(self.low_ms), "--high-ms", str(self.high_ms)]
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, cwd=_ROOT
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline().split()
        if len(line) != 2 or line[0] != "listening":
            self.stop()
            raise RuntimeError(f"the latency proxy did not start (said {line!r})")
        self.port = int(line[1])
        return self.url

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
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> LatencyProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency_proxy")
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:5000")
    parser.add_argument("--low-ms", type=float, default=20.0)
    parser.add_argument("--high-ms", type=float, default=100.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                args.upstream,
                low_ms=args.low_ms,
                high_ms=args.high_ms,
                port=args.port,
                seed=args.seed,
            )
        )


if __name__ == "__main__":
    main()
