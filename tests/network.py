"""No network: a guard that refuses every connection and name lookup off loopback.

``no_network()`` patches ``socket.socket.connect``/``connect_ex`` and
``socket.getaddrinfo`` in this process (every thread): a connection or a
lookup of anything but a loopback address raises ``NetworkBlocked`` and is
recorded in ``attempts``, so a test can also assert that nothing tried even
when the code under test swallowed the error. ``loopback=False`` refuses
loopback too (for code that should touch no socket at all).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

__all__ = ["NetworkBlocked", "NetworkGuard", "no_network"]

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class NetworkBlocked(OSError):
    """A connection or lookup the test forbids."""


class NetworkGuard:
    def __init__(self, *, loopback: bool) -> None:
        self.loopback = loopback
        self.attempts: list[str] = []

    def allowed(self, host: object) -> bool:
        if not self.loopback:
            return False
        if isinstance(host, str) and host.lower() in _LOCAL_NAMES:
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    def refuse(self, what: str) -> NetworkBlocked:
        self.attempts.append(what)
        return NetworkBlocked(f"network access in a test that forbids it: {what}")


@contextmanager
def no_network(*, loopback: bool = True) -> Iterator[NetworkGuard]:
    """Refuse connections and lookups off loopback (or all, ``loopback=False``)."""
    guard = NetworkGuard(loopback=loopback)
    connect, connect_ex, getaddrinfo = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.getaddrinfo,
    )

    def host_of(address: Any) -> object:
        return address[0] if isinstance(address, tuple) else address

    def guarded_connect(sock: socket.socket, address: Any) -> None:
        if sock.family == socket.AF_UNIX or guard.allowed(host_of(address)):
            return connect(sock, address)
        raise guard.refuse(f"connect {address!r}")

    def guarded_connect_ex(sock: socket.socket, address: Any) -> int:
        if sock.family == socket.AF_UNIX or guard.allowed(host_of(address)):
            return connect_ex(sock, address)
        raise guard.refuse(f"connect_ex {address!r}")

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is None or guard.allowed(host):
            return getaddrinfo(host, *args, **kwargs)
        raise guard.refuse(f"getaddrinfo {host!r}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", guarded_connect)
        patch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
        patch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
        yield guard
