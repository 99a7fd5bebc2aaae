"""Sharded logs from the command line, as separate processes against moto's server:
``init --shards``, ``compact`` (every shard, ``--shard``), ``compact --follow`` (a
follower per shard), ``status`` (a row per shard), ``query`` (the same answer as an
unsharded log), ``export``, ``verify``, ``rebuild`` and ``reshard``."""

from __future__ import annotations

import json
import re
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from deltalog import DeltaLog, LogConfig
from deltalog.cli import main
from deltalog.keys import Shard
from deltalog.receipts.generate import generate_receipts
from deltalog.receipts.model import write_jsonl
from tests.builders import delete, delta
from tests.cli.test_compact import Cli, _daemon, _eventually, _true
from tests.commands import deltalog, where
from tests.compaction import State, assert_states_equal, reference, sink_state


async def _directory(path: Path) -> State:
    """Every record of a plain Chroma directory (vectors included)."""
    return await sink_state(path, lambda directory: path)


async def _shard_hwms(log: DeltaLog, shards: int, generation: int = 1) -> list[int]:
    keys = [log.keys.for_shard(Shard(generation, i, shards)) for i in range(shards)]
    return [(await log.table.read_state(k.log_id, sk=k.state_sk)).hwm for k in keys]


async def test_init_records_the_shard_count_once(config: LogConfig) -> None:
    base = ["init", *where(config)]
    first = await deltalog(*base, "--shards", "3")
    assert first.code == 0, first.err
    assert first.out.splitlines()[-1] == f"log {config.log}: 3 shards (layout generation 1)"
    again = await deltalog(*base, "--shards", "3")
    assert (again.code, again.out.splitlines()[-1]) == (
        0,
        f"log {config.log}: 3 shards (layout exists)",
    )
    other = await deltalog(*base, "--shards", "2")
    assert other.code == 1
    assert "has 3 shards" in other.err and "deltalog reshard --shards 2" in other.err
    bad = await deltalog(*base, "--shards", "0")
    assert bad.code == 2 and "a log has 1 to 256 shards, not 0" in bad.err
    async with DeltaLog.open(config) as log:
        layout = await log.table.read_layout(log.keys.log_id)
        assert (layout.shards, layout.generation) == (3, 1)
        retired = await log.table.read_state(log.keys.log_id)
        assert retired.retired_by == 1, "the log's own index is retired"


async def test_init_refuses_to_shard_a_log_that_holds_entries(
    config: LogConfig, rng: np.random.Generator
) -> None:
    async with DeltaLog.open(config) as log:
        await log.append(delta(rng, "a"))
    run = await deltalog("init", *where(config), "--shards", "4")
    assert run.code == 1
    assert "already holds 1 seqs in one index" in run.err
    assert "deltalog reshard --shards 4" in run.err
    async with DeltaLog.open(config) as log:
        assert not (await log.table.read_layout(log.keys.log_id)).stored, "nothing written"


