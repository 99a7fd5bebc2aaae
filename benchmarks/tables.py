"""Plain-text tables for the results: aligned columns, a title, numbers with separators."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["num", "table"]


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a table: a blank line, the title, the headers, a rule, the rows."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return ["", title, line(headers), line(["-" * w for w in widths]), *map(line, rows)]


def num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"
