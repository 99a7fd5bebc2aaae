"""Reading a log: order across prefetch windows, bounds, holes, bad entries."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest

from deltalog import Closed, CorruptEntry, DataError, DeltaLog, Entry, LogConfig, Unavailable
from deltalog.storage.aws import client
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import MemoryTable
from tests.builders import batch_of, delete
from tests.faulty import faulty_log


async def _fill(log: DeltaLog, count: int) -> list[str]:
    """Append ``count`` one-delta entries at seqs 1..count; return their delta ids."""
    ids = []
    for n in range(count):
        d = delete(f"x{n}")
        assert await log.append(d) == n + 1
        ids.append(d.delta_id)
    return ids


async def _collect(reader: object, into: list[tuple[int, Entry]]) -> None:
    async for item in reader:  # type: ignore[attr-defined]
        into.append(item)


def _ids(entries: list[tuple[int, Entry]]) -> list[str]:
    return [batch_of(entry).deltas[0].delta_id for _, entry in entries]


@pytest.mark.parametrize("prefetch", [1, 3, 32])
async def test_entries_come_in_seq_order_across_windows(
    memory_log: DeltaLog, prefetch: int
) -> None:
    ids = await _fill(memory_log, 10)
    reader = memory_log.read(prefetch=prefetch)
    got = [item async for item in reader]
    assert [seq for seq, _ in got] == list(range(1, 11))
    assert _ids(got) == ids
    assert reader.end is not None
    assert (reader.end.seq, reader.end.head, reader.end.reason) == (11, 10, "end")
    assert reader.bytes_read > 0


async def test_a_read_that_does_not_classify_its_end_skips_the_counter(
    memory_log: DeltaLog,
) -> None:
    await _fill(memory_log, 3)
    table = memory_log.table
    assert isinstance(table, MemoryTable)
    before = table.requests
    reader = memory_log.read(after=1, classify_end=False)
    assert [seq async for seq, _ in reader] == [2, 3]
    assert reader.end is None
    assert table.requests == before, "no counter read"
    classified = memory_log.read(after=1)
    assert [seq async for seq, _ in classified] == [2, 3]
    assert classified.end is not None and classified.end.reason == "end"
    assert table.requests == before + 1


async def test_read_on_moto_in_small_windows(log: DeltaLog) -> None:
    ids = await _fill(log, 7)
    got = [item async for item in log.read(prefetch=2)]
    assert _ids(got) == ids


async def test_after_and_to_seq_bound_the_read(memory_log: DeltaLog) -> None:
    ids = await _fill(memory_log, 10)
    after = memory_log.read(after=4, prefetch=3)
    assert _ids([item async for item in after]) == ids[4:]
    assert after.end is not None and after.end.reason == "end"

    limited = memory_log.read(to_seq=6, prefetch=4)
    assert [seq async for seq, _ in limited] == [1, 2, 3, 4, 5, 6]
    assert limited.end is not None and (limited.end.seq, limited.end.reason) == (7, "limit")

    window = memory_log.read(after=2, to_seq=5)
    assert [seq async for seq, _ in window] == [3, 4, 5]

    empty = memory_log.read(after=3, to_seq=3)
    assert [seq async for seq, _ in empty] == []
    assert empty.end is not None and (empty.end.seq, empty.end.reason) == (4, "limit")

    past = memory_log.read(after=10)
    assert [seq async for seq, _ in past] == []
    assert past.end is not None and (past.end.seq, past.end.reason) == (11, "end")

    beyond = memory_log.read(to_seq=50)
    assert len([seq async for seq, _ in beyond]) == 10
    assert beyond.end is not None and beyond.end.reason == "end"


@pytest.mark.parametrize(("after", "to_seq", "prefetch"), [(-1, None, 1), (5, 4, 1), (0, None, 0)])
def test_bad_bounds_are_refused(
    memory_log: DeltaLog, after: int, to_seq: int | None, prefetch: int
) -> None:
    with pytest.raises(ValueError, match="after"):
        memory_log.read(after, to_seq=to_seq, prefetch=prefetch)


async def test_a_read_stops_at_a_hole_and_names_the_next_entry(log: DeltaLog) -> None:
    await _fill(log, 5)
    assert await log.table.reserve(log.keys.log_id) == 6
    assert await log.append(delete("late")) == 7
    reader = log.read(prefetch=2)
    assert [seq async for seq, _ in reader] == [1, 2, 3, 4, 5]
    end = reader.end
    assert end is not None and end.is_hole
    assert (end.seq, end.head) == (6, 7)
    assert end.next_entry is not None and end.next_entry.key == log.keys.entry(7)
    assert end.next_entry.size > 0 and end.next_entry.last_modified > 0


async def test_a_hole_at_the_tail_has_no_next_entry(memory_log: DeltaLog) -> None:
    await _fill(memory_log, 2)
    await memory_log.table.reserve(memory_log.keys.log_id)
    reader = memory_log.read()
    assert [seq async for seq, _ in reader] == [1, 2]
    assert reader.end is not None and reader.end.is_hole
    assert (reader.end.seq, reader.end.next_entry) == (3, None)


@pytest.mark.parametrize("bad", [1, 4, 5, 8])
async def test_a_corrupt_entry_raises_after_every_entry_before_it(
    memory_log: DeltaLog, bad: int
) -> None:
    ids = await _fill(memory_log, 8)
    store = memory_log.store
    assert isinstance(store, MemoryStore)
    key = memory_log.keys.entry(bad)
    stored = await store.get(key)
    assert stored is not None
    damaged = bytearray(stored.data)
    damaged[-1] ^= 0xFF
    store.overwrite(key, bytes(damaged))
    got: list[tuple[int, Entry]] = []
    with pytest.raises(CorruptEntry, match="body checksum") as caught:
        await _collect(memory_log.read(prefetch=4), got)
    assert _ids(got) == ids[: bad - 1]
    error = caught.value
    assert (error.log, error.seq, error.key) == (memory_log.config.log, bad, key)
    assert memory_log.config.log in str(error) and key in str(error)


async def test_corrupt_bytes_on_s3_are_reported(log: DeltaLog) -> None:
    ids = await _fill(log, 5)
    key = log.keys.entry(4)
    async with AsyncExitStack() as stack:
        raw = await client(stack, log.config, "s3")
        entry_two = await log.store.get(log.keys.entry(2))
        assert entry_two is not None
        # An object copied to the wrong seq: its header names seq 2.
        await raw.put_object(Bucket=log.config.bucket, Key=key, Body=entry_two.data)
    got: list[tuple[int, Entry]] = []
    with pytest.raises(CorruptEntry, match="another seq") as caught:
        await _collect(log.read(prefetch=2), got)
    assert _ids(got) == ids[:3]
    assert (caught.value.log, caught.value.seq, caught.value.key) == (log.config.log, 4, key)


async def test_an_unavailable_store_raises_unavailable_in_order(config: LogConfig) -> None:
    async with faulty_log(config) as (log, store, _):
        ids = await _fill(log, 6)
        store.broken_gets.add(log.keys.entry(5))
        reader = log.read(prefetch=3)
        got: list[tuple[int, Entry]] = []
        with pytest.raises(Unavailable, match="injected: get failed"):
            await _collect(reader, got)
        assert _ids(got) == ids[:4]
        # The same reader, once the store recovers, reads everything.
        store.broken_gets.clear()
        got = []
        await _collect(reader, got)
        assert _ids(got) == ids


async def test_a_listed_entry_that_is_gone_is_a_data_error(config: LogConfig) -> None:
    async with faulty_log(config) as (log, store, _):
        await _fill(log, 3)
        store.vanished.add(log.keys.entry(2))
        got: list[tuple[int, Entry]] = []
        with pytest.raises(DataError, match="never be deleted") as caught:
            await _collect(log.read(), got)
        assert [seq for seq, _ in got] == [1]
        assert caught.value.seq == 2


async def test_a_closed_log_cannot_be_read(config: LogConfig) -> None:
    async with DeltaLog.open(config) as log:
        pass
    with pytest.raises(Closed, match="closed"):
        log.read()
