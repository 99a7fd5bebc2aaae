"""Where a log lives and how to reach it.

Region, credentials and endpoints follow the AWS conventions: the standard
environment variables (``AWS_REGION``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL_DYNAMODB``, ...) and profiles are
read by botocore itself, so a ``LogConfig`` only names an endpoint when the
caller wants to override them. Bucket, table, log and root prefix come from
arguments or the ``DELTALOG_*`` variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from deltalog.errors import ConfigurationError
from deltalog.keys import LogKeys, valid_log_name, valid_root

__all__ = ["LogConfig"]

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class LogConfig:
    """The location of one log and the limits that apply to it."""

    bucket: str
    table: str
    log: str = "default"
    root: str = ""
    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    s3_endpoint_url: str | None = None
    dynamodb_endpoint_url: str | None = None
    max_delta_bytes: int = 32 * MiB
    max_entry_bytes: int = 64 * MiB
    append_attempts: int = 8
    max_pool_connections: int = 64
    request_timeout: float = 30.0
    producer_id: str = field(default="")

    def __post_init__(self) -> None:
        if not self.bucket:
            raise ConfigurationError("no bucket configured: pass --bucket or set DELTALOG_BUCKET")
        if not self.table:
            raise ConfigurationError("no table configured: pass --table or set DELTALOG_TABLE")
        if not valid_log_name(self.log):
            raise ConfigurationError(
                f"invalid log name {self.log!r}: use 1-128 letters, digits, '.', '_' or '-'"
            )
        if not valid_root(self.root):
            raise ConfigurationError(f"invalid root prefix {self.root!r}")
        if self.max_delta_bytes > self.max_entry_bytes:
            raise ConfigurationError("max_delta_bytes must not exceed max_entry_bytes")
        if self.append_attempts < 1:
            raise ConfigurationError("append_attempts must be at least 1")

    @property
    def keys(self) -> LogKeys:
        return LogKeys(self.root, self.log)

    @property
    def s3_endpoint(self) -> str | None:
        return self.s3_endpoint_url or self.endpoint_url

    @property
    def dynamodb_endpoint(self) -> str | None:
        return self.dynamodb_endpoint_url or self.endpoint_url

    def with_log(self, log: str) -> LogConfig:
        """The same location for another log."""
        return replace(self, log=log)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> LogConfig:
        """Build a config from ``DELTALOG_*`` variables; ``overrides`` win.

        ``None`` overrides are ignored, so CLI flags can be passed as they are.
        """
        env = os.environ if env is None else env
        values: dict[str, object] = {
            "bucket": env.get("DELTALOG_BUCKET", ""),
            "table": env.get("DELTALOG_TABLE", ""),
            "log": env.get("DELTALOG_LOG", "default"),
            "root": env.get("DELTALOG_ROOT", ""),
        }
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            values["region"] = region
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
