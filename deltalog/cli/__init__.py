"""The ``deltalog`` command line: one module per command group.

| module | commands |
|---|---|
| ``log`` | ``init``, ``status``, ``logs``, ``policy`` |
| ``records`` | ``get``, ``delete`` |
| ``receipts`` | ``generate``, ``ingest``, ``query`` |
| ``compact`` | ``compact [--follow]``, ``rebuild``, ``verify``, ``export``, ``quarantine`` |
| ``reshard`` | ``reshard`` |
| ``demo`` | ``demo`` |
| ``endpoint`` | ``endpoint`` |
| ``soak`` | ``soak`` |
| ``mirror`` | ``mirror`` |
| ``migrate`` | ``import chroma``, ``import pinecone`` |

Shared by them: ``options`` (the location and output flags), ``output``
(tables), ``progress`` (progress displays), ``process`` (exit codes, stopping
on a signal). The command line is the only part of ``deltalog`` that imports
the ``compactor`` package. Exit status: see ``process`` (a ``--bucket`` or
``--root`` that is not the log's, ``IdentityMismatch``, is a configuration error: 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import PackageNotFoundError, version

import anyio

from deltalog.cli import (
    compact,
    demo,
    endpoint,
    log,
    migrate,
    mirror,
    receipts,
    records,
    reshard,
    soak,
)
from deltalog.cli.process import EXIT_BROKEN_PIPE, exit_status
from deltalog.errors import DeltalogError

__all__ = ["build_parser", "main"]

Command = Callable[[argparse.Namespace], Awaitable[int]]

_GROUPS = (log, demo, endpoint, records, receipts, compact, reshard, mirror, migrate, soak)


def _versions() -> str:
    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return f"deltalog {of('deltalog')} (chromadb {of('chromadb')}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltalog", description="An event-sourced delta log on S3, folded into ChromaDB."
    )
    parser.add_argument("--version", action="version", version=_versions())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Command = args.run
    try:
        code: int = anyio.run(run, args)
    except DeltalogError as exc:
        print(f"deltalog: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exit_status(exc)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        if not _broken_pipe(exc):
            raise
        _detach_stdout()
        return EXIT_BROKEN_PIPE
    return code


def _broken_pipe(exc: BaseException) -> bool:
    """Whether ``exc`` is (or only holds) the error of writing to a reader that went away."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_broken_pipe(e) for e in exc.exceptions)
    return isinstance(exc, BrokenPipeError)


def _detach_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush cannot fail again.

    What ``| head`` did not read is dropped silently, as other command line
    tools do (Python's own advice for SIGPIPE; restoring SIGPIPE's default
    action instead would also kill the process on a broken network socket).
    """
    try:
        fileno = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fileno)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
