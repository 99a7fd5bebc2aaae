"""The ``deltalog`` command line, run as a separate process against moto's server."""

from __future__ import annotations

import json
import re
import uuid

from deltalog import DeltaLog, LogConfig
from tests.builders import delete
from tests.commands import deltalog


def _names() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:12]
    return f"cli-bucket-{suffix}", f"cli-table-{suffix}"


async def test_init_creates_then_reports_existing(endpoint: str) -> None:
    bucket, table = _names()
    first = await deltalog("init", "--bucket", bucket, "--table", table, "--endpoint-url", endpoint)
    assert first.code == 0, first.err
    probe = "conditional writes: honoured (If-None-Match probe refused with 412)"
    identity = f"log default: s3://{bucket}/default"
    assert first.out.splitlines() == [
        f"bucket {bucket}: created",
        probe,
        f"table {table}: created",
        identity,
    ]
    again = await deltalog("init", "--bucket", bucket, "--table", table, "--endpoint-url", endpoint)
    assert again.code == 0, again.err
    assert again.out.splitlines() == [
        f"bucket {bucket}: exists",
        probe,
        f"table {table}: exists",
        identity,
    ]


async def test_status_json_shows_the_log(endpoint: str) -> None:
    bucket, table = _names()
    assert (
        await deltalog("init", "--bucket", bucket, "--table", table, "--endpoint-url", endpoint)
    ).code == 0
    config = LogConfig(bucket=bucket, table=table, log="receipts", endpoint_url=endpoint)
    async with DeltaLog.open(config) as log:
        await log.append(delete("a"))
        await log.table.reserve(log.keys.log_id)
        await log.append(delete("b"))
    # The location from DELTALOG_* and AWS_ENDPOINT_URL, as a deployment would set it.
    run = await deltalog(
        "status",
        "--json",
        DELTALOG_BUCKET=bucket,
        DELTALOG_TABLE=table,
        DELTALOG_LOG="receipts",
        AWS_ENDPOINT_URL=endpoint,
    )
    assert run.code == 0, run.err
    status = json.loads(run.out)
    assert status["log"] == "receipts"
    assert (status["head"], status["entries"], status["holes"], status["hole_count"]) == (
        3,
        2,
        [2],
        1,
    )
    assert (status["hwm"], status["lag"]) == (0, 3)
    text = await deltalog(
        "status",
        "--bucket",
        bucket,
        "--table",
        table,
        "--log",
        "receipts",
        "--endpoint-url",
        endpoint,
    )
    assert text.code == 0, text.err
    assert re.search(r"^head\s+3$", text.out, re.M), text.out
    assert re.search(r"^holes\s+1 \(2\)$", text.out, re.M), text.out


async def test_a_missing_bucket_or_table_says_to_run_init(endpoint: str) -> None:
    bucket, table = _names()
    init = await deltalog("init", "--bucket", bucket, "--table", table, "--endpoint-url", endpoint)
    assert init.code == 0, init.err
    for b, t in ((f"{bucket}-gone", table), (bucket, f"{table}-gone")):
        where = ["--bucket", b, "--table", t, "--log", "new", "--endpoint-url", endpoint]
        run = await deltalog("status", *where)
        assert run.code == 1
        assert "ConfigurationError" in run.err and "does not exist" in run.err
        assert f"run `deltalog init --bucket {b} --table {t}`" in run.err
        assert "Traceback" not in run.err


async def test_a_missing_bucket_flag_is_a_configuration_error(endpoint: str) -> None:
    run = await deltalog("status", "--table", "t", "--endpoint-url", endpoint)
    assert run.code == 1
    assert "no bucket configured: pass --bucket or set DELTALOG_BUCKET" in run.err
    run = await deltalog("init", "--bucket", "b", "--endpoint-url", endpoint)
    assert run.code == 1
    assert "no table configured" in run.err
    assert "Traceback" not in run.err


async def test_a_usage_error_exits_2() -> None:
    run = await deltalog()
    assert run.code == 2
    assert "usage: deltalog" in run.err
