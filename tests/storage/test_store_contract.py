"""The object store contract, run against every adapter.

``StoreContract`` holds the tests; each adapter's class only says how to
build the store (eventsourcing's ``tests/persistence.py`` pattern).
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from deltalog import Closed, ConfigurationError, LogConfig
from deltalog.storage.faults import Fault, FaultProxy, Request
from deltalog.storage.s3 import MultipartUpload, S3Store
from deltalog.storage.store import MemoryStore, ObjectStore
from deltalog.storage.transfer import ThreadWriter, upload_from_thread

PART = 4096
"""The part size of the stores under test: archives of several parts stay small."""


class Boom(Exception):
    """Raised inside an upload to see it aborted."""


class StoreContract:
    """Every ``ObjectStore`` adapter passes these."""

    @pytest.fixture
    def prefix(self) -> str:
        return f"contract-{uuid.uuid4().hex[:12]}/"

    async def _list(
        self, store: ObjectStore, prefix: str, start_after: str = "", page_size: int = 1000
    ) -> list[str]:
        return [
            info.key async for info in store.list_after(prefix, start_after, page_size=page_size)
        ]

    async def test_put_if_absent_creates_once(self, store: ObjectStore, prefix: str) -> None:
        key = f"{prefix}a"
        assert await store.put_if_absent(key, b"first") is True
        assert await store.put_if_absent(key, b"second") is False
        stored = await store.get(key)
        assert stored is not None
        assert (stored.key, stored.data) == (key, b"first")
        assert abs(stored.last_modified - time.time()) < 120

    async def test_concurrent_creators_have_one_winner(
        self, store: ObjectStore, prefix: str
    ) -> None:
        key = f"{prefix}race"
        won: list[bytes] = []

        async def put(n: int) -> None:
            data = f"writer {n}".encode()
            if await store.put_if_absent(key, data):
                won.append(data)

        async with anyio.create_task_group() as tg:
            for n in range(10):
                tg.start_soon(put, n)
        assert len(won) == 1
        stored = await store.get(key)
        assert stored is not None and stored.data == won[0]

    async def test_bytes_come_back_exactly(self, store: ObjectStore, prefix: str) -> None:
        data = bytes(range(256)) * 64
        assert await store.put_if_absent(f"{prefix}bin", data)
        assert await store.put_if_absent(f"{prefix}empty", b"")
        stored, empty = await store.get(f"{prefix}bin"), await store.get(f"{prefix}empty")
        assert stored is not None and stored.data == data
        assert empty is not None and empty.data == b""

    async def test_the_clock_is_the_one_objects_are_stamped_with(
        self, store: ObjectStore, prefix: str
    ) -> None:
        before = await store.clock(prefix)
        assert await store.put_if_absent(f"{prefix}stamped", b"x")
        after = await store.clock(prefix)
        stored = await store.get(f"{prefix}stamped")
        assert stored is not None
        # The store's clock may count whole seconds (S3's Date header).
        assert before - 1 <= stored.last_modified <= after + 1

    async def test_get_of_a_missing_key_is_none(self, store: ObjectStore, prefix: str) -> None:
        assert await store.get(f"{prefix}missing") is None

    async def test_list_after_orders_keys_and_starts_after(
        self, store: ObjectStore, prefix: str
    ) -> None:
        names = ["05", "01", "10", "03", "02", "07", "04"]
        for name in names:
            assert await store.put_if_absent(f"{prefix}{name}", name.encode())
        assert await store.put_if_absent(f"{prefix[:-1]}-other/01", b"not ours")
        everything = [f"{prefix}{n}" for n in sorted(names)]
        assert await self._list(store, prefix) == everything
        assert await self._list(store, prefix, f"{prefix}03") == everything[3:]
        assert await self._list(store, prefix, f"{prefix}06") == everything[5:]
        assert await self._list(store, prefix, f"{prefix}10") == []
        assert await self._list(store, prefix, f"{prefix[:-1]}") == everything

    async def test_list_after_pages(self, store: ObjectStore, prefix: str) -> None:
        keys = [f"{prefix}{n:03d}" for n in range(7)]
        for key in reversed(keys):
            assert await store.put_if_absent(key, b"x")
        assert await self._list(store, prefix, page_size=2) == keys
        assert await self._list(store, prefix, keys[2], page_size=2) == keys[3:]
        assert await self._list(store, prefix, keys[1], page_size=1) == keys[2:]

    async def test_list_after_crosses_growing_pages(self, store: ObjectStore, prefix: str) -> None:
        """S3Store's pages start small and double: 200 keys take pages of 64, 128, 8."""
        keys = [f"{prefix}{n:03d}" for n in range(200)]
        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(store.put_if_absent, key, b"x")
        assert await self._list(store, prefix) == keys
        assert await self._list(store, prefix, keys[63]) == keys[64:]
        assert await self._list(store, prefix, keys[100], page_size=50) == keys[101:]

    async def test_list_after_reports_sizes(self, store: ObjectStore, prefix: str) -> None:
        assert await store.put_if_absent(f"{prefix}a", b"12345")
        infos = [info async for info in store.list_after(prefix)]
        assert [(i.key, i.size) for i in infos] == [(f"{prefix}a", 5)]
        assert abs(infos[0].last_modified - time.time()) < 120

    async def test_list_of_an_empty_prefix_is_empty(self, store: ObjectStore, prefix: str) -> None:
        assert await self._list(store, prefix) == []

    async def test_delete(self, store: ObjectStore, prefix: str) -> None:
        key = f"{prefix}a"
        assert await store.put_if_absent(key, b"x")
        await store.delete(key)
        assert await store.get(key) is None
        assert await self._list(store, prefix) == []
        await store.delete(key)  # a missing key is not an error
        assert await store.put_if_absent(key, b"y")

    async def test_upload_and_download_files(
        self, store: ObjectStore, prefix: str, tmp_path: Path
    ) -> None:
        source, target = tmp_path / "source", tmp_path / "target"
        data = bytes(range(256)) * 50  # over three parts
        source.write_bytes(data)
        key = f"{prefix}file"
        assert await store.upload_file(key, source) is True
        assert await store.upload_file(key, tmp_path / "source") is False
        got = await store.download_file(key, target)
        assert got is not None and got.sha256 == hashlib.sha256(data).hexdigest()
        assert target.read_bytes() == data
        missing = tmp_path / "missing"
        assert await store.download_file(f"{prefix}nothing", missing) is None
        assert not missing.exists()

    async def test_a_streamed_upload_of_many_parts_comes_back_exactly(
        self, store: ObjectStore, prefix: str, tmp_path: Path
    ) -> None:
        data = bytes(range(256)) * 97 + b"tail"  # 24,836 bytes: six parts and a short one
        key = f"{prefix}streamed"
        async with store.upload(key) as upload:
            for start in range(0, len(data), 1000):  # writes do not line up with parts
                await upload.write(data[start : start + 1000])
            assert await store.get(key) is None  # nothing exists before completion
            done = await upload.complete()
        digest = hashlib.sha256(data).hexdigest()
        assert (done.key, done.size, done.sha256, done.parts) == (key, len(data), digest, 7)
        assert done.created
        got = await store.download_file(key, tmp_path / "back")
        assert got is not None
        assert (got.size, got.sha256, got.parts) == (len(data), digest, 7)
        assert (tmp_path / "back").read_bytes() == data

    async def test_a_streamed_upload_is_put_if_absent(
        self, store: ObjectStore, prefix: str
    ) -> None:
        key = f"{prefix}taken"
        assert await store.put_if_absent(key, b"first")
        for size in (10, 3 * PART + 1):  # one request, and a multipart upload
            async with store.upload(key) as upload:
                await upload.write(b"x" * size)
                refused = await upload.complete()
            assert not refused.created
            assert refused.sha256 == hashlib.sha256(b"x" * size).hexdigest()
        stored = await store.get(key)
        assert stored is not None and stored.data == b"first"

    async def test_an_upload_left_without_completing_creates_nothing(
        self, store: ObjectStore, prefix: str
    ) -> None:
        key = f"{prefix}aborted"

        async def fail() -> None:
            async with store.upload(key) as upload:
                await upload.write(b"y" * (3 * PART))
                raise Boom

        with pytest.raises(Boom):
            await fail()
        async with store.upload(key) as upload:
            await upload.write(b"z" * (2 * PART))
        assert await store.get(key) is None
        assert await self._list(store, prefix) == []

    async def test_an_empty_upload_and_download(
        self, store: ObjectStore, prefix: str, tmp_path: Path
    ) -> None:
        key = f"{prefix}empty"
        async with store.upload(key) as upload:
            done = await upload.complete()
        assert done.created and (done.size, done.sha256) == (0, hashlib.sha256().hexdigest())
        got = await store.download_file(key, tmp_path / "empty")
        assert got is not None and got.size == 0
        assert (tmp_path / "empty").read_bytes() == b""

    async def test_a_worker_thread_streams_into_an_upload(
        self, store: ObjectStore, prefix: str
    ) -> None:
        data = bytes(range(256)) * 100
        key = f"{prefix}threaded"

        def produce(writer: ThreadWriter) -> int:
            for start in range(0, len(data), 777):
                writer.write(data[start : start + 777])
            return 42

        async with store.upload(key) as upload:
            result = await upload_from_thread(upload, produce, chunk=PART, depth=2)
            done = await upload.complete()
        assert result == 42 and done.created and done.size == len(data)
        stored = await store.get(key)
        assert stored is not None and stored.data == data

    async def test_a_thread_that_fails_completes_nothing(
        self, store: ObjectStore, prefix: str
    ) -> None:
        key = f"{prefix}failed"

        def produce(writer: ThreadWriter) -> None:
            writer.write(b"w" * (5 * PART))
            raise Boom

        async def upload() -> None:
            async with store.upload(key) as upload:
                await upload_from_thread(upload, produce, chunk=PART, depth=2)

        with pytest.raises(Boom):
            await upload()
        assert await store.get(key) is None

    async def test_a_cancelled_upload_stops_its_thread(
        self, store: ObjectStore, prefix: str
    ) -> None:
        """The caller gives up while the thread still writes: nothing hangs, nothing is made."""
        key = f"{prefix}cancelled"
        writing, stopped = threading.Event(), threading.Event()

        def produce(writer: ThreadWriter) -> None:
            try:
                while True:
                    writer.write(b"c" * PART)
                    writing.set()
            finally:
                stopped.set()

        async with store.upload(key) as upload, anyio.create_task_group() as tg:

            async def stream() -> None:
                await upload_from_thread(upload, produce, chunk=PART, depth=2)

            tg.start_soon(stream)
            await anyio.to_thread.run_sync(writing.wait)
            tg.cancel_scope.cancel()
        assert await anyio.to_thread.run_sync(stopped.wait, 10)
        assert await store.get(key) is None


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self) -> MemoryStore:
        return MemoryStore(part_size=PART)

    async def test_overwrite_replaces_bytes(self, store: MemoryStore) -> None:
        assert await store.put_if_absent("k", b"a")
        store.overwrite("k", b"b")
        stored = await store.get("k")
        assert stored is not None and stored.data == b"b"


