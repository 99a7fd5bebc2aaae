"""Streaming transfers: part sizes, the thread-to-upload pipe, ordered ranged downloads."""

from __future__ import annotations

import hashlib
import threading

import anyio
import anyio.lowlevel
import pytest

from deltalog.storage.transfer import (
    MAX_PARTS,
    ThreadWriter,
    Transferred,
    download_ranges,
    part_size_for,
    upload_from_thread,
)


class Boom(Exception):
    pass


def test_parts_grow_so_ten_thousand_reach_past_five_gib_at_five_mib() -> None:
    sizes = [part_size_for(n, 5 * 1024 * 1024) for n in range(1, MAX_PARTS + 1)]
    assert sizes[0] == sizes[999] == 5 * 1024 * 1024
    assert sizes[1000] == 2 * sizes[0] and sizes[-1] == 10 * sizes[0]
    assert sum(sizes) > 250 * 1024**3  # 5 GiB is about 1,000 parts of 5 MiB


class StalledUpload:
    """An upload whose writes never finish: chunks pile up between thread and loop."""

    def __init__(self) -> None:
        self.chunks = 0

    async def write(self, data: bytes) -> None:
        self.chunks += 1
        await anyio.sleep_forever()

    async def complete(self) -> Transferred:
        raise AssertionError("never completed")


async def test_a_thread_blocked_on_a_full_queue_stops_when_the_upload_is_abandoned() -> None:
    upload = StalledUpload()
    stopped = threading.Event()
    written: list[int] = []

    def produce(writer: ThreadWriter) -> None:
        try:
            while True:
                writer.write(b"x" * 100)
                written.append(100)
        finally:
            stopped.set()

    with anyio.move_on_after(0.5):
        await upload_from_thread(upload, produce, chunk=100, depth=2)
    assert stopped.is_set(), "the thread stopped before upload_from_thread returned"
    assert len(written) <= 4, "at most depth chunks (and one in hand) waited"


async def test_what_the_thread_writes_arrives_in_order_and_whole() -> None:
    received: list[bytes] = []

    class Collect:
        async def write(self, data: bytes) -> None:
            received.append(data)
            await anyio.lowlevel.checkpoint()

        async def complete(self) -> Transferred:
            data = b"".join(received)
            return Transferred("k", len(data), hashlib.sha256(data).hexdigest(), 1)

    def produce(writer: ThreadWriter) -> str:
        for i in range(200):
            writer.write(bytes([i]) * 37)
        return "done"

    upload = Collect()
    result = await upload_from_thread(upload, produce, chunk=1000, depth=3)
    done = await upload.complete()
    expected = b"".join(bytes([i]) * 37 for i in range(200))
    assert result == "done" and b"".join(received) == expected and done.size == len(expected)


async def test_a_failing_upload_stops_the_thread_and_raises_its_error() -> None:
    stopped = threading.Event()

    class Failing:
        async def write(self, data: bytes) -> None:
            raise Boom

        async def complete(self) -> Transferred:
            raise AssertionError("never completed")

    def produce(writer: ThreadWriter) -> None:
        try:
            while True:
                writer.write(b"y" * 100)
        finally:
            stopped.set()

    with pytest.raises(Boom):
        await upload_from_thread(Failing(), produce, chunk=100, depth=2)
    assert stopped.is_set()


async def test_an_upload_cancelled_before_its_thread_starts_leaves_no_stream_open() -> None:
    """Cancelled on entry, the thread never runs and never closes the pipe: the loop side does."""
    import gc
    import warnings

    started = threading.Event()

    def produce(writer: ThreadWriter) -> None:
        started.set()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await upload_from_thread(StalledUpload(), produce, chunk=100, depth=2)
        gc.collect()
    assert not started.is_set(), "the thread never ran"
    unclosed = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, [str(w.message) for w in unclosed]


async def test_ranges_are_written_in_order_whatever_order_they_arrive_in() -> None:
    data = bytes(range(256)) * 40
    out: list[bytes] = []
    delays = {start: (start * 7919) % 13 / 1000 for start in range(0, len(data), 512)}
    in_flight = peak = 0

    async def fetch(start: int, end: int) -> bytes:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(delays[start])
        in_flight -= 1
        return data[start:end]

    async def write(chunk: bytes) -> None:
        out.append(chunk)

    done = await download_ranges(
        "k", data[:512], len(data), fetch, write, part_size=512, concurrency=3
    )
    assert b"".join(out) == data
    assert (done.size, done.sha256, done.parts) == (
        len(data),
        hashlib.sha256(data).hexdigest(),
        20,
    )
    assert 1 < peak <= 3


async def test_a_failed_range_stops_the_download_with_its_error() -> None:
    data = b"z" * 5000

    async def fetch(start: int, end: int) -> bytes:
        if start == 2000:
            raise Boom
        return data[start:end]

    async def write(chunk: bytes) -> None:
        return None

    with pytest.raises(Boom):
        await download_ranges(
            "k", data[:1000], len(data), fetch, write, part_size=1000, concurrency=2
        )
