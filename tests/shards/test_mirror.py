"""A mirror of a sharded log: bootstrapped from every shard's checkpoint, then following
the log (``chroma run`` for the server, the log on moto's server)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from compactor import Limits
from compactor.mirror import Mirror
from compactor.shards import ShardedCompactor
from deltalog import DeltaLog, LogConfig
from deltalog.shards import init_layout
from deltalog.snapshot.server import ChromaTarget
from tests.chroma_server import ChromaServer
from tests.compaction import assert_states_equal, reference
from tests.compactor.test_mirror import append_random, chroma, server_state, target

__all__ = ["chroma", "target"]


async def test_a_mirror_bootstraps_from_every_shard_then_follows_the_log(
    config: LogConfig,
    chroma: ChromaServer,
    target: ChromaTarget,
    rng: np.random.Generator,
    tmp_path: Path,
) -> None:
    async with DeltaLog.open(config) as log:
        await init_layout(log.table, log.keys, 3, now=time.time())
        await append_random(log, rng, 18)
        async with ShardedCompactor(config, cache_dir=tmp_path / "c", shards=[0]) as one:
            await one.run_once(checkpoint=True)  # shard 0's checkpoint holds seq 18
        await append_random(log, rng, 6)
        async with ShardedCompactor(
            config, cache_dir=tmp_path / "c", limits=Limits(max_entries=10)
        ) as every:
            await every.run_once(checkpoint=True)  # shards 1 and 2 hold seq 10, shard 0 24
        await append_random(log, rng, 5)  # a tail no checkpoint holds
        async with Mirror(config, target, cache_dir=tmp_path / "m", chunk_entries=4) as mirror:
            first = await mirror.run_once()
            assert (first.position_after, first.bootstrapped > 0) == (29, True)
            assert_states_equal(server_state(chroma, target), await reference(log))
            await append_random(log, rng, 7)
            second = await mirror.run_once()
            assert (second.position_before, second.position_after) == (29, 36)
            assert_states_equal(server_state(chroma, target), await reference(log))
