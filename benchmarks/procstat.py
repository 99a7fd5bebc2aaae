"""CPU seconds of any process, read from ``/proc`` (light: the child runner imports it too)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["process_cpu"]


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of a process, 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
