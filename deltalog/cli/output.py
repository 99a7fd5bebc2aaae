"""Tables on stdout, drawn with ``rich``.

A terminal gets aligned columns with a header rule; a pipe gets the same
columns as plain text (no colour, no box characters), wide enough never to
wrap. ``--json`` output never goes through here.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable, Sequence
from typing import IO

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table

__all__ = ["print_fields", "print_table"]

_PIPE_WIDTH = 240


def _print(renderable: RenderableType, stream: IO[str] | None) -> None:
    stream = stream if stream is not None else sys.stdout
    if stream.isatty():
        Console(file=stream, highlight=False).print(renderable)
        return
    console = Console(file=io.StringIO(), width=_PIPE_WIDTH, highlight=False, color_system=None)
    with console.capture() as capture:
        console.print(renderable)
    lines = capture.get().splitlines()
    stream.write("".join(line.rstrip() + "\n" for line in lines))
    stream.flush()


def print_fields(
    rows: Iterable[tuple[str, object]], *, title: str | None = None, stream: IO[str] | None = None
) -> None:
    """Name/value pairs, one per line, the values aligned."""
    table = Table.grid(padding=(0, 1))
    table.title = title
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in rows:
        table.add_row(name, str(value))
    _print(table, stream)


def print_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    title: str | None = None,
    right: Sequence[str] = (),
    stream: IO[str] | None = None,
) -> None:
    """Rows under a header; columns named in ``right`` are right-aligned (numbers)."""
    tty = (stream if stream is not None else sys.stdout).isatty()
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD if tty else box.ASCII2,
        show_edge=False,
        pad_edge=False,
    )
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    _print(table, stream)
