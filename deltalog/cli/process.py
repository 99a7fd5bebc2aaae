"""The command's process: exit codes, stopping on a signal, errors out of task groups.

Exit status: 0 success, 1 a deltalog error (the message says what to do),
2 a usage error, 3 a lease (or a mirror's target) is busy, 4 a check
(``verify``, ``import --verify``) found differences.
"""

from __future__ import annotations

import signal
import sys

import anyio
import anyio.abc

from deltalog.errors import DeltalogError

__all__ = ["EXIT_BUSY", "EXIT_DIFFERENT", "first_deltalog_error", "stop_on_signal"]

EXIT_BUSY = 3
EXIT_DIFFERENT = 4


async def stop_on_signal(
    scope: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Cancel ``scope`` on SIGINT or SIGTERM; started (handlers installed) before anything runs."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            print(f"received {signal.Signals(signum).name}: stopping", file=sys.stderr)
            scope.cancel()
            return


def first_deltalog_error(group: BaseExceptionGroup[Exception]) -> DeltalogError | None:
    """The first ``DeltalogError`` in a (nested) exception group."""
    for exc in group.exceptions:
        if isinstance(exc, DeltalogError):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := first_deltalog_error(exc)):
            return found
    return None
