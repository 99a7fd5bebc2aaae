"""The table seam: counters, claims and state that need atomic updates.

``Table`` is the whole contract deltalog needs from DynamoDB. Adapters:
``DynamoTable`` (``deltalog.dynamo``) and ``MemoryTable`` here, a real
in-memory adapter that runs the same contract tests.

Items per log (see ``deltalog.keys``): the append counter ``head``, the
``schema`` (one embedding dimension per collection, fixed by first use),
idempotency ``claims`` (which seq an idempotency key went to) and the
``state`` item the compactor commits to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

__all__ = ["Claim", "LogState", "MemoryTable", "Table"]


@dataclass(frozen=True, slots=True)
class Claim:
    """An idempotency key taken by the entry ``entry_id`` at ``seq``."""

    key: str
    seq: int
    entry_id: str


@dataclass(frozen=True, slots=True)
class LogState:
    """The commit point of a log: what the committed snapshot holds, who compacts."""

    hwm: int = 0
    snapshot_key: str | None = None
    snapshot_sha256: str | None = None
    owner: str | None = None
    token: int = 0
    expires_at: float = 0.0
    updated_at: float = 0.0


class Table(Protocol):
    """The operations deltalog performs on its table."""

    async def reserve(self, log_id: str) -> int:
        """Atomically add one to the counter and return the new value."""
        ...

    async def read_head(self, log_id: str) -> int:
        """The last reserved seq (0 for a new log), read consistently."""
        ...

    async def record_dim(self, log_id: str, collection: str, dim: int) -> int:
        """Fix ``collection``'s dimension at ``dim`` unless set; return the stored one."""
        ...

    async def read_dims(self, log_id: str) -> dict[str, int]: ...

    async def claim_keys(self, log_id: str, claims: Sequence[Claim]) -> dict[str, Claim]:
        """Take each key unless another entry holds it; return those held by others.

        A key already held by the same ``entry_id`` counts as taken (a retry).
        """
        ...

    async def get_claims(self, log_id: str, keys: Sequence[str]) -> dict[str, Claim]: ...

    async def replace_claim(self, log_id: str, old: Claim, new: Claim) -> bool:
        """Swap ``old`` for ``new`` if ``old`` is still what is stored."""
        ...

    async def read_state(self, log_id: str) -> LogState: ...

    async def aclose(self) -> None: ...


class MemoryTable:
    """The table seam in dicts: for tests, examples and single-process use."""

    def __init__(self) -> None:
        self._heads: dict[str, int] = {}
        self._dims: dict[str, dict[str, int]] = {}
        self._claims: dict[tuple[str, str], Claim] = {}
        self._states: dict[str, LogState] = {}
        self.requests = 0

    async def reserve(self, log_id: str) -> int:
        self.requests += 1
        self._heads[log_id] = self._heads.get(log_id, 0) + 1
        return self._heads[log_id]

    async def read_head(self, log_id: str) -> int:
        self.requests += 1
        return self._heads.get(log_id, 0)

    async def record_dim(self, log_id: str, collection: str, dim: int) -> int:
        self.requests += 1
        return self._dims.setdefault(log_id, {}).setdefault(collection, dim)

    async def read_dims(self, log_id: str) -> dict[str, int]:
        self.requests += 1
        return dict(self._dims.get(log_id, {}))

    async def claim_keys(self, log_id: str, claims: Sequence[Claim]) -> dict[str, Claim]:
        self.requests += 1
        held: dict[str, Claim] = {}
        for claim in claims:
            existing = self._claims.setdefault((log_id, claim.key), claim)
            if existing.entry_id != claim.entry_id:
                held[claim.key] = existing
        return held

    async def get_claims(self, log_id: str, keys: Sequence[str]) -> dict[str, Claim]:
        self.requests += 1
        return {k: c for k in keys if (c := self._claims.get((log_id, k))) is not None}

    async def replace_claim(self, log_id: str, old: Claim, new: Claim) -> bool:
        self.requests += 1
        if self._claims.get((log_id, old.key)) != old:
            return False
        self._claims[(log_id, old.key)] = new
        return True

    async def read_state(self, log_id: str) -> LogState:
        self.requests += 1
        return replace(self._states.get(log_id, LogState()))

    async def aclose(self) -> None:
        return None
