"""Keys: one module builds them, and listing order is seq order."""

from __future__ import annotations

import itertools

import pytest

from deltalog.keys import (
    MAX_SEQ,
    MAX_SHARDS,
    LogKeys,
    Shard,
    entry_log,
    idempotency_sk,
    shard_of,
    valid_log_name,
    valid_root,
)


def test_entry_keys_sort_like_their_seqs() -> None:
    keys = LogKeys("", "receipts")
    seqs = [1, 2, 9, 10, 11, 99, 100, 12345, MAX_SEQ]
    assert sorted(keys.entry(s) for s in reversed(seqs)) == [keys.entry(s) for s in seqs]
    assert keys.entry(7) == "receipts/entries/00000000000000000007"


@pytest.mark.parametrize(
    ("root", "log_id", "entries"),
    [
        ("", "receipts", "receipts/entries/"),
        ("prod", "prod/receipts", "prod/receipts/entries/"),
        ("/a/b/", "a/b/receipts", "a/b/receipts/entries/"),
    ],
)
def test_the_root_prefix_qualifies_every_key(root: str, log_id: str, entries: str) -> None:
    keys = LogKeys(root, "receipts")
    assert keys.log_id == log_id
    assert keys.entries_prefix == entries
    assert keys.entry(3).startswith(entries)
    assert keys.snapshots_prefix == f"{log_id}/snapshots/"


def test_seq_of_inverts_entry_and_rejects_everything_else() -> None:
    keys = LogKeys("r", "log")
    for seq in (0, 1, 42, MAX_SEQ):
        assert keys.seq_of(keys.entry(seq)) == seq
    other = LogKeys("r", "log2")
    for key in (
        other.entry(1),
        "r/log/entries/1",
        "r/log/entries/0000000000000000000x",
        "r/log/entries/000000000000000000001",
        keys.snapshot(1, 1, "n"),
    ):
        assert keys.seq_of(key) is None, key


