"""What the handlers are configured with: the environment.

The location of the logs comes from the same variables as the command line
(``DELTALOG_BUCKET``, ``DELTALOG_TABLE``, ``DELTALOG_LOG``, ``DELTALOG_ROOT``,
``DELTALOG_SSE``, ``DELTALOG_SSE_KMS_KEY_ID``, ``DELTALOG_VERIFY_KEYS``; see
``LogConfig.from_env``) and AWS's own (``AWS_REGION``, ...). A deployment
adds:

- ``DELTALOG_LOGS``: the logs this deployment serves, comma-separated
  (default ``DELTALOG_LOG``); the first is the default log;
- ``DELTALOG_CACHE_DIR``: the snapshot cache of the compactor and of
  queries (default ``/tmp/deltalog``: Lambda's only writable directory);
- ``DELTALOG_CACHE_BYTES``: how much of that disk the compactor's caches
  may fill (default: the whole disk, the function's ephemeral storage;
  ``deltalog_lambda.budget``);
- ``DELTALOG_EMBEDDER`` (``auto``, ``openai``, ``wordllama``, ``hash``) and
  ``DELTALOG_EMBEDDER_DIM`` (0: the model's own);
- ``DELTALOG_OPENAI_KEY_SECRET`` (a Secrets Manager secret) or
  ``DELTALOG_OPENAI_KEY_PARAMETER`` (an SSM SecureString parameter): where
  the OpenAI API key is;
- ``DELTALOG_SIGNING_KEY_SECRET``: a Secrets Manager secret holding the
  entry signing key (hex);
- ``DELTALOG_DEAD_LETTER_QUEUE_URL``: where ingest forwards a message
  whose input can never be used, with the error as an attribute (else it
  is reported failed and SQS moves it after ``maxReceiveCount`` tries);
- ``DELTALOG_QUERY_MAX_RESULTS`` (1,000) and ``DELTALOG_QUERY_MAX_ANSWER_BYTES``
  (5 MiB; Lambda answers at most 6 MB): the query function's bounds on the
  records and the bytes one answer holds;
- ``DELTALOG_TIME_MARGIN``: seconds a compaction keeps, of the invocation's
  remaining time, to commit, release and report (default 20 %, at least
  30 s); the publish's own time is kept apart, sized from the checkpoint;
- ``DELTALOG_LEASE_TTL`` (30 s), ``DELTALOG_GRACE`` (60 s),
  ``DELTALOG_RETAIN`` (3), ``DELTALOG_COMPRESSION`` (``zstd``),
  ``DELTALOG_CHECKPOINT_RATIO`` (0.1), ``DELTALOG_MAX_TAIL_ENTRIES`` (``auto``)
  and ``DELTALOG_MAX_TAIL_BYTES`` (256MiB; 0 turns either cap off): the
  compactor's options, as the ``compact`` command's flags;
- ``POWERTOOLS_METRICS_NAMESPACE``: the metrics' CloudWatch namespace
  (default ``deltalog``).

Secrets are names, never values: the handlers read the values at run time
(``deltalog_lambda.secrets``), so no key is ever in the template or in an
environment variable. A bad value is a ``ConfigurationError`` naming the
variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from compactor.checkpoint import (
    DEFAULT_MAX_TAIL_BYTES,
    DEFAULT_MAX_TAIL_ENTRIES,
    DEFAULT_RATIO,
    EntryCap,
    parse_entry_cap,
)
from compactor.publish import DEFAULT_COMPRESSION, Compression
from deltalog.config import LogConfig, parse_size
from deltalog.errors import ConfigurationError, InvalidInput
from deltalog.keys import valid_log_name

__all__ = ["Settings"]

_DEFAULT_NAMESPACE = "deltalog"
_LAMBDA_ANSWER_BYTES = 6 * 1024 * 1024
"""The largest payload a synchronous Lambda invocation (and a function URL) answers."""


@dataclass(frozen=True, slots=True)
class Settings:
    """A handler's configuration, read once per execution environment."""

    env: Mapping[str, str]
    logs: tuple[str, ...]
    """The logs this deployment serves; the first is the default."""
    cache_dir: Path
    cache_bytes: int | None
    embedder: str
    embedder_dim: int | None
    openai_key_secret: str | None
    openai_key_parameter: str | None
    signing_key_secret: str | None
    dead_letter_queue: str | None
    query_max_results: int
    query_max_answer_bytes: int
    time_margin: float | None
    lease_ttl: float
    grace: float
    retain: int
    compression: Compression
    checkpoint_ratio: float
    max_tail_entries: EntryCap
    max_tail_bytes: int | None
    namespace: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        compression = env.get("DELTALOG_COMPRESSION", "") or DEFAULT_COMPRESSION
        if compression not in ("none", "zstd"):
            raise ConfigurationError(f"DELTALOG_COMPRESSION is {compression!r}: use none or zstd")
        return cls(
            env=env,
            logs=_logs(env),
            cache_dir=Path(env.get("DELTALOG_CACHE_DIR") or "/tmp/deltalog"),
            cache_bytes=_cap(env, "DELTALOG_CACHE_BYTES", 0) or None,
            embedder=env.get("DELTALOG_EMBEDDER") or "auto",
            embedder_dim=int(_number(env, "DELTALOG_EMBEDDER_DIM", 0) or 0) or None,
            openai_key_secret=env.get("DELTALOG_OPENAI_KEY_SECRET") or None,
            openai_key_parameter=env.get("DELTALOG_OPENAI_KEY_PARAMETER") or None,
            signing_key_secret=env.get("DELTALOG_SIGNING_KEY_SECRET") or None,
            dead_letter_queue=env.get("DELTALOG_DEAD_LETTER_QUEUE_URL") or None,
            query_max_results=int(_positive(env, "DELTALOG_QUERY_MAX_RESULTS", 1_000)),
            query_max_answer_bytes=_bytes(env, "DELTALOG_QUERY_MAX_ANSWER_BYTES", 5 * 2**20),
            time_margin=_number(env, "DELTALOG_TIME_MARGIN", None),
            lease_ttl=_positive(env, "DELTALOG_LEASE_TTL", 30.0),
            grace=_positive(env, "DELTALOG_GRACE", 60.0),
            retain=int(_positive(env, "DELTALOG_RETAIN", 3)),
            compression=cast(Compression, compression),
            checkpoint_ratio=_number(env, "DELTALOG_CHECKPOINT_RATIO", DEFAULT_RATIO) or 0.0,
            max_tail_entries=_entry_cap(env, "DELTALOG_MAX_TAIL_ENTRIES"),
            max_tail_bytes=_cap(env, "DELTALOG_MAX_TAIL_BYTES", DEFAULT_MAX_TAIL_BYTES),
            namespace=env.get("POWERTOOLS_METRICS_NAMESPACE") or _DEFAULT_NAMESPACE,
        )

    @property
    def default_log(self) -> str:
        return self.logs[0]

    def config(self, log: str, *, signing_key: bytes | None = None) -> LogConfig:
        """The ``LogConfig`` of one of the logs served, from the ``DELTALOG_*`` variables."""
        self.check_log(log)
        return LogConfig.from_env(self.env, log=log, signing_key=signing_key)

    def check_log(self, log: str) -> None:
        if log not in self.logs:
            raise InvalidInput(
                f"log {log!r} is not one this deployment serves ({', '.join(self.logs)}): "
                "add it to DELTALOG_LOGS (the template's LogNames)",
                log=log,
            )

    def margin(self, remaining: float) -> float:
        """Seconds a compaction keeps, of ``remaining``, to commit, release and report."""
        if self.time_margin is not None:
            return self.time_margin
        return max(30.0, 0.2 * remaining)


