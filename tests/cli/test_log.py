"""The ``deltalog`` command line, run as a separate process against moto's server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aioboto3

from deltalog import DeltaLog, LogConfig
from tests.builders import delete
from tests.commands import cli_env, deltalog

ABORT_RULE = "deltalog-abort-incomplete-multipart-uploads"


@asynccontextmanager
async def _s3(endpoint: str) -> AsyncIterator[Any]:
    """A plain S3 client on the endpoint: what is there, seen without deltalog."""
    session = aioboto3.Session(region_name="us-east-1")
    async with session.client("s3", endpoint_url=endpoint) as s3:
        yield s3


def _names() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:12]
    return f"cli-bucket-{suffix}", f"cli-table-{suffix}"


PROBE = "conditional writes: honoured (If-None-Match probe refused with 412)"
LIFECYCLE = "lifecycle: incomplete multipart uploads aborted after 1 day"


async def test_init_creates_then_reports_existing(endpoint: str) -> None:
    bucket, table = _names()
    first = await deltalog("init", "--bucket", bucket, "--table", table, "--endpoint-url", endpoint)
    assert first.code == 0, first.err
    identity = f"log default: s3://{bucket}/default"
    assert first.out.splitlines() == [
        f"bucket {bucket}: created",
        PROBE,
        f"{LIFECYCLE} (added)",
        f"table {table}: created",
        identity,
    ]
    again = await deltalog("init", "--bucket", bucket, "--table", table, "--endpoint-url", endpoint)
    assert again.code == 0, again.err
    assert again.out.splitlines() == [
        f"bucket {bucket}: exists",
        PROBE,
        f"{LIFECYCLE} (present)",
        f"table {table}: exists",
        identity,
    ]
    async with _s3(endpoint) as s3:
        rules = (await s3.get_bucket_lifecycle_configuration(Bucket=bucket))["Rules"]
    assert len(rules) == 1, "added once"
    assert rules[0]["Status"] == "Enabled"
    assert rules[0]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}


async def test_init_keeps_the_buckets_own_lifecycle_rules(endpoint: str) -> None:
    """A bucket with rules of its own (none aborting uploads under the root) keeps them."""
    bucket, table = _names()
    theirs = {
        "ID": "expire-logs",
        "Status": "Enabled",
        "Filter": {"Prefix": "logs/"},
        "Expiration": {"Days": 30},
    }
    elsewhere = {
        "ID": "abort-elsewhere",
        "Status": "Enabled",
        "Filter": {"Prefix": "other/"},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7},
    }
    async with _s3(endpoint) as s3:
        await s3.create_bucket(Bucket=bucket)
        await s3.put_bucket_lifecycle_configuration(
            Bucket=bucket, LifecycleConfiguration={"Rules": [theirs, elsewhere]}
        )
    where = ["--bucket", bucket, "--table", table, "--root", "data", "--endpoint-url", endpoint]
    run = await deltalog("init", *where)
    assert run.code == 0, run.err
    assert f"{LIFECYCLE} (added)" in run.out.splitlines()
    async with _s3(endpoint) as s3:
        listed = (await s3.get_bucket_lifecycle_configuration(Bucket=bucket))["Rules"]
    rules = {r["ID"]: r for r in listed}
    assert set(rules) == {"expire-logs", "abort-elsewhere", ABORT_RULE}
    assert rules[ABORT_RULE]["Filter"] == {"Prefix": "data/"}
    assert rules["expire-logs"]["Expiration"] == {"Days": 30}
    again = await deltalog("init", *where)
    assert f"{LIFECYCLE} (present)" in again.out.splitlines()


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
        assert run.code == 2, "a configuration error"
        assert "ConfigurationError" in run.err and "does not exist" in run.err
        assert f"run `deltalog init --bucket {b} --table {t}`" in run.err
        assert "Traceback" not in run.err


async def test_a_missing_bucket_flag_is_a_configuration_error(endpoint: str) -> None:
    run = await deltalog("status", "--table", "t", "--endpoint-url", endpoint)
    assert run.code == 2
    assert "no bucket configured: pass --bucket or set DELTALOG_BUCKET" in run.err
    run = await deltalog("init", "--bucket", "b", "--endpoint-url", endpoint)
    assert run.code == 2
    assert "no table configured" in run.err
    assert "Traceback" not in run.err


async def test_a_usage_error_exits_2() -> None:
    run = await deltalog()
    assert run.code == 2
    assert "usage: deltalog" in run.err


async def test_version_names_deltalog_and_chromadb() -> None:
    import chromadb

    import deltalog as package

    run = await deltalog("--version")
    assert run.code == 0, run.err
    assert run.out.startswith(f"deltalog {package.__version__} (chromadb {chromadb.__version__}")


async def _logs(endpoint: str, cache: Path) -> list[str]:
    """A bucket and table holding logs ``alpha`` (compacted) and ``beta`` (two entries, one a
    hole) at the root and ``gamma`` under root ``nested``; returns the location flags."""
    from compactor import Compactor

    bucket, table = _names()
    where = ["--bucket", bucket, "--table", table, "--endpoint-url", endpoint]
    assert (await deltalog("init", *where)).code == 0
    base = LogConfig(bucket=bucket, table=table, endpoint_url=endpoint)
    for config in (
        base.with_log("alpha"),
        base.with_log("beta"),
        replace(base, log="gamma", root="nested"),
    ):
        async with DeltaLog.open(config) as log:
            await log.append(delete("a"))
    async with DeltaLog.open(base.with_log("beta")) as log:
        await log.table.reserve(log.keys.log_id)
    async with Compactor(base.with_log("alpha"), cache_dir=cache) as compactor:
        assert (await compactor.run_once()).status == "applied"
    return where


async def test_logs_lists_the_logs_under_the_root_in_a_table_and_as_json(
    endpoint: str, tmp_path: Path
) -> None:
    where = await _logs(endpoint, tmp_path / "cache")
    run = await deltalog("logs", *where)
    assert run.code == 0, run.err
    rows = {cells[0]: cells for cells in _table(run.out)}
    assert rows["log"] == ["log", "head", "hwm", "lag", "checkpoint", "tail", "lease", "last run"]
    assert set(rows) == {"log", "alpha", "beta"}, "only this root's logs, not the probes"
    alpha, beta = rows["alpha"], rows["beta"]
    assert alpha[1:4] == ["1", "1", "0"] and re.fullmatch(r"seq 1 \([\d,]+ bytes\)", alpha[4])
    assert alpha[5:7] == ["empty", "free"] and alpha[7].endswith("UTC: applied, hwm 0 -> 1")
    assert beta[1:] == ["2", "0", "2", "none", "empty", "free", "never"]

    records = json.loads((await deltalog("logs", "--json", *where)).out)
    assert [r["log"] for r in records] == ["alpha", "beta"]
    assert (records[1]["head"], records[1]["hwm"], records[1]["lag"]) == (2, 0, 2)
    assert records[0]["last_run"]["status"] == "applied"
    nested = json.loads((await deltalog("logs", "--json", "--root", "nested", *where)).out)
    assert [r["log"] for r in nested] == ["gamma"]
    bucket, table = where[1], where[3]
    empty = await deltalog("logs", "--root", "nothing-here", *where)
    assert (empty.code, empty.out) == (
        0,
        f"no logs in bucket {bucket!r} under root 'nothing-here'\n",
    )
    assert table


def _table(out: str) -> list[list[str]]:
    """The rows of a table printed to a pipe, as cells (the header rule left out)."""
    return [
        [cell.strip() for cell in line.split("|")]
        for line in out.splitlines()
        if line.strip() and not set(line) <= set("-+| ")
    ]


async def test_status_of_a_log_that_does_not_exist_says_so_and_names_those_that_do(
    endpoint: str, tmp_path: Path
) -> None:
    where = await _logs(endpoint, tmp_path / "cache")
    run = await deltalog("status", "--log", "alpah", *where)
    assert run.code == 2, (run.code, run.out, run.err)
    assert run.out == "", "no figures printed for a log that is not there"
    assert f"no log 'alpah' in bucket {where[1]!r} (table {where[3]!r})" in run.err
    assert "nothing was ever appended to it; the logs there: alpha, beta" in run.err
    assert "Traceback" not in run.err
    json_run = await deltalog("status", "--json", "--log", "gamma", *where)
    assert json_run.code == 2, "gamma is under another root"
    nested = await deltalog("status", "--json", "--log", "gamma", "--root", "nested", *where)
    assert nested.code == 0, nested.err
    assert json.loads(nested.out)["head"] == 1


async def test_https_to_a_plain_http_port_is_a_configuration_error(endpoint: str) -> None:
    """A TLS handshake that fails is the setup's fault, not an outage: exit 2 at once."""
    https = endpoint.replace("http://", "https://")
    run = await deltalog("status", "--bucket", "b-tls", "--table", "t-tls", "--endpoint-url", https)
    assert run.code == 2, (run.code, run.err)
    assert run.err.startswith("deltalog: ConfigurationError: "), run.err
    assert "TLS handshake with the endpoint failed" in run.err
    assert "https:// on a port that speaks plain http?" in run.err
    assert "Unavailable" not in run.err and "Traceback" not in run.err


def test_output_into_a_closed_pipe_ends_quietly_as_cli_tools_do(endpoint: str) -> None:
    """`deltalog ... | head`: the reader goes away before the output is written. The command
    ends with status 141 (128 + SIGPIPE), as `yes | head` does, and no traceback."""
    argv = [sys.executable, "-m", "deltalog", "policy", "--role", "reader"]
    argv += ["--bucket", "b", "--table", "t", "--log", "l"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader is gone before anything is written
    with process.stderr:
        err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141, err
    assert err == "", err
