"""LogConfig: where a log lives, from arguments or DELTALOG_* variables."""

from __future__ import annotations

import pytest

from deltalog import ConfigurationError, LogConfig


def test_from_env_reads_deltalog_variables_and_overrides_win() -> None:
    env = {
        "DELTALOG_BUCKET": "b",
        "DELTALOG_TABLE": "t",
        "DELTALOG_LOG": "receipts",
        "DELTALOG_ROOT": "prod",
        "AWS_REGION": "eu-west-1",
    }
    config = LogConfig.from_env(env)
    assert (config.bucket, config.table, config.log, config.root, config.region) == (
        "b",
        "t",
        "receipts",
        "prod",
        "eu-west-1",
    )
    assert config.keys.log_id == "prod/receipts"
    flagged = LogConfig.from_env(env, bucket="flag", log=None, endpoint_url="http://x")
    assert (flagged.bucket, flagged.log, flagged.s3_endpoint) == ("flag", "receipts", "http://x")
    assert LogConfig.from_env(
        {"AWS_DEFAULT_REGION": "us-west-2"}, bucket="b", table="t"
    ).region == ("us-west-2")


def test_endpoints_per_service_fall_back_to_the_shared_one() -> None:
    config = LogConfig(bucket="b", table="t", endpoint_url="http://all")
    assert (config.s3_endpoint, config.dynamodb_endpoint) == ("http://all", "http://all")
    split = LogConfig(
        bucket="b", table="t", endpoint_url="http://all", dynamodb_endpoint_url="http://ddb"
    )
    assert (split.s3_endpoint, split.dynamodb_endpoint) == ("http://all", "http://ddb")
    assert LogConfig(bucket="b", table="t").s3_endpoint is None


def test_with_log_keeps_the_location() -> None:
    config = LogConfig(bucket="b", table="t", root="r", log="one")
    other = config.with_log("two")
    assert (other.bucket, other.table, other.root, other.log) == ("b", "t", "r", "two")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"bucket": "", "table": "t"},
            "no bucket configured: pass --bucket or set DELTALOG_BUCKET",
        ),
        ({"bucket": "b", "table": ""}, "no table configured: pass --table or set DELTALOG_TABLE"),
        ({"bucket": "b", "table": "t", "log": "a/b"}, "invalid log name"),
        ({"bucket": "b", "table": "t", "root": "a/../b"}, "invalid root prefix"),
        (
            {"bucket": "b", "table": "t", "max_delta_bytes": 10, "max_entry_bytes": 5},
            "max_delta_bytes must not exceed max_entry_bytes",
        ),
        ({"bucket": "b", "table": "t", "append_attempts": 0}, "append_attempts"),
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        LogConfig(**kwargs)  # type: ignore[arg-type]


def test_missing_variables_name_the_flag() -> None:
    with pytest.raises(ConfigurationError, match="--bucket"):
        LogConfig.from_env({})
