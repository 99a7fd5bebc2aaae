"""The soak's own checks: they must catch a lost or a duplicated delta.

The soak itself (``deltalog soak --minutes N``) is too long for CI; its parts
run here and in ``tests/storage/test_faults.py`` / ``tests/compactor/test_crashes.py``.
"""

from __future__ import annotations

import numpy as np

from deltalog.cli.soak import Ledger, compactor_errors, random_delta
from deltalog.entry import Batch, Entry, Seal


def _entries(rng: np.random.Generator) -> tuple[list[tuple[int, Entry]], list[str]]:
    deltas = [random_delta(rng) for _ in range(4)]
    entries: list[tuple[int, Entry]] = [
        (1, Batch("e1", deltas[:2])),
        (2, Seal("compactor", "hole")),
        (3, Batch("e3", deltas[2:])),
    ]
    return entries, [d.delta_id for d in deltas]


def test_a_clean_log_passes(rng: np.random.Generator) -> None:
    entries, ids = _entries(rng)
    ledger = Ledger(acked={ids[0]: 1, ids[1]: 1, ids[3]: 3}, failed={ids[2]: "Unavailable"})
    assert ledger.audit(entries) == ([], [])


def test_lost_and_duplicated_deltas_are_named(rng: np.random.Generator) -> None:
    entries, ids = _entries(rng)
    ledger = Ledger(acked={ids[0]: 1, ids[1]: 3, ids[2]: 3, "never-written": 4})
    copy = entries[0][1]
    assert isinstance(copy, Batch)
    entries.append((4, Batch("e4", copy.deltas[:1])))  # ids[0] written twice
    lost, duplicated = ledger.audit(entries)
    assert sorted(lost) == sorted([ids[0], ids[1], "never-written"])
    assert duplicated == [ids[0]]


def test_compactor_errors_are_counted_by_class() -> None:
    stderr = (
        "following log-a; SIGINT or SIGTERM stops\n"
        "log-a: LeaseLost: renew: lease lost (now held by h:1:x with token 3, ours was 2)\n"
        "log-a: renew: lease lost (now held by h:1:x with token 3, ours was 2)\n"
        "log-a: Unavailable: get object: connection failed\n"
        "log-a: LeaseLost: renew: lease lost\n"
    )
    assert compactor_errors([stderr]) == {"LeaseLost": 2, "Unavailable": 1}
