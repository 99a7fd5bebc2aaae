"""AWS plumbing shared by the S3 and DynamoDB adapters.

One place builds aioboto3 clients from a ``LogConfig`` and one place turns
botocore and aiohttp failures into deltalog errors, so nothing foreign
escapes the seams.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from deltalog.config import LogConfig
from deltalog.errors import ConfigurationError, DeltalogError, Unavailable

__all__ = ["client", "error_code", "http_status", "translate"]

_AUTH_CODES = {
    "AccessDenied",
    "AccessDeniedException",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "ExpiredToken",
    "ExpiredTokenException",
}
_RETRYABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "InternalError",
    "InternalServerError",
    "ServiceUnavailable",
    "RequestTimeout",
    "ConditionalRequestConflict",
    "TransactionInProgressException",
}


async def client(stack: AsyncExitStack, config: LogConfig, service: str) -> Any:
    """An aioboto3 client for ``service``, closed with ``stack``."""
    session = _session(config.profile, _region(config))
    endpoint = config.s3_endpoint if service == "s3" else config.dynamodb_endpoint
    aio_config = AioConfig(
        max_pool_connections=config.max_pool_connections,
        connect_timeout=min(10.0, config.request_timeout),
        read_timeout=config.request_timeout,
        retries={"max_attempts": 3, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint else None,
    )
    kwargs: dict[str, Any] = {"config": aio_config}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    return await stack.enter_async_context(session.client(service, **kwargs))


_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str | None, str], Any]]
_sessions = weakref.WeakKeyDictionary()


def _session(profile: str | None, region: str) -> Any:
    """One session per event loop, profile and region, shared by its clients.

    A session loads the service models and resolves credentials once, so
    opening many logs (or many handles on one) pays for that once instead of
    ~0.15 s of CPU per client pair. Per loop, because refreshable
    credentials hold asyncio locks bound to the loop that first used them.
    """
    per_loop = _sessions.setdefault(asyncio.get_running_loop(), {})
    session = per_loop.get((profile, region))
    if session is None:
        session = per_loop[(profile, region)] = aioboto3.Session(
            profile_name=profile, region_name=region
        )
    return session


def _region(config: LogConfig) -> str:
    return config.region or "us-east-1"


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def translate(
    exc: BaseException,
    what: str,
    *,
    ambiguous: bool,
    missing: Callable[[str], DeltalogError] | None = None,
    key: str | None = None,
) -> DeltalogError:
    """The deltalog error for a foreign exception raised while doing ``what``.

    ``ambiguous`` says whether the operation may have taken effect when the
    answer was lost; ``missing`` builds the error for a missing bucket or
    table.
    """
    if isinstance(exc, DeltalogError):
        return exc
    if isinstance(exc, NoCredentialsError):
        return ConfigurationError(
            f"{what}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "or AWS_PROFILE",
            key=key,
        )
    if isinstance(exc, ClientError):
        return _translate_client_error(exc, what, ambiguous=ambiguous, missing=missing, key=key)
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        return Unavailable(f"{what}: cannot reach the endpoint ({exc})", key=key)
    if isinstance(exc, ReadTimeoutError | ConnectionClosedError | BotoCoreError):
        return Unavailable(f"{what}: {exc}", ambiguous=ambiguous, key=key)
    if isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError | OSError):
        return Unavailable(f"{what}: connection failed ({exc!r})", ambiguous=ambiguous, key=key)
    return Unavailable(f"{what}: unexpected failure ({exc!r})", ambiguous=ambiguous, key=key)


def _translate_client_error(
    exc: ClientError,
    what: str,
    *,
    ambiguous: bool,
    missing: Callable[[str], DeltalogError] | None,
    key: str | None,
) -> DeltalogError:
    code, status = error_code(exc), http_status(exc)
    if code in {"NoSuchBucket", "ResourceNotFoundException"} and missing is not None:
        return missing(f"{what}: {code}")
    if code in _AUTH_CODES or status in {401, 403}:
        return ConfigurationError(
            f"{what}: access denied ({code}); check the credentials and the policy", key=key
        )
    if code in _RETRYABLE_CODES or status >= 500 or status in {408, 409, 429}:
        return Unavailable(f"{what}: {code or status}", ambiguous=ambiguous, key=key)
    return ConfigurationError(f"{what}: unexpected answer {code} (HTTP {status})", key=key)
