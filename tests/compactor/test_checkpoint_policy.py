"""The checkpoint policy, a pure function: properties over random tails and runs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compactor.checkpoint import CheckpointPolicy, Tail
from deltalog import InvalidInput

sizes = st.integers(0, 10**12)
caps = st.none() | st.integers(1, 10**6)
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
    if policy.max_tail_entries is not None:
        assert tail.entries < policy.max_tail_entries
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
        ({"max_tail_bytes": -1}, "max_tail_bytes"),
    ],
)
def test_bad_policies_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        CheckpointPolicy(**options)  # type: ignore[arg-type]