class TestS3Store(StoreContract):
    @pytest.fixture
    async def store(self, config: LogConfig) -> AsyncIterator[S3Store]:
        store = await S3Store.connect(replace(config, part_size=PART, transfer_concurrency=3))
        yield store
        await store.aclose()

    async def test_multipart_uploads_leave_no_parts_behind(
        self, store: S3Store, prefix: str
    ) -> None:
        for key, complete in ((f"{prefix}done", True), (f"{prefix}dropped", False)):
            async with store.upload(key) as upload:
                await upload.write(b"p" * (3 * PART))
                if complete:
                    assert (await upload.complete()).created
        async with store.upload(f"{prefix}done") as upload:  # refused: aborted too
            await upload.write(b"q" * (3 * PART))
            assert not (await upload.complete()).created
        pending = await store._s3.list_multipart_uploads(Bucket=store.bucket, Prefix=prefix)
        assert pending.get("Uploads", []) == []

    async def test_an_upload_cancelled_from_outside_with_a_part_in_flight_is_aborted(
        self, config: LogConfig, prefix: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A stop signal cancels the scope around the upload while a part hangs (held at a
        proxy). The part takes a moment to stop (a body still being sent), so the outer
        cancellation reaches the upload while it waits for its parts, and leaving their task
        group raises it again: the upload is still aborted on the way out (a compactor
        stopped by SIGINT mid-publish left one on S3 before)."""
        key = f"{prefix}cancelled"
        reached, go = anyio.Event(), anyio.Event()
        put_part = MultipartUpload._put_part

        async def slow_to_stop(upload: MultipartUpload, number: int, data: bytes) -> None:
            try:
                await put_part(upload, number, data)
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(0.2)

        monkeypatch.setattr(MultipartUpload, "_put_part", slow_to_stop)

        def second_part(request: Request) -> bool:
            if request.method == "PUT" and "partNumber=2" in request.query:
                reached.set()
                return True
            return False

        assert config.endpoint_url is not None
        async with FaultProxy(config.endpoint_url) as proxy:
            proxy.script(Fault.DELAY, when=second_part, until=go.wait)
            store = await S3Store.connect(
                replace(config, endpoint_url=proxy.url, part_size=PART, transfer_concurrency=3)
            )
            try:
                with anyio.CancelScope() as outer:
                    async with store.upload(key) as upload:
                        await upload.write(b"p" * (3 * PART))
                        await reached.wait()
                        outer.cancel()
                        await anyio.sleep_forever()
                assert outer.cancelled_caught
            finally:
                go.set()
                await store.aclose()
        assert await self._uploads(config, prefix) == [], "the upload was aborted"

    async def _uploads(self, config: LogConfig, prefix: str) -> list[str]:
        store = await S3Store.connect(config)
        try:
            listed = await store._s3.list_multipart_uploads(Bucket=store.bucket, Prefix=prefix)
        finally:
            await store.aclose()
        return [u["Key"] for u in listed.get("Uploads", [])]

    async def test_parts_below_the_stores_minimum_say_to_raise_part_size(
        self, config: LogConfig
    ) -> None:
        store = await S3Store.connect(replace(config, part_size=100))  # moto's minimum: 1 KiB

        async def upload() -> None:
            async with store.upload("small-parts") as upload:
                await upload.write(b"s" * 500)
                await upload.complete()

        try:
            with pytest.raises(ConfigurationError, match="raise part_size"):
                await upload()
        finally:
            await store.aclose()

    async def test_a_missing_bucket_says_to_run_init(self, config: LogConfig) -> None:
        config = replace(config, bucket=f"missing-{uuid.uuid4().hex[:12]}")
        store = await S3Store.connect(config)
        try:
            with pytest.raises(ConfigurationError, match="deltalog init --bucket missing-"):
                await store.put_if_absent("k", b"x")
            with pytest.raises(ConfigurationError, match="does not exist"):
                await store.get("k")
            with pytest.raises(ConfigurationError, match="does not exist"):
                await anext(aiter(store.list_after("")))
        finally:
            await store.aclose()

    async def test_ensure_bucket_is_idempotent(self, config: LogConfig) -> None:
        store = await S3Store.connect(replace(config, bucket=f"new-{uuid.uuid4().hex[:12]}"))
        try:
            assert await store.ensure_bucket() is True
            assert await store.ensure_bucket() is False
            assert await store.put_if_absent("k", b"x")
        finally:
            await store.aclose()

    async def test_a_closed_store_raises_closed(self, config: LogConfig) -> None:
        store = await S3Store.connect(config)
        await store.aclose()
        with pytest.raises(Closed):
            await store.get("k")
