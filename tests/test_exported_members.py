"""The public API exports exactly what the docs name, each the object its module defines."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

import compactor
import deltalog

README = Path(__file__).parents[1] / "README.md"

DOCUMENTED = {
    deltalog: {
        "LogConfig",
        "DeltaLog",
        "Delta",
        "Upsert",
        "Delete",
        "UpdateMetadata",
        "Reader",
        "Producer",
        "LogReader",
        "ReadEnd",
        "DeltalogError",
        "ValidationError",
    },
    compactor: {"Compactor", "CompactionResult", "Limits"},
}

PACKAGES = [deltalog, compactor]


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_documented_names_are_exported(package: ModuleType) -> None:
    missing = DOCUMENTED[package] - set(package.__all__)
    assert not missing, missing


def home_of(package: ModuleType, name: str, obj: object) -> str:
    """The submodule that defines ``obj``: its ``__module__``, or (a type alias such
    as ``Entry = Batch | Seal``) the submodule that binds it to ``name``."""
    home = getattr(obj, "__module__", "")
    if isinstance(home, str) and home.startswith(f"{package.__name__}."):
        return home
    owners = sorted(
        module
        for module, loaded in sys.modules.items()
        if module.startswith(f"{package.__name__}.") and vars(loaded).get(name) is obj
    )
    assert owners, f"{package.__name__}.{name} is defined in no submodule"
    return owners[0]


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_export_is_the_object_its_module_defines(package: ModuleType) -> None:
    """``package.X`` is ``X`` of the submodule that defines it, under the same name."""
    assert len(set(package.__all__)) == len(package.__all__), "no name twice"
    for name in package.__all__:
        obj = getattr(package, name)
        home = home_of(package, name, obj)
        assert getattr(obj, "__name__", name) == name, f"{name} is an alias of {obj.__name__}"
        assert getattr(sys.modules[home], name) is obj, f"{name} is not {home}.{name}"


def readme_imports() -> list[tuple[str, list[str]]]:
    """``from deltalog... import a, b`` and ``from compactor... import ...`` in the README."""
    found = re.findall(
        r"^from ((?:deltalog|compactor)[\w.]*) import (.+)$", README.read_text(), re.M
    )
    return [(module, [n.strip() for n in names.split(",")]) for module, names in found]


def test_the_readme_imports_work() -> None:
    imports = readme_imports()
    log_api = {"LogConfig", "DeltaLog", "Delta", "Upsert", "Delete", "UpdateMetadata"}
    assert any(module == "deltalog" and log_api <= set(names) for module, names in imports)
    assert any(module == "deltalog" and "Reader" in names for module, names in imports)
    assert any(module == "compactor" and "Compactor" in names for module, names in imports)
    for module, names in imports:
        imported = importlib.import_module(module)
        for name in names:
            assert hasattr(imported, name), f"from {module} import {name}"
            if module in ("deltalog", "compactor"):
                assert name in imported.__all__, f"{module}.__all__ lacks {name}"
