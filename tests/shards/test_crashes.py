"""Shard compactors and reshards killed with ``kill -9``, as processes against moto's server.

- three ``deltalog compact --shard I`` processes; shard 1's is held at its
  commit through a proxy and killed there, while the other two finish and
  commit: a shard's death delays no other shard, and its rerun converges;
- ``deltalog reshard`` killed at each of its steps (the new shards' build,
  halfway through retiring the old shards, the switch itself): running the
  same reshard again finishes it, and the new shards hold the log's fold.

Each test spends most of its time starting ``python -m deltalog`` processes
(chromadb imports in each), hence more than the usual ~20 s on a loaded machine.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import anyio
import numpy as np
import pytest

from compactor.reshard import reshard
from compactor.shards import ShardedCompactor
from deltalog import DeltaLog, LogConfig
from deltalog.cli.soak import ChildProcesses
from deltalog.keys import Shard
from deltalog.shards import init_layout
from deltalog.storage.endpoint import FAKE_CREDENTIALS
from deltalog.storage.faults import Request
from tests.compaction import (
    Match,
    State,
    assert_states_equal,
    committed_state,
    held_once,
    reference,
    until_reached,
)
from tests.reading import random_word_deltas

LEASE_TTL = 2.0
"""Short: a killed process's leases expire quickly, so the rerun does not wait long."""


def _update(request: Request) -> dict[str, object] | None:
    if request.operation != "UpdateItem":
        return None
    body: dict[str, object] = json.loads(request.body)
    return body


def _sk(body: dict[str, object]) -> str:
    key = body["Key"]
    assert isinstance(key, dict)
    return str(key["sk"]["S"])


def commit_of(sk: str) -> Match:
    """The commit of the state item ``sk``."""

    def match(request: Request) -> bool:
        body = _update(request)
        return body is not None and _sk(body) == sk and "hwm = :hwm" in str(body)

    return match


def retire(nth: int) -> Match:
    """The ``nth`` retirement of an old shard's state (1: the first)."""
    seen = [0]

    def match(request: Request) -> bool:
        body = _update(request)
        if body is None or "retired_by = :gen" not in str(body):
            return False
        seen[0] += 1
        return seen[0] == nth

    return match


def switch(generation: int) -> Match:
    """The layout write that makes ``generation`` current."""

    def match(request: Request) -> bool:
        body = _update(request)
        if body is None or _sk(body) != "layout":
            return False
        values = body["ExpressionAttributeValues"]
        assert isinstance(values, dict)
        return bool(values[":generation"]["N"] == str(generation))

    return match


def _argv(config: LogConfig, command: str, cache: Path, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "deltalog", command, "-q"),
        *("--bucket", config.bucket, "--table", config.table, "--log", config.log),
        *("--endpoint-url", str(config.endpoint_url), "--cache-dir", str(cache)),
        *("--lease-ttl", str(LEASE_TTL), *extra),
    ]


async def _hwms(log: DeltaLog, generation: int, shards: int) -> list[int]:
    keys = [log.keys.for_shard(Shard(generation, i, shards)) for i in range(shards)]
    return [(await log.table.read_state(k.log_id, sk=k.state_sk)).hwm for k in keys]


async def test_a_shard_compactor_killed_at_its_commit_delays_no_other_shard(
    config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    async with DeltaLog.open(config) as log:
        await init_layout(log.table, log.keys, 3, now=time.time())
        for delta in random_word_deltas(rng, 12):
            await log.append(delta)
        head = await log.head()
        held = commit_of(log.keys.for_shard(Shard(1, 1, 3)).state_sk)
        with ChildProcesses(tmp_path / "logs", env=FAKE_CREDENTIALS) as children:
            async with held_once(config, held) as (url, reached, _go):
                victim = children.start(
                    "shard-1",
                    _argv(
                        replace(config, endpoint_url=url),
                        "compact",
                        tmp_path / "c1",
                        "--shard",
                        "1",
                    ),
                )
                others = [
                    children.start(
                        f"shard-{i}",
                        _argv(config, "compact", tmp_path / f"c{i}", "--shard", str(i)),
                    )
                    for i in (0, 2)
                ]
                await until_reached(reached, victim)
                victim.kill()
                with anyio.fail_after(120):
                    codes = [await child.exited() for child in others]
                assert codes == [0, 0], [child.stderr() for child in others]
            assert await _hwms(log, 1, 3) == [head, 0, head], "the others committed, 1 nothing"
        await anyio.sleep(LEASE_TTL)  # the dead process's lease expires
        async with ShardedCompactor(config, cache_dir=tmp_path / "after") as c:
            await c.run_once()
            assert await _hwms(log, 1, 3) == [head] * 3
            union: State = {}
            for compactor in c.current:
                for name, records in (await committed_state(compactor)).items():
                    union.setdefault(name, {}).update(records)
            assert_states_equal(union, await reference(log))


@pytest.mark.parametrize("where", ["building", "half retired", "switching"])
async def test_a_reshard_killed_at_any_step_is_finished_by_running_it_again(
    where: str, config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    async with DeltaLog.open(config) as log:
        await init_layout(log.table, log.keys, 2, now=time.time())
        for delta in random_word_deltas(rng, 15):
            await log.append(delta)
        async with ShardedCompactor(config, cache_dir=tmp_path / "old") as old:
            await old.run_once()
        match = {
            "building": commit_of(log.keys.for_shard(Shard(2, 0, 3)).state_sk),
            "half retired": retire(2),
            "switching": switch(2),
        }[where]
        with ChildProcesses(tmp_path / "logs", env=FAKE_CREDENTIALS) as children:
            async with held_once(config, match) as (url, reached, _go):
                argv = _argv(
                    replace(config, endpoint_url=url),
                    "reshard",
                    tmp_path / "r",
                    *("--shards", "3", "--lag", "0"),
                )
                child = children.start("reshard", argv)
                await until_reached(reached, child)
                child.kill()
        layout = await log.table.read_layout(log.keys.log_id)
        assert (layout.generation, layout.pending_generation) == (1, 2), "killed before the switch"
        for delta in random_word_deltas(rng, 5):  # the log goes on meanwhile
            await log.append(delta)
        result = await reshard(config, 3, cache_dir=tmp_path / "again", lease_ttl=LEASE_TTL, lag=0)
        assert (result.switched, result.generation_after, result.shards_after) == (True, 2, 3)
        layout = await log.table.read_layout(log.keys.log_id)
        assert (layout.shards, layout.generation, layout.pending_generation) == (3, 2, 0)
        old_states = [
            await log.table.read_state(
                log.keys.log_id, sk=log.keys.for_shard(Shard(1, i, 2)).state_sk
            )
            for i in range(2)
        ]
        assert [s.retired_by for s in old_states] == [2, 2]
        async with ShardedCompactor(config, cache_dir=tmp_path / "new") as new:
            await new.run_once()
            union: State = {}
            for compactor in new.current:
                for name, records in (await committed_state(compactor)).items():
                    union.setdefault(name, {}).update(records)
            assert_states_equal(union, await reference(log))
