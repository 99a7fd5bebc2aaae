"""The embedded endpoint itself: what its one-request-at-a-time server owes its clients."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import anyio

from deltalog import DeltaLog, LogConfig


async def test_a_client_stalled_mid_request_holds_up_no_other(
    endpoint: str, config: LogConfig
) -> None:
    """A process paused (SIGSTOP) halfway through sending a body stalls only itself."""
    url = urlsplit(endpoint)
    assert url.hostname is not None and url.port is not None
    head = (
        f"PUT /{config.bucket}/{config.keys.prefix}stalled HTTP/1.1\r\n"
        f"Host: {url.netloc}\r\nContent-Length: 1000\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port)) as stalled:
        stalled.sendall(head.encode() + b"x" * 10)  # then nothing: 990 bytes never come
        async with DeltaLog.open(config) as log:
            with anyio.fail_after(20):
                assert await log.head() == 0
                assert await log.store.get(config.keys.entry(1)) is None