async def test_compact_runs_every_shard_or_one(
    config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    cli = Cli(config, tmp_path / "cache")
    assert (await deltalog("init", *where(config), "--shards", "3")).code == 0
    async with DeltaLog.open(config) as log:
        for i in range(4):
            await log.append(delta(rng, f"r{i}", rows=4))
        one = await cli("compact", "--shard", "1", "--json", "-q")
        assert one.code == 0, one.err
        (only,) = [json.loads(line) for line in one.out.splitlines()]
        assert (only["shard"], only["generation"], only["status"]) == (1, 1, "applied")
        assert await _shard_hwms(log, 3) == [0, 4, 0]
        every = await cli("compact", "-q")
        assert every.code == 0, every.err
        lines = every.out.splitlines()
        assert [line.split(":")[0] for line in lines] == [
            f"{config.log} shard 0",
            f"{config.log} shard 1",
            f"{config.log} shard 2",
        ]
        assert "nothing to do at hwm 4" in lines[1]
        assert await _shard_hwms(log, 3) == [4, 4, 4]
        missing = await cli("compact", "--shard", "3")
        assert missing.code == 1 and "no shard 3" in missing.err


async def test_follow_runs_a_follower_per_shard_and_stops_on_a_signal(
    config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    assert (await deltalog("init", *where(config), "--shards", "3")).code == 0
    argv = [
        *Cli(config, tmp_path / "cache").argv("compact"),
        *("--follow", "--poll-min", "0.05", "--poll-max", "0.2"),
    ]
    async with DeltaLog.open(config) as log, _daemon(argv) as daemon:
        banner = f"following {config.log} (3 shards); SIGINT or SIGTERM stops"
        assert await _eventually(lambda: _true(banner in daemon.stderr), 30), daemon.stderr
        for i in range(5):
            await log.append(delta(rng, f"r{i}", rows=3))
        await log.append(delete("r0#0"))

        async def caught_up() -> bool:
            return await _shard_hwms(log, 3) == [await log.head()] * 3

        assert await _eventually(caught_up, 60), daemon.stderr
        daemon.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(20):
            code = await daemon.process.wait()
        assert code == 0, daemon.stderr
        assert "Traceback" not in daemon.stderr


def _ranked(answer: dict[str, Any]) -> list[list[tuple[float, str]]]:
    """Each query's rows by (distance, id), rows tied with the last one dropped: which
    of several records at one distance make the cut is not part of the answer."""
    out = []
    for ids, distances in zip(answer["ids"], answer["distances"], strict=True):
        rows = sorted((round(d, 4), i) for d, i in zip(distances, ids, strict=True))
        last = rows[-1][0] if rows else None
        out.append([row for row in rows if row[0] != last])
    return out


def test_query_json_is_the_same_for_a_sharded_and_an_unsharded_log(
    config: LogConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sharded, single = config, replace(config, log=f"{config.log}-one")
    path = tmp_path / "receipts.jsonl"
    write_jsonl(path, generate_receipts(4, seed=3))
    assert main(["init", *where(sharded), "--shards", "3"]) == 0
    for c in (sharded, single):
        embed = ["--embedder", "hash", "--dim", "32"]
        assert main(["ingest", str(path), "-q", *embed, *where(c)]) == 0
        assert main(["compact", "-q", "--cache-dir", str(tmp_path / c.log), *where(c)]) == 0
    capsys.readouterr()
    for consistency in ("snapshot", "fresh"):
        for text in ("TOTAL", "MILK 2.99", "visa"):
            answers = []
            for c in (sharded, single):
                search = ["--collection", "words", "--text", text, "-k", "8", "--json"]
                flags = ["--consistency", consistency, "--embedder", "hash", "--dim", "32"]
                assert main(["query", *search, *flags, *where(c)]) == 0
                answers.append(json.loads(capsys.readouterr().out))
            a, b = answers
            assert np.allclose(a["distances"], b["distances"], atol=1e-4), (text, consistency)
            assert _ranked(a) == _ranked(b), (text, consistency)


async def test_status_export_verify_and_rebuild_of_a_sharded_log(
    config: LogConfig, rng: np.random.Generator, tmp_path: Path
) -> None:
    """status --json has a row per shard and the lagging shard's hwm (as logs has); export
    writes the log at the cut (every shard caught up to the greatest hwm), merged or per
    shard; verify and rebuild go shard by shard. About 15 s idle, up to 40 s loaded: a
    dozen deltalog processes, one command each, cheaper than a test per command."""
    cli = Cli(config, tmp_path / "cache")
    assert (await deltalog("init", *where(config), "--shards", "2")).code == 0
    async with DeltaLog.open(config) as log:
        for i in range(6):
            await log.append(delta(rng, f"r{i}", rows=4))
        await log.append(delete("r0#0", "r1#1"))
        assert (await cli("compact", "-q", "--max-entries", "4")).code == 0
        assert (await cli("compact", "-q", "--shard", "1")).code == 0
        head = await log.head()
        status = await cli.status()
        assert [(s["shard"], s["hwm"], s["lag"]) for s in status["shards"]] == [
            (0, 4, head - 4),
            (1, head, 0),
        ]
        assert set(status["shards"][0]) >= {
            "shard",
            "hwm",
            "snapshot_hwm",
            "snapshot_bytes",
            "tail_entries",
            "tail_bytes",
        }
        assert (status["hwm"], status["lag"]) == (4, head - 4), "the lagging shard's"
        assert status["layout"]["shards"] == 2 and status["layout"]["generation"] == 1
        text = await cli("status")
        assert text.code == 0 and "2 shards (generation 1)" in text.out
        assert re.search(r"^1 \(g1\) *\| *7 *\| *0 *\|", text.out, re.M), text.out
        logs = await deltalog("logs", "--json", *where(config))
        assert logs.code == 0, logs.err
        (row,) = [r for r in json.loads(logs.out) if r["log"] == config.log]
        assert (row["hwm"], row["lag"], row["shards"]) == (4, head - 4, 2), "the lagging shard's"
        want = await reference(log)

    merged = await cli("export", "--out", str(tmp_path / "merged"), "--json", "-q")
    assert merged.code == 0, merged.err
    assert json.loads(merged.out)["hwm"] == head, "shard 0 caught up to the cut"
    assert_states_equal(await _directory(tmp_path / "merged"), want)
    each = await cli("export", "--out", str(tmp_path / "each"), "--per-shard", "-q")
    assert each.code == 0, each.err
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == ["shard-0", "shard-1"]
    union: State = {}
    for shard in ("shard-0", "shard-1"):
        for name, records in (await _directory(tmp_path / "each" / shard)).items():
            union.setdefault(name, {}).update(records)
    assert_states_equal(union, want)

    verify = await cli("verify")
    assert verify.code == 0, verify.err
    lines = [line for line in verify.out.splitlines() if line.startswith("verify")]
    assert [line.split(": ", 1)[0] for line in lines] == [
        "verify of shard 0 at hwm 4",
        "verify of shard 1 at hwm 7",
    ]
    assert verify.out.count(", equal") == 2
    assert verify.out.count("index recall@10") == 2, "each shard's index checked"
    rebuilt = await cli("rebuild", "--shard", "0", "--publish", "--json", "-q")
    assert rebuilt.code == 0, rebuilt.err
    (result,) = [json.loads(line) for line in rebuilt.out.splitlines()]
    assert (result["shard"], result["hwm"], result["published"]) == (0, head, True)
