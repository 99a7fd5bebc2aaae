"""``Runtime``: one event loop per execution environment, and what stays open on it.

Lambda calls a handler synchronously, many times in one process (a *warm*
execution environment). Opening S3 and DynamoDB clients, a compactor or a
reader on every call would repeat connection set-up and, for readers, the
copy of the snapshot into a working directory. A ``Runtime`` keeps one
event loop running in a thread (an anyio blocking portal) for the life of
the process; handlers run their async work on it with ``call`` and keep
**resources** (async context managers: ``DeltaLog``, ``Compactor``,
``Reader``, an embedder) open across calls with ``resource``.

A resource is kept under a key with a **version** (the ``LogConfig`` it was
opened with): a different version (a rotated signing key) closes the old
one and opens the new. ``reset`` closes everything; handlers call it when a
call fails in a way that may have left a resource broken, so the next call
starts afresh.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, TypeVar, cast

from anyio.from_thread import BlockingPortal, start_blocking_portal

__all__ = ["Runtime"]

log = logging.getLogger("deltalog_lambda")

T = TypeVar("T")


class _Kept:
    def __init__(self, version: Hashable, manager: AbstractContextManager[Any], value: Any) -> None:
        self.version = version
        self.manager = manager
        self.value = value


class Runtime:
    """An event loop in a thread, and the resources kept open on it. ``close()`` when done."""

    def __init__(self) -> None:
        self._portal_manager: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._kept: dict[Hashable, _Kept] = {}

    @property
    def portal(self) -> BlockingPortal:
        if self._portal is None:
            self._portal_manager = start_blocking_portal()
            self._portal = self._portal_manager.__enter__()
        return self._portal

    def call(self, func: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run ``func(*args)`` on the loop and return its result (or raise its error)."""
        return self.portal.call(func, *args)

    def resource(
        self,
        key: Hashable,
        open_: Callable[[], AbstractAsyncContextManager[T]],
        *,
        version: Hashable = None,
    ) -> T:
        """The resource kept under ``key``, entered on the loop if missing or of another version."""
        kept = self._kept.get(key)
        if kept is not None and kept.version == version:
            return cast(T, kept.value)
        if kept is not None:
            self._close(key)
        manager = self.portal.wrap_async_context_manager(open_())
        value = manager.__enter__()
        self._kept[key] = _Kept(version, manager, value)
        return value

    def discard(self, key: Hashable) -> None:
        """Close the resource kept under ``key``, if any."""
        if key in self._kept:
            self._close(key)

    def reset(self) -> None:
        """Close every resource; the next ``resource`` call opens afresh."""
        for key in list(self._kept):
            self._close(key)

    def close(self) -> None:
        """Close every resource and stop the loop."""
        self.reset()
        manager, self._portal_manager, self._portal = self._portal_manager, None, None
        if manager is not None:
            manager.__exit__(None, None, None)

    def _close(self, key: Hashable) -> None:
        kept = self._kept.pop(key)
        try:
            kept.manager.__exit__(None, None, None)
        except Exception as exc:  # closing a broken client must not fail the next call
            log.warning("closing %r failed: %s", key, exc)