def _logs(env: Mapping[str, str]) -> tuple[str, ...]:
    listed = [n.strip() for n in env.get("DELTALOG_LOGS", "").split(",") if n.strip()]
    logs = tuple(dict.fromkeys(listed or [env.get("DELTALOG_LOG") or "default"]))
    for log in logs:
        if not valid_log_name(log):
            raise ConfigurationError(
                f"DELTALOG_LOGS names an invalid log {log!r}: use 1-128 letters, digits, "
                "'.', '_' or '-'"
            )
    _check_logical_ids(logs)
    return logs


def _check_logical_ids(logs: tuple[str, ...]) -> None:
    """The template names each log's resources by its letters and digits alone
    (``CompactorSchedule<log>``): two names that differ only in punctuation would share
    them, and one log would go without its schedule, alarms and IAM statements."""
    seen: dict[str, str] = {}
    for log in logs:
        key = re.sub(r"[^A-Za-z0-9]", "", log)
        if key in seen:
            raise ConfigurationError(
                f"DELTALOG_LOGS (the template's LogNames) names {seen[key]!r} and {log!r}, which "
                "differ only in punctuation: the stack gives both the same resources. Rename "
                "one, or serve it from another stack"
            )
        seen[key] = log


def _number(env: Mapping[str, str], name: str, default: float | None) -> float | None:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigurationError(f"{name} is {text!r}: give a number") from None
    if value < 0:
        raise ConfigurationError(f"{name} is {text!r}: give a number >= 0")
    return value


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    value = _number(env, name, default)
    assert value is not None
    if value <= 0:
        raise ConfigurationError(f"{name} must be above 0")
    return value


def _bytes(env: Mapping[str, str], name: str, default: int) -> int:
    """A size (``5MiB``, ``4000000``), at least 1 KiB and at most Lambda's 6 MB answer."""
    text = env.get(name, "").strip()
    if not text:
        return default
    value = parse_size(text)
    if not 1024 <= value <= _LAMBDA_ANSWER_BYTES:
        raise ConfigurationError(
            f"{name} is {text!r}: give a size from 1KiB to {_LAMBDA_ANSWER_BYTES} bytes "
            "(Lambda's limit on an answer)"
        )
    return value


def _entry_cap(env: Mapping[str, str], name: str) -> EntryCap:
    """``auto`` (the default), a count, or 0 for no cap."""
    text = env.get(name, "").strip()
    if not text:
        return DEFAULT_MAX_TAIL_ENTRIES
    try:
        return parse_entry_cap(text)
    except InvalidInput as exc:
        raise ConfigurationError(f"{name}: {exc.message}") from None


def _cap(env: Mapping[str, str], name: str, default: int) -> int | None:
    """A size (``16MiB``, ``2000``); 0 turns the cap off (None)."""
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        return parse_size(text) or None
    except ConfigurationError:
        raise ConfigurationError(
            f"{name} is {text!r}: give a whole number (a size such as 64MiB), 0 for no cap"
        ) from None
