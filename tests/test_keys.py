"""Keys: one module builds them, and listing order is seq order."""

from __future__ import annotations

import itertools

import pytest

from deltalog.keys import MAX_SEQ, LogKeys, entry_log, idempotency_sk, valid_log_name, valid_root


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
