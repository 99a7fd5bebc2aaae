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
    SSLError,
)

from deltalog.config import LogConfig
from deltalog.errors import ConfigurationError, DeltalogError, Unavailable

__all__ = ["Reachability", "client", "error_code", "http_status", "translate"]

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


class Reachability:
    """Whether an endpoint has answered at least once (any HTTP answer counts).

    A connection failure to an endpoint that never answered is a setup
    problem (a wrong URL, port or region, or a service not started) and is
    reported at once as ``ConfigurationError``, instead of being retried as
    an outage for half a minute; once it has answered, the same failure is
    ``Unavailable``.
    """

    def __init__(self) -> None:
        self.answered = False

    def __call__(self, **_event: object) -> None:
        self.answered = True


async def client(
    stack: AsyncExitStack, config: LogConfig, service: str, reach: Reachability | None = None
) -> Any:
    """An aioboto3 client for ``service``, closed with ``stack``; ``reach`` notes its answers."""
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
    if endpoint and endpoint.startswith("http://"):
        # No TLS on a plain-http endpoint (a local stand-in): skip loading the CA
        # bundle into an SSL context no request would use (~0.1 s of CPU per client).
        kwargs["verify"] = False
    made = await stack.enter_async_context(session.client(service, **kwargs))
    if reach is not None:
        made.meta.events.register("after-call", reach)
    return made


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
    reached: bool = True,
) -> DeltalogError:
    """The deltalog error for a foreign exception raised while doing ``what``.

    ``ambiguous`` says whether the operation may have taken effect when the
    answer was lost; ``missing`` builds the error for a missing bucket or
    table; ``reached`` says whether the endpoint ever answered (see
    ``Reachability``).
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
    if isinstance(exc, SSLError):  # not a transient failure: before the BotoCoreError below
        return ConfigurationError(
            f"{what}: the TLS handshake with the endpoint failed ({exc}); retrying will not "
            "help: check the endpoint URL (https:// on a port that speaks plain http? use "
            "http://) and the certificates (AWS_CA_BUNDLE)",
            key=key,
        )
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError) and not reached:
        return ConfigurationError(
            f"{what}: cannot reach the endpoint, which never answered ({exc}); check the "
            "endpoint URL (--endpoint-url, AWS_ENDPOINT_URL*), the region, and that the "
            "service is running",
            key=key,
        )
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
    if code == "InvalidBucketName":
        return ConfigurationError(
            f"{what}: the bucket name is invalid: S3 bucket names are 3-63 lowercase "
            "letters, digits, '.' and '-', starting and ending with a letter or digit",
            key=key,
        )
    if code == "NotImplemented" or status == 501:
        return ConfigurationError(
            f"{what}: the endpoint does not implement this request ({code or status}); "
            "deltalog needs S3 conditional writes (If-None-Match) and DynamoDB transactions",
            key=key,
        )
    if code in _AUTH_CODES or status in {401, 403}:
        return ConfigurationError(
            f"{what}: access denied ({code}); check the credentials and the policy", key=key
        )
    if code in _RETRYABLE_CODES or status >= 500 or status in {408, 409, 429}:
        return Unavailable(f"{what}: {code or status}", ambiguous=ambiguous, key=key)
    return ConfigurationError(f"{what}: unexpected answer {code} (HTTP {status})", key=key)
