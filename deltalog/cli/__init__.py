"""The ``deltalog`` command line: one module per command group.

| module | commands |
|---|---|
| ``log`` | ``init``, ``status``, ``policy`` |
| ``receipts`` | ``generate``, ``ingest``, ``query`` |
| ``compact`` | ``compact [--follow]``, ``rebuild``, ``verify``, ``quarantine`` |
| ``demo`` | ``demo`` |
| ``soak`` | ``soak`` |
| ``mirror`` | ``mirror`` |
| ``migrate`` | ``import chroma``, ``import pinecone`` |

Shared by them: ``options`` (the location and output flags), ``output``
(tables), ``progress`` (progress displays), ``process`` (exit codes, stopping
on a signal). The command line is the only part of ``deltalog`` that imports
the ``compactor`` package. Exit status: 0 success, 1 a deltalog error (the
message says what to do), 2 a usage error (also a ``--bucket`` or ``--root``
that is not the log's: ``IdentityMismatch``), 3 lease busy, 4 a check found
differences.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence

import anyio

from deltalog.cli import compact, demo, log, migrate, mirror, receipts, soak
from deltalog.errors import DeltalogError, IdentityMismatch

__all__ = ["build_parser", "main"]

Command = Callable[[argparse.Namespace], Awaitable[int]]

_GROUPS = (log, demo, receipts, compact, mirror, migrate, soak)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltalog", description="An event-sourced delta log on S3, folded into ChromaDB."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Command = args.run
    try:
        code: int = anyio.run(run, args)
    except IdentityMismatch as exc:  # a wrong --bucket or --root: a usage error
        print(f"deltalog: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except DeltalogError as exc:
        print(f"deltalog: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
