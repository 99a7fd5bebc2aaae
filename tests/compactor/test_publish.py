"""Publishing and retention, on the memory adapters and on moto's server."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from tests.builders import delta
from tests.compactor.conftest import Backend


async def _keys(backend: Backend, *prefixes: str) -> list[str]:
    return [info.key for prefix in prefixes async for info in backend.store.list_after(prefix)]


async def test_retention_never_deletes_another_logs_keys_under_its_prefix(
    backend: Backend, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Root "" + log x and root x + log snapshots: the first's snapshots prefix holds the second."""
    x = backend.config.log
    outer = replace(backend.config, root="", log=x)
    inner = replace(backend.config, root=x, log="snapshots")
    assert inner.keys.prefix.startswith(outer.keys.snapshots_prefix)
    async with backend.open_log(inner) as log:
        await log.append(delta(rng, "inner"))
        async with backend.compactor(inner, cache_dir=tmp_path / "inner") as c:
            kept = await c.run_once()
    inner_prefixes = (inner.keys.entries_prefix, inner.keys.snapshots_prefix)
    inner_keys = await _keys(backend, *inner_prefixes)
    assert kept.snapshot_key in inner_keys and len(inner_keys) == 2  # an entry, a snapshot

    async with (
        backend.open_log(outer) as log,
        backend.compactor(outer, cache_dir=tmp_path / "outer", retain=1, orphan_grace=0) as c,
    ):
        for i in range(3):
            await log.append(delta(rng, f"outer{i}"))
            assert (await c.run_once()).status == "applied"
        outer_snapshots = [
            k for k in await _keys(backend, outer.keys.snapshots_prefix) if k not in inner_keys
        ]
        assert len(outer_snapshots) == 1, "retention still works for the outer log"
    assert await _keys(backend, *inner_prefixes) == inner_keys, "the inner log lost keys"
    async with backend.compactor(inner, cache_dir=tmp_path / "fresh") as c:
        assert (await c.verify()).ok
