"""zstd snapshots (the default) end to end: compactors, then readers and ``verify``.

On moto's server with real Chroma: the compactor publishes ``.tar.zst``
archives (zstd frames on S3), a second compactor with an empty cache takes
the committed one up (download, decompress, extract) and adds to it, and a
``Reader`` with its own cache serves exactly the fold of the log from it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compactor import Compactor
from deltalog import DeltaLog, LogConfig, Reader
from tests.builders import delete, delta, patch
from tests.compaction import assert_states_equal, committed_state, reference

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


async def published(log: DeltaLog, key: str | None) -> bytes:
    assert key is not None and key.endswith(".tar.zst"), key
    stored = await log.store.get(key)
    assert stored is not None
    return stored.data


async def test_zstd_snapshots_through_compactors_and_readers(
    log: DeltaLog, config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    for name in ("a", "b", "c"):
        await log.append(delta(rng, name, rows=3))
    async with Compactor(config, cache_dir=tmp_path / "first") as first:  # zstd by default
        one = await first.run_once()
    assert (one.status, one.hwm_after) == ("applied", 3)
    assert (await published(log, one.snapshot_key)).startswith(ZSTD_MAGIC)

    await log.append(delete("a#0", "b#1"))
    await log.append(patch(["c#2"], [{"label": "new", "n": None}]))
    await log.append(delta(rng, "d", rows=2))
    async with Compactor(config, cache_dir=tmp_path / "second", compression="zstd") as second:
        two = await second.run_once(checkpoint=True)  # takes the zstd checkpoint up (cold)
        assert (two.status, two.hwm_before, two.hwm_after) == ("applied", 3, 6)
        assert two.snapshot_key != one.snapshot_key
        assert (await published(log, two.snapshot_key)).startswith(ZSTD_MAGIC)
        want = await reference(log)
        assert_states_equal(await committed_state(second), want)
        assert (await second.verify()).ok

    records = want["words"]
    async with Reader.open(config, cache_dir=tmp_path / "reader") as reader:
        got = await reader.get(collection="words")
        assert sorted(got["ids"]) == sorted(records)
        for id_, document, metadata in zip(
            got["ids"], got["documents"], got["metadatas"], strict=True
        ):
            assert (document, metadata) == (records[id_].document, records[id_].metadata)
        probe = records["c#2"]
        near = await reader.query(collection="words", query_embeddings=[probe.embedding])
        assert near["ids"][0][0] == "c#2" and near["distances"][0][0] == 0.0
        assert reader.statistics().hwm == 6
