"""The layout's rules, beyond the import-linter contracts in ``pyproject.toml``.

``lint-imports`` (in the test command) enforces the floors and keeps the
compactor out of everything but the command line. This file checks what the
contracts cannot say: no import cycle between any two modules (an import
inside a function counts, one under ``if TYPE_CHECKING:`` does not), and a
small top level.
"""

from __future__ import annotations

from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
MAX_TOP_LEVEL_MODULES = 16


def _cycle(graph: grimp.ImportGraph) -> list[str] | None:
    """One import cycle between the graph's modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == 1:
                return [*path[path.index(imported) :], imported]
            if imported not in state and (found := visit(imported)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph.modules):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycles_between_modules() -> None:
    graph = grimp.build_graph(
        "deltalog", "compactor", "deltalog_lambda", exclude_type_checking_imports=True
    )
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_function_level_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("a", "b", "c"):
        graph.add_module(module)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="c")
    assert _cycle(graph) is None
    graph.add_import(importer="c", imported="a")
    assert _cycle(graph) == ["a", "b", "c", "a"]


def test_the_top_level_of_deltalog_stays_small() -> None:
    modules = sorted(p.name for p in (ROOT / "deltalog").glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules
