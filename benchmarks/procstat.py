"""CPU seconds of a process and this process's peak RSS, from ``/proc`` (light: the child
processes import it too)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

__all__ = ["peak_rss_mb", "process_cpu"]


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of a process, 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb() -> float:
    """This process's own peak RSS: ``VmHWM``, the high-water mark of its address space.

    Not ``ru_maxrss``: Linux carries that across ``exec`` from the forked
    parent, so a child of a large benchmark process would report the
    parent's size.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
