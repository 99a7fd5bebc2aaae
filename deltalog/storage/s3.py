"""``S3Store``: the object store seam on S3 (or any S3-compatible endpoint).

Creation is conditional (``If-None-Match: *``), so two writers of one key
cannot both win: the loser gets HTTP 412 and ``put_if_absent`` returns
False. botocore adds a CRC-32 checksum to every upload, so the store
refuses a body damaged on the way. Every upload (entries, seals,
snapshots) carries the configured server-side encryption (``LogConfig.sse``,
``sse_kms_key_id``).

Snapshots stream (``deltalog.storage.transfer``): an object that fits in
one part is one conditional ``PutObject``; a larger one is a multipart
upload whose ``CompleteMultipartUpload`` carries ``If-None-Match: *``, so it
too is put-if-absent. A store that does not implement that condition on
completion (501) gets the completion without it: the key's fresh nonce is
then what keeps two writers apart. Downloads are ranged ``GetObject``
requests, several at once, each pinned to the first answer's ETag
(``If-Match``) so every range is of the same object.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import anyio
import anyio.abc
from botocore.exceptions import ClientError, IncompleteReadError, ResponseStreamingError

from deltalog.config import LogConfig
from deltalog.errors import (
    Closed,
    ConfigurationError,
    DeltalogError,
    InvalidInput,
    MissingObject,
    Unavailable,
)
from deltalog.storage.aws import Reachability, client, error_code, http_status, translate
from deltalog.storage.store import ObjectInfo, StoredObject
from deltalog.storage.transfer import (
    MAX_PARTS,
    Hasher,
    Transferred,
    download_ranges,
    part_size_for,
    upload_path,
)

__all__ = ["S3Store"]

_FIRST_PAGE = 64
"""Keys in the first page of a listing; later pages double, up to ``page_size``."""

log = logging.getLogger("deltalog.s3")

_BODY_ATTEMPTS = 3
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
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

    def upload(self, key: str) -> MultipartUpload:
        return MultipartUpload(self, key)

    async def upload_file(self, key: str, path: Path) -> bool:
        async with self.upload(key) as upload:
            return (await upload_path(upload, path, self.config.part_size)).created

    async def download_file(self, key: str, path: Path) -> Transferred | None:
        try:
            async with await anyio.open_file(path, "wb") as out:
                done = await self._download(key, out.write)
        except OSError as exc:
            if isinstance(exc, PermissionError | FileNotFoundError | IsADirectoryError):
                raise ConfigurationError(f"cannot write {path}: {exc}", key=key) from exc
            raise self._error(exc, "download object", key, ambiguous=False) from exc
        if done is None:
            await anyio.Path(path).unlink(missing_ok=True)
        return done

    async def _download(
        self, key: str, out: Callable[[bytes], Awaitable[object]]
    ) -> Transferred | None:
        part = self.config.part_size
        first = await self._range(key, 0, part, etag=None)
        if first is None:
            return None
        data, total, etag = first

        async def fetch(start: int, end: int) -> bytes:
            got = await self._range(key, start, end, etag=etag)
            if got is None:
                raise MissingObject("the object vanished during the download", key=key)
            return got[0]

        return await download_ranges(
            key,
            data,
            total,
            fetch,
            out,
            part_size=part,
            concurrency=self.config.transfer_concurrency,
        )

    async def _range(
        self, key: str, start: int, end: int, *, etag: str | None
    ) -> tuple[bytes, int, str] | None:
        """Bytes ``[start, end)`` of ``key``, the object's size and ETag; None if missing.

        A body cut short is read again, like ``get``.
        """
        for attempt in range(_BODY_ATTEMPTS):
            try:
                return await self._get_range(key, start, end, etag)
            except Unavailable as exc:
                if attempt == _BODY_ATTEMPTS - 1 or not isinstance(exc.__cause__, _BODY_CUT):
                    raise
        raise AssertionError("unreachable")

    async def _get_range(
        self, key: str, start: int, end: int, etag: str | None
    ) -> tuple[bytes, int, str] | None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if etag is not None:
            kwargs["IfMatch"] = etag
        try:
            answer = await self._s3.get_object(Range=f"bytes={start}-{end - 1}", **kwargs)
        except ClientError as exc:
            if error_code(exc) in {"NoSuchKey", "404"}:
                return None
            if error_code(exc) == "InvalidRange" and start == 0:  # an empty object
                whole = await self._get(key)
                return None if whole is None else (whole.data, len(whole.data), "")
            raise self._error(exc, "download object", key, ambiguous=False) from exc
        except Exception as exc:
            raise self._error(exc, "download object", key, ambiguous=False) from exc
        data = await self._body(answer, key)
        total = _total_size(answer, len(data))
        if len(data) != min(end, total) - start:
            raise Unavailable(
                f"download object: range {start}-{end - 1} returned {len(data)} bytes", key=key
            )
        return data, total, answer["ETag"]

    async def _body(self, answer: dict[str, Any], key: str) -> bytes:
        try:
            async with answer["Body"] as body:
                data: bytes = await body.read()
        except Exception as exc:
            raise self._error(exc, "download object", key, ambiguous=False) from exc
        return data

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

    async def ensure_abort_rule(self, prefix: str = "", days: int = 1) -> str:
        """A lifecycle rule aborting multipart uploads left incomplete for ``days``.

        An upload a crash or a kill left behind (the compactor aborts its own
        on any other way out) costs storage until it is aborted. Returns
        ``present`` when an enabled rule already covers ``prefix``, else adds
        one, keeping the bucket's other rules, and returns ``added``.
        """
        try:
            answer = await self._s3.get_bucket_lifecycle_configuration(Bucket=self.bucket)
            rules: list[dict[str, Any]] = list(answer.get("Rules", []))
        except ClientError as exc:
            if error_code(exc) != "NoSuchLifecycleConfiguration":
                raise self._error(exc, "read the lifecycle", self.bucket, ambiguous=False) from exc
            rules = []
        except Exception as exc:
            raise self._error(exc, "read the lifecycle", self.bucket, ambiguous=False) from exc
        if any(_aborts_uploads(rule, prefix) for rule in rules):
            return "present"
        rule = {
            "ID": "deltalog-abort-incomplete-multipart-uploads",
            "Status": "Enabled",
            "Filter": {"Prefix": prefix},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": days},
        }
        try:
            await self._s3.put_bucket_lifecycle_configuration(
                Bucket=self.bucket, LifecycleConfiguration={"Rules": [*rules, rule]}
            )
        except Exception as exc:
            raise self._error(exc, "set the lifecycle", self.bucket, ambiguous=False) from exc
        return "added"


def _aborts_uploads(rule: dict[str, Any], prefix: str) -> bool:
    """Whether a lifecycle rule aborts the incomplete multipart uploads under ``prefix``."""
    if rule.get("Status") != "Enabled" or "AbortIncompleteMultipartUpload" not in rule:
        return False
    scope = rule.get("Filter", {"Prefix": rule.get("Prefix", "")})
    if set(scope) - {"Prefix"}:  # tags, sizes or an And: not every key
        return False
    return prefix.startswith(str(scope.get("Prefix", "")))


def _total_size(answer: dict[str, Any], received: int) -> int:
    """The whole object's size, from a ranged answer's ``Content-Range``."""
    match = _CONTENT_RANGE.fullmatch(str(answer.get("ContentRange", "")))
    return int(match.group(3)) if match else received


class MultipartUpload:
    """A streaming upload to S3; see the module docstring and ``transfer.Upload``.

    Use as ``async with store.upload(key) as upload``. Parts go up in a task
    group of this context, at most ``transfer_concurrency`` at once; the first
    part to fail stops the upload and its error is raised by the next
    ``write`` or ``complete``. Leaving the context without completing (an
    error, a cancellation) aborts the multipart upload, shielded.
    """

    def __init__(self, store: S3Store, key: str) -> None:
        self._store = store
        self._key = key
        self._part_size = store.config.part_size
        self._concurrency = store.config.transfer_concurrency
        self._slots = anyio.Semaphore(self._concurrency)
        self._tg: anyio.abc.TaskGroup | None = None
        self._buffer = bytearray()
        self._hasher = Hasher()
        self._upload_id: str | None = None
        self._parts: dict[int, dict[str, Any]] = {}
        self._sent = 0
        self._failure: Exception | None = None
        self._done = False

    async def __aenter__(self) -> MultipartUpload:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        if exc is not None or not self._done:
            self._tg.cancel_scope.cancel()
        # Part tasks never raise (they keep their failure): the task group
        # adds nothing to the exception the caller's block may be raising.
        # When an outer scope is cancelled (a stop signal), leaving the task
        # group raises that cancellation again: abort in ``finally``.
        try:
            await self._tg.__aexit__(None, None, None)
        finally:
            if self._upload_id is not None and not self._done:
                await self._abort()

    async def write(self, data: bytes) -> None:
        self._check()
        await self._hasher.update(data)
        self._buffer += data
        while len(self._buffer) >= (size := part_size_for(self._sent + 1, self._part_size)):
            part = bytes(self._buffer[:size])
            del self._buffer[:size]
            await self._send(part)

    async def complete(self) -> Transferred:
        self._check()
        if self._upload_id is None:  # it fits in one part: one conditional put
            self._done = True
            created = await self._store.put_if_absent(self._key, bytes(self._buffer))
            return self._transferred(1, created)
        if self._buffer or not self._sent:
            part, self._buffer = bytes(self._buffer), bytearray()
            await self._send(part)
        for _ in range(self._concurrency):  # every part in flight has finished
            await self._slots.acquire()
        self._check()
        created = await self._complete()
        self._done = True
        return self._transferred(self._sent, created)

    def _transferred(self, parts: int, created: bool) -> Transferred:
        size, digest = self._hasher.size, self._hasher.hexdigest()
        return Transferred(self._key, size, digest, parts, created)

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._done:
            raise InvalidInput(f"the upload to {self._key} is already complete")

    async def _send(self, part: bytes) -> None:
        if self._sent >= MAX_PARTS:
            raise ConfigurationError(
                f"the upload needs more than {MAX_PARTS} parts: raise part_size "
                f"(now {self._part_size} bytes)",
                key=self._key,
            )
        if self._upload_id is None:
            self._upload_id = await self._create()
        self._sent += 1
        await self._slots.acquire()
        assert self._tg is not None
        self._tg.start_soon(self._put_part, self._sent, part)

    async def _create(self) -> str:
        s3 = self._store._s3
        try:
            answer = await s3.create_multipart_upload(
                Bucket=self._store.bucket,
                Key=self._key,
                ChecksumAlgorithm="CRC32",
                **self._store._encryption(),
            )
        except Exception as exc:
            raise self._store._error(
                exc, "create multipart upload", self._key, ambiguous=False
            ) from exc
        upload_id: str = answer["UploadId"]
        return upload_id

    async def _put_part(self, number: int, data: bytes) -> None:
        try:
            answer = await self._store._s3.upload_part(
                Bucket=self._store.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=data,
                ChecksumAlgorithm="CRC32",
            )
            part = {"PartNumber": number, "ETag": answer["ETag"]}
            if "ChecksumCRC32" in answer:
                part["ChecksumCRC32"] = answer["ChecksumCRC32"]
            self._parts[number] = part
        except Exception as exc:
            error = self._store._error(exc, "upload part", self._key, ambiguous=False)
            self._failure = self._failure or error
        finally:
            self._slots.release()

    async def _complete(self) -> bool:
        parts = [self._parts[n] for n in sorted(self._parts)]
        kwargs: dict[str, Any] = {
            "Bucket": self._store.bucket,
            "Key": self._key,
            "UploadId": self._upload_id,
            "MultipartUpload": {"Parts": parts},
        }
        try:
            await self._store._s3.complete_multipart_upload(IfNoneMatch="*", **kwargs)
        except ClientError as exc:
            if http_status(exc) == 412 or error_code(exc) == "PreconditionFailed":
                await self._abort()
                return False
            if error_code(exc) == "NotImplemented" or http_status(exc) == 501:
                log.warning(
                    "%s: the store does not take If-None-Match on CompleteMultipartUpload; "
                    "completing without it (the key's nonce keeps writers apart)",
                    self._key,
                )
                return await self._complete_unconditionally(kwargs)
            raise self._complete_error(exc) from exc
        except Exception as exc:
            raise self._complete_error(exc) from exc
        return True

    async def _complete_unconditionally(self, kwargs: dict[str, Any]) -> bool:
        try:
            await self._store._s3.complete_multipart_upload(**kwargs)
        except Exception as exc:
            raise self._complete_error(exc) from exc
        return True

    def _complete_error(self, exc: BaseException) -> DeltalogError:
        if isinstance(exc, ClientError) and error_code(exc) == "EntityTooSmall":
            return ConfigurationError(
                f"the store refused parts of {self._part_size} bytes as too small: raise "
                "part_size (S3 needs at least 5 MiB)",
                key=self._key,
            )
        return self._store._error(exc, "complete multipart upload", self._key, ambiguous=True)

    async def _abort(self) -> None:
        """Abort the multipart upload (best effort, shielded): its parts cost storage."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(30):
            try:
                await self._store._s3.abort_multipart_upload(
                    Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id
                )
            except Exception as exc:
                log.warning("could not abort the multipart upload to %s: %s", self._key, exc)
