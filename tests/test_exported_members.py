"""The public API exports exactly what the docs name."""

from __future__ import annotations

import deltalog

DOCUMENTED = {
    "LogConfig",
    "DeltaLog",
    "Delta",
    "Upsert",
    "Delete",
    "UpdateMetadata",
    "Producer",
    "LogReader",
    "ReadEnd",
    "DeltalogError",
    "ValidationError",
}


def test_documented_names_are_exported() -> None:
    missing = DOCUMENTED - set(deltalog.__all__)
    assert not missing, missing


def test_all_names_resolve() -> None:
    for name in deltalog.__all__:
        assert getattr(deltalog, name) is not None, name
