"""The checkpoint policy, a pure function: properties over random tails and runs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compactor.checkpoint import (
    AUTO,
    CHECKPOINT_BYTES_PER_TAIL_ENTRY,
    MIN_AUTO_TAIL_ENTRIES,
    CheckpointPolicy,
    Tail,
    parse_entry_cap,
)
from deltalog import InvalidInput

sizes = st.integers(0, 10**12)
caps = st.none() | st.integers(1, 10**6) | st.just(AUTO)
policies = st.builds(
    CheckpointPolicy,
    ratio=st.floats(0, 1),
    max_tail_entries=caps,
    max_tail_bytes=st.none() | st.integers(1, 10**12),
)
tails = st.builds(Tail, entries=st.integers(0, 10**6), bytes=sizes, checkpoint_bytes=sizes)


@given(policy=policies, tail=tails)
def test_a_tail_that_is_not_published_stays_under_every_bound(
    policy: CheckpointPolicy, tail: Tail
) -> None:
    """With a ratio <= 1 the committed tail stays smaller than the checkpoint."""
    if policy.reason(tail) is not None:
        return
    assert tail.entries == 0 or tail.bytes < policy.ratio * tail.checkpoint_bytes
    assert tail.entries == 0 or tail.bytes < tail.checkpoint_bytes
    cap = policy.entry_cap(tail.checkpoint_bytes)
    if cap is not None:
        assert tail.entries < cap
    if policy.max_tail_bytes is not None:
        assert tail.entries == 0 or tail.bytes < policy.max_tail_bytes


@given(policy=policies, tail=tails, more_entries=st.integers(0, 1000), more_bytes=sizes)
def test_a_longer_tail_is_published_whenever_a_shorter_one_is(
    policy: CheckpointPolicy, tail: Tail, more_entries: int, more_bytes: int
) -> None:
    longer = Tail(tail.entries + more_entries, tail.bytes + more_bytes, tail.checkpoint_bytes)
    if policy.reason(tail) is not None and tail.entries > 0:
        assert policy.reason(longer) is not None


@given(
    policy=policies,
    checkpoint=st.integers(1, 10**9),
    runs=st.lists(st.tuples(st.integers(1, 50), st.integers(0, 10**7)), max_size=40),
)
def test_runs_publish_so_the_committed_tail_never_passes_the_checkpoint(
    policy: CheckpointPolicy, checkpoint: int, runs: list[tuple[int, int]]
) -> None:
    """A sequence of runs: after each commit, the tail is under the checkpoint's size."""
    tail_entries = tail_bytes = 0
    for entries, size in runs:
        tail = Tail(tail_entries + entries, tail_bytes + size, checkpoint)
        if policy.reason(tail) is None:
            tail_entries, tail_bytes = tail.entries, tail.bytes
        else:
            checkpoint, tail_entries, tail_bytes = checkpoint + size, 0, 0
        assert tail_bytes < checkpoint or tail_bytes == 0


@given(policy=policies, tail=tails)
def test_a_request_or_no_checkpoint_always_publishes(policy: CheckpointPolicy, tail: Tail) -> None:
    assert policy.reason(tail, requested=True) == "requested"
    first = Tail(tail.entries, tail.bytes, 0, has_checkpoint=False)
    assert policy.reason(first) == "first"


@given(checkpoint=sizes)
def test_the_auto_entry_cap_scales_with_the_checkpoint(checkpoint: int) -> None:
    """One seq per 64 KiB of checkpoint, never under 2,000: a cold start's tail reads take
    about as long as the checkpoint's download."""
    cap = CheckpointPolicy().entry_cap(checkpoint)
    assert cap == max(MIN_AUTO_TAIL_ENTRIES, checkpoint // CHECKPOINT_BYTES_PER_TAIL_ENTRY)
    assert CheckpointPolicy(max_tail_entries=7).entry_cap(checkpoint) == 7
    assert CheckpointPolicy(max_tail_entries=None).entry_cap(checkpoint) is None


def test_the_auto_cap_lets_the_ratio_decide_on_a_large_checkpoint() -> None:
    """Runs of 100 entries of 7.4 KB on a 319 MB checkpoint (the benchmark's): a fixed
    2,000-entry cap published after 15 MB of entries, ``auto`` waits for the ratio's 32 MB."""
    checkpoint, entry = 319 * 10**6, 7_400
    tail = Tail(2_000, 2_000 * entry, checkpoint)
    assert CheckpointPolicy(max_tail_entries=2_000).reason(tail) == "entries"
    assert CheckpointPolicy().reason(tail) is None
    entries = -(-checkpoint // 10 // entry)
    assert CheckpointPolicy().reason(Tail(entries, entries * entry, checkpoint)) == "ratio"
    small = Tail(2_000, 2_000 * 300, 40 * 10**6)  # label updates on a 40 MB checkpoint
    assert CheckpointPolicy().reason(small) == "entries"


@pytest.mark.parametrize(
    ("text", "cap"), [("auto", AUTO), (" AUTO ", AUTO), ("5000", 5000), ("0", None)]
)
def test_entry_caps_parse(text: str, cap: object) -> None:
    assert parse_entry_cap(text) == cap


@pytest.mark.parametrize("text", ["", "-1", "2k", "1.5", "none"])
def test_bad_entry_caps_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="not an entry cap"):
        parse_entry_cap(text)


def test_each_reason() -> None:
    policy = CheckpointPolicy(ratio=0.1, max_tail_entries=10, max_tail_bytes=500)
    assert policy.reason(Tail(0, 0, 1000)) is None
    assert policy.reason(Tail(3, 99, 1000)) is None
    assert policy.reason(Tail(3, 100, 1000)) == "ratio"
    assert policy.reason(Tail(10, 5, 1000)) == "entries"
    assert policy.reason(Tail(3, 500, 10_000)) == "bytes"
    every_run = CheckpointPolicy(ratio=0)
    assert every_run.reason(Tail(1, 0, 10**9)) == "ratio"
    assert every_run.reason(Tail(0, 0, 10**9)) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": -0.5}, "checkpoint_ratio"),
        ({"ratio": float("nan")}, "checkpoint_ratio"),
        ({"max_tail_entries": 0}, "max_tail_entries"),
        ({"max_tail_entries": "many"}, "max_tail_entries"),
        ({"max_tail_bytes": -1}, "max_tail_bytes"),
    ],
)
def test_bad_policies_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        CheckpointPolicy(**options)  # type: ignore[arg-type]


def test_a_shards_ratio_counts_its_share_of_the_tail_and_its_caps_every_byte() -> None:
    """Each entry carries every shard's records: a shard of ten publishes by the ratio when
    its share (a tenth of the tail's bytes) reaches it, not ten times as often."""
    policy = CheckpointPolicy(ratio=0.1, max_tail_entries=None, max_tail_bytes=None)
    assert policy.reason(Tail(10, 100, 1000)) == "ratio"
    assert policy.reason(Tail(10, 100, 1000, shards=10)) is None
    assert policy.reason(Tail(10, 999, 1000, shards=10)) is None
    assert policy.reason(Tail(10, 1000, 1000, shards=10)) == "ratio"
    capped = CheckpointPolicy(ratio=1.0, max_tail_entries=5, max_tail_bytes=50)
    assert capped.reason(Tail(5, 10, 1000, shards=10)) == "entries", "a cold start reads them all"
    assert capped.reason(Tail(4, 50, 1000, shards=10)) == "bytes"
