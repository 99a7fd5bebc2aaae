"""The command's process: exit codes, stopping on a signal, errors out of task groups.

Exit status: 0 success, 1 a deltalog error (the message says what to do),
2 a usage or configuration error (the flags, the environment or the setup
name something that is not there: fix them, retrying will not help), 3 a
lease (or a mirror's target) is busy, 4 a check (``verify``, ``import
--verify``) found differences, 128 + N stopped by signal N (130: Ctrl-C),
141 the reader of the output went away (``| head``), as other tools do.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.abc

from deltalog.errors import ConfigurationError, DeltalogError

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_BUSY",
    "EXIT_DIFFERENT",
    "EXIT_USAGE",
    "exit_on_signal",
    "exit_status",
    "first_deltalog_error",
    "interruptible",
    "stop_on_signal",
]

T = TypeVar("T")

EXIT_USAGE = 2
EXIT_BUSY = 3
EXIT_DIFFERENT = 4
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def exit_status(exc: DeltalogError) -> int:
    """The exit status of a command that failed with ``exc``."""
    return EXIT_USAGE if isinstance(exc, ConfigurationError) else 1


async def stop_on_signal(
    scope: anyio.CancelScope,
    received: list[signal.Signals] | None = None,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Cancel ``scope`` on SIGINT or SIGTERM (noted in ``received``); started (handlers
    installed) before anything runs."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            print(f"received {signal.Signals(signum).name}: stopping", file=sys.stderr)
            if received is not None:
                received.append(signal.Signals(signum))
            scope.cancel()
            return


async def interruptible(work: Callable[[], Awaitable[T]]) -> T | signal.Signals:
    """``work()``'s result, or the signal (SIGINT, SIGTERM) that cancelled it.

    The cancellation is anyio's, delivered to ``work`` at its next await, so
    its cleanup runs as for any cancellation (shielded steps finish, uploads
    are aborted, leases released) before this returns. Without it, Python's
    KeyboardInterrupt lands wherever the main thread happens to be.
    """
    if threading.current_thread() is not threading.main_thread():
        return await work()  # signal handlers live in the main thread (``main`` in a worker)
    received: list[signal.Signals] = []
    done: list[T] = []
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(stop_on_signal, tg.cancel_scope, received)
            done.append(await work())
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:  # work's own failure, as it raised it
            raise group.exceptions[0] from None
        raise
    return done[0] if done else received[0]


def exit_on_signal(signum: signal.Signals) -> int:
    """The exit status of a command stopped by ``signum``: 128 + its number, as shells say."""
    return 128 + int(signum)


def first_deltalog_error(group: BaseExceptionGroup[Exception]) -> DeltalogError | None:
    """The first ``DeltalogError`` in a (nested) exception group."""
    for exc in group.exceptions:
        if isinstance(exc, DeltalogError):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := first_deltalog_error(exc)):
            return found
    return None
