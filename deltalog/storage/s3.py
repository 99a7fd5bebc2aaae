"""``S3Store``: the object store seam on S3 (or any S3-compatible endpoint).

Creation is conditional (``If-None-Match: *``), so two writers of one key
cannot both win: the loser gets HTTP 412 and ``put_if_absent`` returns
False. botocore adds a CRC-32 checksum to every upload, so the store
refuses a body damaged on the way. Every upload (entries, seals,
snapshots) carries the configured server-side encryption (``LogConfig.sse``,
``sse_kms_key_id``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from botocore.exceptions import ClientError, IncompleteReadError, ResponseStreamingError

from deltalog.config import LogConfig
from deltalog.errors import Closed, ConfigurationError, DeltalogError, Unavailable
from deltalog.storage.aws import Reachability, client, error_code, http_status, translate
from deltalog.storage.store import ObjectInfo, StoredObject

__all__ = ["S3Store"]

_FIRST_PAGE = 64
"""Keys in the first page of a listing; later pages double, up to ``page_size``."""

_CHUNK = 1024 * 1024
_BODY_ATTEMPTS = 3
_BODY_CUT = (aiohttp.ClientPayloadError, IncompleteReadError, ResponseStreamingError)
"""How a GetObject body cut short shows (aiohttp's, or botocore's length check)."""


class S3Store:
    """The object store seam over one S3 bucket."""

    def __init__(self, config: LogConfig) -> None:
        self.config = config
        self.bucket = config.bucket
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._closed = False
        self._reach = Reachability()

    @classmethod
    async def connect(cls, config: LogConfig) -> S3Store:
        store = cls(config)
        store._client = await client(store._stack, config, "s3", store._reach)
        return store

    async def aclose(self) -> None:
        self._closed = True
        await self._stack.aclose()

    @property
    def _s3(self) -> Any:
        if self._closed or self._client is None:
            raise Closed("the S3 store is closed")
        return self._client

    def _missing_bucket(self, what: str) -> DeltalogError:
        return ConfigurationError(
            f"{what}: bucket {self.bucket!r} does not exist; run "
            f"`deltalog init --bucket {self.bucket} --table {self.config.table}`"
        )

    def _error(self, exc: BaseException, what: str, key: str, *, ambiguous: bool) -> DeltalogError:
        return translate(
            exc,
            what,
            ambiguous=ambiguous,
            missing=self._missing_bucket,
            key=key,
            reached=self._reach.answered,
        )

    def _encryption(self) -> dict[str, str]:
        """The server-side encryption parameters every upload carries (``LogConfig.sse``)."""
        params: dict[str, str] = {}
        if self.config.sse:
            params["ServerSideEncryption"] = self.config.sse
        if self.config.sse_kms_key_id:
            params["SSEKMSKeyId"] = self.config.sse_kms_key_id
        return params

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            await self._s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                IfNoneMatch="*",
                ChecksumAlgorithm="CRC32",
                **self._encryption(),
            )
        except ClientError as exc:
            if http_status(exc) == 412 or error_code(exc) == "PreconditionFailed":
                return False
            raise self._error(exc, "put object", key, ambiguous=True) from exc
        except Exception as exc:
            raise self._error(exc, "put object", key, ambiguous=True) from exc
        return True

    async def get(self, key: str) -> StoredObject | None:
        # botocore retries a request that failed, not a body cut short after
        # the answer began (a reset, a truncated transfer): read it again.
        for _ in range(_BODY_ATTEMPTS - 1):
            try:
                return await self._get(key)
            except Unavailable as exc:
                if not isinstance(exc.__cause__, _BODY_CUT):
                    raise
        return await self._get(key)

    async def _get(self, key: str) -> StoredObject | None:
        try:
            answer = await self._s3.get_object(Bucket=self.bucket, Key=key)
            async with answer["Body"] as body:
                data = await body.read()
        except ClientError as exc:
            if error_code(exc) in {"NoSuchKey", "404"}:
                return None
            raise self._error(exc, "get object", key, ambiguous=False) from exc
        except Exception as exc:
            raise self._error(exc, "get object", key, ambiguous=False) from exc
        return StoredObject(key, data, answer["LastModified"].timestamp())

    async def list_after(
        self, prefix: str, start_after: str = "", *, page_size: int = 1000
    ) -> AsyncIterator[ObjectInfo]:
        # Pages start small and double up to ``page_size``: a caller that stops
        # early (a reader at a hole, a fresh read of a short tail) lists little,
        # one that reads on pays a few more requests per million keys.
        token: str | None = None
        size = min(page_size, _FIRST_PAGE)
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": size}
            size = min(page_size, size * 2)
            if token:
                kwargs["ContinuationToken"] = token
            elif start_after:
                kwargs["StartAfter"] = start_after
            try:
                page = await self._s3.list_objects_v2(**kwargs)
            except Exception as exc:
                raise self._error(exc, "list objects", prefix, ambiguous=False) from exc
            for item in page.get("Contents", ()):
                yield ObjectInfo(item["Key"], item["Size"], item["LastModified"].timestamp())
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    async def clock(self, prefix: str) -> float:
        """S3's time, from the ``Date`` header of a one-key listing (to the second)."""
        try:
            page = await self._s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
        except Exception as exc:
            raise self._error(exc, "list objects", prefix, ambiguous=False) from exc
        date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        try:
            return parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"the object store answered without a valid Date header ({date!r}): deltalog "
                "measures the age of holes on the store's clock; use an S3-compatible store "
                "that sends one"
            ) from exc

    async def delete(self, key: str) -> None:
        try:
            await self._s3.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise self._error(exc, "delete object", key, ambiguous=True) from exc

    async def upload_file(self, key: str, path: Path) -> bool:
        data = await anyio.Path(path).read_bytes()
        return await self.put_if_absent(key, data)

    async def download_file(self, key: str, path: Path) -> bool:
        try:
            answer = await self._s3.get_object(Bucket=self.bucket, Key=key)
            # Entering the body yields aiohttp's response, whose read() takes no
            # size: read chunks from aiobotocore's StreamingBody itself.
            body = answer["Body"]
            async with body, await anyio.open_file(path, "wb") as out:
                while chunk := await body.read(_CHUNK):
                    await out.write(chunk)
        except ClientError as exc:
            if error_code(exc) in {"NoSuchKey", "404"}:
                return False
            raise self._error(exc, "download object", key, ambiguous=False) from exc
        except OSError as exc:
            if isinstance(exc, PermissionError | FileNotFoundError | IsADirectoryError):
                raise ConfigurationError(f"cannot write {path}: {exc}", key=key) from exc
            raise self._error(exc, "download object", key, ambiguous=False) from exc
        except Exception as exc:
            raise self._error(exc, "download object", key, ambiguous=False) from exc
        return True

    async def check_conditional_writes(self, key: str) -> None:
        """Refuse a store that does not honour ``If-None-Match: *``.

        Puts ``key`` (a fresh scratch key) twice with put-if-absent: the second
        must be refused with 412. A store that accepts it would let two
        writers both create one entry, and deltalog could not keep appends
        exactly once. The probe object is deleted afterwards.
        """
        first = await self.put_if_absent(key, b"deltalog conditional-write probe")
        second = await self.put_if_absent(key, b"deltalog conditional-write probe, again")
        await self.delete(key)
        where = str(getattr(self._s3.meta, "endpoint_url", "") or "S3")
        if not first:
            raise ConfigurationError(
                f"the object store at {where} refused to create a fresh object with "
                "If-None-Match: * (412 for a key that did not exist): its conditional writes "
                "are broken; deltalog cannot guarantee exactly-once appends on it",
                key=key,
            )
        if second:
            raise ConfigurationError(
                f"the object store at {where} does not honour If-None-Match: a second "
                "put-if-absent of the same key succeeded instead of failing with 412, so two "
                "writers could both create one entry and deltalog cannot guarantee "
                "exactly-once appends; use S3 or an S3-compatible store with conditional writes",
                key=key,
            )

    async def ensure_bucket(self) -> bool:
        """Create the bucket if it is missing; True if it was created."""
        try:
            await self._s3.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as exc:
            if http_status(exc) != 404 and error_code(exc) not in {"404", "NoSuchBucket"}:
                raise self._error(exc, "head bucket", self.bucket, ambiguous=False) from exc
        except Exception as exc:
            raise self._error(exc, "head bucket", self.bucket, ambiguous=False) from exc
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self.config.region
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            await self._s3.create_bucket(**kwargs)
        except ClientError as exc:
            if error_code(exc) in {"BucketAlreadyOwnedByYou"}:
                return False
            raise self._error(exc, "create bucket", self.bucket, ambiguous=False) from exc
        return True
