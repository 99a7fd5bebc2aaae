"""The README's "What the tests run on" table names every test module.

A module is named by its own row (``test_x``, or ``folder/test_x`` for the
compactor's) or by its folder's row (``storage/``), so a new test file fails
here until the table says what it runs on.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def table_rows() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### What the tests run on") :]
    section = section[: section.find("\n#", 1)] if "\n#" in section[1:] else section
    return [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]


def test_every_test_module_is_in_the_table() -> None:
    named = {name for row in table_rows() for name in re.findall(r"`([\w/]+)`", row)}
    missing = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        parts = path.relative_to(ROOT / "tests").with_suffix("").parts
        folder = f"{parts[0]}/" if len(parts) > 1 else None
        if path.stem in named or folder in named or "/".join(parts) in named:
            continue
        missing.append("/".join(parts))
    assert not missing, f"not in the README's table of what the tests run on: {missing}"
