"""A log's identity (issue 19 item 2): a typo in ``--bucket`` reads and writes nothing.

The observed failures, each reproduced as a user met them: the ``deltalog``
command in a subprocess (``tests.commands``) against moto's server, and the
API where the issue's reproduction went through it (a shared live copy).
Every one of them fails on the code before identities: the table's items
were keyed by root and log name alone. About 20 ``deltalog`` processes in
all, a second or two each when the machine is idle.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compactor import Compactor
from deltalog import DeltaLog, IdentityMismatch, LogConfig, Reader
from deltalog.receipts.embed import HashingEmbedder
from deltalog.receipts.generate import generate_receipts
from deltalog.receipts.ingest import ingest_file
from deltalog.receipts.model import write_jsonl
from deltalog.storage.create import ensure_storage
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.s3 import S3Store
from tests.builders import delete, delta
from tests.commands import Run, deltalog, where

DIM = 16
HASH = ["--embedder", "hash", "--dim", str(DIM)]


@pytest.fixture
def receipts(tmp_path: Path) -> Path:
    path = tmp_path / "receipts.jsonl"
    write_jsonl(path, generate_receipts(3, seed=19))
    return path


def typo(config: LogConfig) -> LogConfig:
    return replace(config, bucket=f"{config.bucket}-typo")


def assert_refused(run: Run, config: LogConfig, *, recorded: bool = True) -> None:
    """Exit 2 with an ``IdentityMismatch``: naming the log's real bucket when it is
    recorded; saying the bucket cannot be the log's when an older version wrote it."""
    assert run.code == 2, (run.code, run.out, run.err)
    assert "IdentityMismatch" in run.err and "Traceback" not in run.err, run.err
    if recorded:
        assert f"is s3://{config.bucket}/{config.log}, not s3://" in run.err, run.err
    else:
        assert "cannot be its bucket" in run.err, run.err
    assert "run `deltalog init" not in run.err, "never the advice to init the typo"
    assert "nothing to do" not in run.out


async def items(config: LogConfig) -> dict[str, dict[str, Any]]:
    """The log's table items by sort key, raw."""
    table = await DynamoTable.connect(config)
    try:
        answer = await table._db.query(
            TableName=config.table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": config.keys.log_id}},
            ConsistentRead=True,
        )
    finally:
        await table.aclose()
    return {item["sk"]["S"]: item for item in answer["Items"]}


async def ingested(config: LogConfig, receipts: Path) -> None:
    """The receipts in the log (through the API: the setup, not what is tested)."""
    async with DeltaLog.open(config) as log:
        summary = await ingest_file(receipts, log, HashingEmbedder(DIM))
    assert summary.receipts == 3


async def compacted(config: LogConfig, cache: Path) -> None:
    async with Compactor(config, cache_dir=cache) as compactor:
        assert (await compactor.run_once()).status == "applied"


async def written_by_an_older_version(config: LogConfig) -> None:
    """Entries as a version before identities left them: no identity anywhere."""
    store, table = await S3Store.connect(config), await DynamoTable.connect(config)
    try:
        old = DeltaLog(config, store, table)  # not opened: nothing binds it
        rng = np.random.default_rng(3)
        for name in ("a", "b"):
            await old.append(delta(rng, name))
    finally:
        await store.aclose()
        await table.aclose()
    assert "identity" not in await items(config)


# -- the observed failures, on the command line ------------------------------------------


async def test_ingest_with_a_typo_bucket_reserves_nothing(
    config: LogConfig, receipts: Path
) -> None:
    """It used to reserve a seq in the real log (a hole), then fail on the bucket."""
    await ingested(config, receipts)
    before = await items(config)
    run = await deltalog("ingest", str(receipts), "-q", *HASH, *where(typo(config)))
    assert_refused(run, config)
    assert await items(config) == before, "no seq reserved, no claim, no schema"
    status = await deltalog("status", "--json", *where(config))
    assert '"hole_count": 0' in status.out, status.out


@pytest.fixture
async def cache(config: LogConfig, receipts: Path, tmp_path: Path) -> list[str]:
    """The receipts ingested and compacted; the flags of the compactor's cache."""
    await ingested(config, receipts)
    await compacted(config, tmp_path / "cache")
    return ["--cache-dir", str(tmp_path / "cache")]


async def test_compact_with_a_typo_bucket_is_an_error_not_nothing_to_do(
    config: LogConfig, cache: list[str], tmp_path: Path
) -> None:
    """And so is every other command that opens the log with it."""
    before = await items(config)
    for command in (
        ["compact", "-q", *cache],
        ["rebuild", "--publish", "-q", *cache],
        ["verify", *cache],
        ["export", "--out", str(tmp_path / "export"), *cache],
        ["status"],
        ["quarantine", "--seq", "1", "--reason", "typo"],
    ):
        assert_refused(await deltalog(*command, *where(typo(config))), config)
    assert await items(config) == before, "no lease taken, no token spent, nothing marked"
    assert not (tmp_path / "export").exists()


async def test_query_with_a_typo_bucket_answers_nothing_from_the_cache(
    config: LogConfig, cache: list[str]
) -> None:
    search = ["query", "--collection", "words", "--text", "total", "--json", *HASH, *cache]
    answered = await deltalog(*search, *where(config))
    assert answered.code == 0 and '"ids"' in answered.out, answered.err
    for consistency in ("snapshot", "fresh"):
        run = await deltalog(*search, "--consistency", consistency, *where(typo(config)))
        assert_refused(run, config)
        assert run.out == "", "no answer, from the cache or anywhere"