@pytest.mark.parametrize("seq", [-1, MAX_SEQ + 1])
def test_seqs_out_of_range_are_refused(seq: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        LogKeys("", "log").entry(seq)


def test_snapshot_keys_sort_by_hwm_and_name_it() -> None:
    keys = LogKeys("", "log")
    first, second = keys.snapshot(9, 2, "abc"), keys.snapshot(10, 1, "abc", ".tar.zst")
    assert first < second
    assert (keys.snapshot_hwm(first), keys.snapshot_hwm(second)) == (9, 10)
    assert keys.snapshot_hwm(keys.entry(9)) is None


def test_snapshot_keys_parse_strictly_so_a_nested_log_is_never_ours() -> None:
    """Root "" + log x and root x + log snapshots share the prefix ``x/snapshots/``."""
    ours, nested = LogKeys("", "x"), LogKeys("x", "snapshots")
    assert nested.prefix.startswith(ours.snapshots_prefix)
    for key in (nested.snapshot(1, 1, "abc"), nested.entry(1), ours.snapshot(1, 1, "a") + "\n"):
        assert ours.snapshot_hwm(key) is None, key
    assert nested.snapshot_hwm(nested.snapshot(1, 1, "abc")) == 1
    prefix = ours.snapshots_prefix
    for tail in ("1-000000000001-a.tar", f"{1:020d}-1-a.tar", f"{1:020d}-000000000001-a.tgz"):
        assert ours.snapshot_hwm(prefix + tail) is None, tail


def test_names() -> None:
    assert valid_log_name("receipts") and valid_log_name("a.b_c-1") and valid_log_name("x" * 128)
    for bad in ("", "-x", "a/b", "a b", "x" * 129, "ü"):
        assert not valid_log_name(bad), bad
    assert valid_root("") and valid_root("a/b.c/d-e")
    for bad in ("a/../b", "..", "a b", "a\\b"):
        assert not valid_root(bad), bad
    assert idempotency_sk("k") == "idem#k"


@pytest.mark.parametrize(
    ("root", "key", "log"),
    [
        ("", "receipts/entries/00000000000000000007", "receipts"),
        ("prod", "prod/labels.v2/entries/00000000000000000001", "labels.v2"),
        ("/a/b/", "a/b/r-1/entries/00000000000000000042", "r-1"),
        ("", "receipts/snapshots/00000000000000000007-000000000001-ab.tar", None),
        ("", "receipts/entries/7", None),
        ("", "_deltalog/probes/00000000000000000007", None),
        ("prod", "receipts/entries/00000000000000000007", None),
        ("", "a/b/entries/00000000000000000007", None),
    ],
)
def test_an_entry_key_names_its_log(root: str, key: str, log: str | None) -> None:
    assert entry_log(root, key) == log
    if log is not None:
        assert LogKeys(root, log).entry(LogKeys(root, log).seq_of(key) or 0) == key


def test_cache_names_are_one_per_log() -> None:
    """Root x + log snapshots and log x_snapshots used to share a cache directory."""
    assert LogKeys("x", "snapshots").cache_name != LogKeys("", "x_snapshots").cache_name
    assert LogKeys("a/b", "c").cache_name == "a+b+c"
    assert LogKeys("", "c").cache_name == "c" and LogKeys("/a/", "c").cache_name == "a+c"


def test_distinct_log_ids_get_distinct_cache_names() -> None:
    """Every root and log name over a small alphabet that holds '/', '_' and '.'."""
    roots = ["".join(p) for n in range(4) for p in itertools.product("a_./", repeat=n)]
    logs = ["a" + "".join(p) for n in range(3) for p in itertools.product("a_.", repeat=n)]
    keys = [LogKeys(r, log) for r in roots for log in logs if valid_root(r) and valid_log_name(log)]
    names: dict[str, str] = {}
    for k in keys:
        assert names.setdefault(k.cache_name, k.log_id) == k.log_id, (k.cache_name, k.log_id)


RECEIPT = "IMAGE#2f0c5a0e-0000-4000-8000-000000000001#RECEIPT#00001#LINE#00001"


@pytest.mark.parametrize(
    ("collection", "id_", "shards", "digest", "shard"),
    [
        ("words", "w1", 3, "0d8eb6bbc91f8290", 1),
        ("words", "w2", 3, "eb76176446756c4d", 2),
        ("lines", "w1", 3, "fd3ed5933b120e41", 0),
        ("words", f"{RECEIPT}#WORD#00001", 8, "e778d0dd0514f2be", 7),
        ("lines", RECEIPT, 8, "f431d7c1ba6bf6fd", 4),
        ("words", "\u00fc", 5, "97764b235a7bb998", 4),
        ("words", "", 7, "053de3e5e7ecbfbb", 5),
    ],
)
def test_a_records_shard_is_pinned(
    collection: str, id_: str, shards: int, digest: str, shard: int
) -> None:
    """The routing hash, byte for byte: BLAKE2b-64 of collection, 0x00, id; little-endian.

    A change of any of these values moves records between shards of every
    existing sharded log: it must never happen.
    """
    assert int.from_bytes(bytes.fromhex(digest), "little") % shards == shard
    assert shard_of(collection, id_, shards) == shard
    assert shard_of(collection, id_, 1) == 0


def test_shards_split_ids_about_evenly() -> None:
    counts = [0] * 8
    for i in range(8000):
        counts[shard_of("words", f"{RECEIPT}#WORD#{i:05d}", 8)] += 1
    assert min(counts) > 800 and max(counts) < 1200, counts


def test_a_shard_has_its_own_state_snapshots_and_cache_and_the_logs_entries() -> None:
    own = LogKeys("prod", "receipts")
    shard = own.for_shard(Shard(2, 1, 3))
    assert (own.state_sk, shard.state_sk) == ("state", "state#g2-s1")
    assert shard.snapshots_prefix == "prod/receipts/snapshots/g2-s1/"
    assert shard.entries_prefix == own.entries_prefix and shard.log_id == own.log_id
    assert (own.cache_name, shard.cache_name) == ("prod+receipts", "prod+receipts#g2-s1")
    key = shard.snapshot(5, 1, "abc")
    assert shard.snapshot_hwm(key) == 5
    assert own.snapshot_hwm(key) is None, "the log's own retention never parses a shard's key"
    assert shard.for_shard(None) == own


@pytest.mark.parametrize(
    ("generation", "index", "count"), [(0, 0, 1), (1, 3, 3), (1, -1, 3), (1, 0, MAX_SHARDS + 1)]
)
def test_impossible_shards_are_refused(generation: int, index: int, count: int) -> None:
    with pytest.raises(ValueError, match="shard"):
        Shard(generation, index, count)
