"""Where a log lives and how to reach it.

Region, credentials and endpoints follow the AWS conventions: the standard
environment variables (``AWS_REGION``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL_DYNAMODB``, ...) and profiles are
read by botocore itself, so a ``LogConfig`` only names an endpoint when the
caller wants to override them. Bucket, table, log and root prefix come from
arguments or the ``DELTALOG_*`` variables.

Security settings, all optional:

- ``signing_key`` (``DELTALOG_SIGNING_KEY``, hex): sign every entry written
  (deltas and seals); ``verify_keys`` (``DELTALOG_VERIFY_KEYS``, hex, comma
  separated): the keys whose signatures readers and the compactor accept,
  besides the signing key. When any key is trusted, unsigned entries are
  refused (see ``deltalog.signing``). Neither appears in ``repr``.
- ``sse`` (``DELTALOG_SSE``: ``AES256``, ``aws:kms`` or ``aws:kms:dsse``) and
  ``sse_kms_key_id`` (``DELTALOG_SSE_KMS_KEY_ID``): server-side encryption
  requested on every object deltalog writes (entries, seals, snapshots).

Transfers of snapshot archives: ``part_size`` (``DELTALOG_PART_SIZE``, bytes
or a size such as ``16MiB``) and ``transfer_concurrency``.

``grace`` (``DELTALOG_GRACE``, seconds): how long a reserved seq may stay
unwritten before an append that meets its own idempotency key there seals
it and writes again (a rerun after an interrupted producer).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from deltalog.errors import ConfigurationError
from deltalog.keys import LogKeys, valid_log_name, valid_root
from deltalog.signing import Signer, Verifier, check_key, parse_key

__all__ = ["LogConfig", "parse_size"]

MiB = 1024 * 1024
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(text: str) -> int:
    """Bytes from ``"8388608"``, ``"8MiB"``, ``"8M"`` (= 8 MB), ``"1GiB"``...

    Binary units (``KiB``, ``MiB``, ``GiB``, ``TiB``) are powers of 1024,
    the others of 1000.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ConfigurationError(f"{text!r} is not a size: use bytes or e.g. 16MiB, 1GB")
    number, unit = int(match.group(1)), (match.group(2) or "").upper()
    if unit.endswith("IB"):
        return number * int(1024 ** ("KMGT".index(unit[0]) + 1))
    return number * _UNITS[unit.rstrip("B") if unit != "B" else "B"]


SSE_MODES = ("AES256", "aws:kms", "aws:kms:dsse")


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
    signing_key: bytes | None = field(default=None, repr=False)
    verify_keys: Iterable[bytes] = field(default=frozenset(), repr=False)
    sse: str | None = None
    sse_kms_key_id: str | None = None
    part_size: int = 8 * MiB
    """Snapshot archives stream in parts of this size (S3's minimum is 5 MiB but the last)."""
    transfer_concurrency: int = 4
    """Parts uploaded, or ranges downloaded, at once per snapshot transfer."""
    grace: float = 60.0
    """Seconds a reserved seq may stay unwritten before an append that meets its own
    idempotency key there seals it and writes the delta again (``DELTALOG_GRACE``)."""

    def __post_init__(self) -> None:
        self._check_location()
        self._check_limits()
        self._check_security()

    def _check_location(self) -> None:
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

    def _check_limits(self) -> None:
        if self.max_delta_bytes > self.max_entry_bytes:
            raise ConfigurationError("max_delta_bytes must not exceed max_entry_bytes")
        if self.append_attempts < 1:
            raise ConfigurationError("append_attempts must be at least 1")
        if not 1 <= self.part_size <= 5 * 1024 * MiB:
            raise ConfigurationError(
                f"part_size must be 1 byte to 5 GiB (S3 needs at least 5 MiB), not {self.part_size}"
            )
        if self.transfer_concurrency < 1:
            raise ConfigurationError("transfer_concurrency must be at least 1")
        if not self.grace >= 0:  # also refuses NaN
            raise ConfigurationError(f"grace must be at least 0 seconds, not {self.grace}")

    def _check_security(self) -> None:
        if self.signing_key is not None:
            object.__setattr__(self, "signing_key", check_key(self.signing_key, "signing_key"))
        if isinstance(self.verify_keys, bytes | str):
            raise ConfigurationError("verify_keys must be a collection of keys, not one key")
        trusted = frozenset(check_key(k, "a verify key") for k in self.verify_keys)
        object.__setattr__(self, "verify_keys", trusted)
        if self.sse is not None and self.sse not in SSE_MODES:
            raise ConfigurationError(
                f"sse {self.sse!r} is not a server-side encryption mode: use one of "
                f"{', '.join(SSE_MODES)}"
            )
        if self.sse_kms_key_id and not (self.sse or "").startswith("aws:kms"):
            raise ConfigurationError(
                "sse_kms_key_id needs sse='aws:kms' (or 'aws:kms:dsse'): set DELTALOG_SSE too"
            )

    @property
    def signer(self) -> Signer | None:
        """Signs what this config writes, when a signing key is set."""
        return Signer(self.signing_key) if self.signing_key is not None else None

    @property
    def verifier(self) -> Verifier | None:
        """Checks what this config reads against the trusted keys, when any is set."""
        trusted = set(self.verify_keys)
        if self.signing_key is not None:
            trusted.add(self.signing_key)
        return Verifier.of(trusted) if trusted else None

    @property
    def keys(self) -> LogKeys:
        return LogKeys(self.root, self.log, self.bucket)

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
        values.update(_security_from_env(env))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _security_from_env(env: Mapping[str, str]) -> dict[str, object]:
    """Signing keys and encryption settings from ``DELTALOG_*`` variables."""
    values: dict[str, object] = {}
    if signing := env.get("DELTALOG_SIGNING_KEY", "").strip():
        values["signing_key"] = parse_key(signing, "DELTALOG_SIGNING_KEY")
    if trusted := env.get("DELTALOG_VERIFY_KEYS", "").strip():
        values["verify_keys"] = frozenset(
            parse_key(k, "a key in DELTALOG_VERIFY_KEYS") for k in trusted.split(",") if k.strip()
        )
    for name, var in (("sse", "DELTALOG_SSE"), ("sse_kms_key_id", "DELTALOG_SSE_KMS_KEY_ID")):
        if value := env.get(var, "").strip():
            values[name] = value
    if part := env.get("DELTALOG_PART_SIZE", "").strip():
        values["part_size"] = parse_size(part)
    if grace := env.get("DELTALOG_GRACE", "").strip():
        values["grace"] = _seconds(grace, "DELTALOG_GRACE")
    return values


def _seconds(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number of seconds, not {text!r}") from None