@pytest.mark.parametrize("older", [False, True], ids=["recorded", "older-version"])
async def test_init_and_compact_with_a_typo_bucket_cannot_take_the_log(
    config: LogConfig, receipts: Path, tmp_path: Path, older: bool
) -> None:
    """The issue's sequence: ingest to a typo, follow the advice to init it, compact.

    It used to leave the real log's state pointing at a snapshot in the typo
    bucket. Now every step is refused and the typo bucket is never created,
    for a log whose identity is recorded and for one an older version wrote.
    """
    if older:
        await written_by_an_older_version(config)
    else:
        await ingested(config, receipts)
    wrong, cache = typo(config), ["--cache-dir", str(tmp_path / "cache")]
    before = await items(config)
    for command in (
        ["ingest", str(receipts), "-q", *HASH],
        ["init"],
        ["compact", "-q", *cache],
    ):
        assert_refused(await deltalog(*command, *where(wrong)), config, recorded=not older)
    assert await items(config) == before
    assert not await _bucket_exists(wrong), "init refused before creating anything"

    await compacted(config, tmp_path / "cache")
    verify = await deltalog("verify", *cache, *where(config))
    assert verify.code == 0 and "equal" in verify.out, (verify.out, verify.err)
    status = await deltalog("status", *where(config))
    assert re.search(r"^holes\s+0 \(none\)$", status.out, re.M), status.out
    assert re.search(rf"^identity\s+s3://{config.bucket}/{config.log}$", status.out, re.M)


async def _bucket_exists(config: LogConfig) -> bool:
    store = await S3Store.connect(config)
    try:
        async for _ in store.list_after("", ""):
            return True
        return True
    except Exception:
        return False
    finally:
        await store.aclose()


# -- through the API --------------------------------------------------------------------


async def test_two_logs_of_one_name_in_two_buckets_never_share_a_live_copy(
    config: LogConfig, tmp_path: Path
) -> None:
    """The outside review's reproduction: log B's checkpoint held log A's records.

    Two logs named alike, each with its bucket and table, compacted with one
    cache directory: A's warm live copy was taken as B's (same cache name),
    and B's next checkpoint was published from it.
    """
    a = config
    b = replace(config, bucket=f"b-{uuid.uuid4().hex[:12]}", table=f"b-{uuid.uuid4().hex[:12]}")
    await ensure_storage(b)
    cache = tmp_path / "cache"

    async def compact(c: LogConfig, *, checkpoint: bool = False) -> None:
        async with Compactor(c, cache_dir=cache, grace=0) as compactor:
            await compactor.run_once(checkpoint=checkpoint)

    async def upserted(c: LogConfig, *ids: str) -> None:
        async with DeltaLog.open(c) as log:
            rng = np.random.default_rng(len(ids))
            for id_ in ids:
                await log.append(delta(rng, id_, rows=1))

    await upserted(b, "b1")
    await compact(b)  # B's live copy: B at seq 1
    await upserted(a, "a1")
    await compact(a)  # A at seq 1: the one live copy of that cache name
    await upserted(b, "b2")
    await compact(b, checkpoint=True)  # a checkpoint from whatever copy B took
    async with Reader.open(b, cache_dir=tmp_path / "reader") as reader:
        got = await reader.get(collection="words")
    assert sorted(got["ids"]) == ["b1#0", "b2#0"], "only B's records"
    async with Compactor(b, cache_dir=tmp_path / "verify") as compactor:
        assert (await compactor.verify()).ok


async def test_an_older_log_takes_the_first_identity_and_says_so_once(
    config: LogConfig, caplog: pytest.LogCaptureFixture
) -> None:
    await written_by_an_older_version(config)
    with pytest.raises(IdentityMismatch, match="cannot be its bucket"):
        async with DeltaLog.open(typo(config)):
            pass
    assert "identity" not in await items(config), "a refused handle records nothing"
    with caplog.at_level(logging.WARNING, logger="deltalog.identity"):
        async with DeltaLog.open(config, read_only=True) as log:
            assert (await log.status()).identity is None, "a reader records nothing"
        async with DeltaLog.open(config) as log:
            assert await log.append(delete("c")) == 3
        async with DeltaLog.open(config) as log:
            assert (await log.status()).identity == config.keys.identity
    said = [r.getMessage() for r in caplog.records if r.name == "deltalog.identity"]
    assert len(said) == 1 and "had no recorded identity" in said[0], said
    stored = await items(config)
    assert {sk: item.get("identity", {}).get("S") for sk, item in stored.items()} == {
        "identity": config.keys.identity,
        "head": config.keys.identity,
        "schema": None,  # nobody wrote it since: it is recorded on its next write
    }
    with pytest.raises(IdentityMismatch, match=f"is {re.escape(config.keys.identity)}"):
        async with DeltaLog.open(typo(config)):
            pass


async def test_a_reader_with_a_typo_bucket_is_refused_before_the_cache(
    config: LogConfig, tmp_path: Path
) -> None:
    async with DeltaLog.open(config) as log:
        await log.append(delete("a"))
    for consistency in ("snapshot", "fresh"):
        with pytest.raises(IdentityMismatch):
            async with Reader.open(
                typo(config), consistency=consistency, cache_dir=tmp_path / "cache"
            ):
                pass
