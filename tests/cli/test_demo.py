"""``deltalog demo``: the README's main command, run small in a subprocess.

The demo starts its own embedded endpoint (moto's server in a child
process), as it does for a user. The first test checks the story's
structure (each step in order, what each says it did) and the summary with
the hashing embedder; the second runs it with WordLlama, what a fresh
clone without an OpenAI key gets, and checks the neighbours the README
promises (the generator's seed is fixed, so the receipts are too).
"""

from __future__ import annotations

import re
from pathlib import Path

import anyio

from tests.commands import deltalog

RECEIPTS, MORE = 6, 3


def numbers(pattern: str, text: str) -> tuple[int, ...]:
    found = re.search(pattern, text, re.M)
    assert found, f"{pattern!r} not in the demo's output:\n{text}"
    return tuple(int(g.replace(",", "")) for g in found.groups())


async def test_a_small_demo_tells_the_whole_story(tmp_path: Path) -> None:
    run = await deltalog(
        "demo", "--receipts", str(RECEIPTS), "--more", str(MORE), "--embedder", "hash",
        TMPDIR=str(tmp_path),
    )  # fmt: skip
    assert run.code == 0, run.err
    assert "Traceback" not in run.err
    left = await anyio.to_thread.run_sync(lambda: list(tmp_path.glob("deltalog-demo-*")))
    assert not left, "the demo removes its temp dir"
    out = run.out
    steps = [int(n) for n in re.findall(r"^\[(\d+)\] ", out, re.M)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 9, out
    assert re.search(r"^\[1\] S3 \+ DynamoDB endpoint at http://127\.0\.0\.1:\d+", out, re.M)

    first = numbers(rf"^    ({RECEIPTS}) receipts, ([\d,]+) vectors .* as {RECEIPTS} deltas", out)
    second = numbers(rf"^    ({MORE}) receipts, ([\d,]+) vectors .* as {MORE} deltas", out)
    assert re.search(rf"^    {RECEIPTS} receipts, 0 vectors .* as 0 deltas in 0 entries", out, re.M)
    runs = re.findall(r"applied (\d+) entries \(hwm (\d+) -> (\d+)\)", out)
    hwms = [(int(a), int(b)) for _, a, b in runs]
    assert len(hwms) == 3 and hwms[0][0] == 0, runs
    assert hwms[1][0] == hwms[0][1] and hwms[2][0] == hwms[1][1], "each run starts at the last"
    vectors = first[1] + second[1]
    assert numbers(r"^    rebuilt to seq (\d+): ([\d,]+) vectors", out) == (hwms[1][1], vectors)
    assert numbers(r"^    verify: ([\d,]+) records, equal$", out) == (vectors,)

    snapshot = numbers(r"^    snapshot read: new receipt (\d+) words, deleted receipt (\d+) "
                       r"words, 'Corner Market' lines (\d+)$", out)  # fmt: skip
    fresh = numbers(r"^    fresh    read: new receipt (\d+) words, deleted receipt (\d+) "
                    r"words, 'Corner Market' lines (\d+)$", out)  # fmt: skip
    assert snapshot[0] == 0 and snapshot[1] > 0 and snapshot[2] == 0, "the tail is not compacted"
    assert fresh[0] > 0 and fresh[1] == 0 and fresh[2] > 0, "fresh reads see the tail"

    summary = out[out.index("summary") :]
    assert numbers(r"^receipts ingested\s+(\d+)$", summary) == (RECEIPTS + MORE,)
    assert numbers(r"^vectors written\s+([\d,]+)$", summary) == (vectors,)
    assert numbers(r"^log entries \(head\)\s+(\d+)$", summary) == (hwms[2][1],)
    lag = numbers(r"^lag before / after the last run\s+(\d+) / (\d+) entries$", summary)
    assert lag == (hwms[2][1] - hwms[2][0], 0)
    assert numbers(
        r"^rerun of the first file\s+(\d+) duplicates skipped, (\d+) vectors", summary
    ) == (
        RECEIPTS,
        0,
    )
    for name in ("ingest throughput", "compaction throughput", "checkpoint size",
                 "total time"):  # fmt: skip
        assert re.search(rf"^{name}\s+\S", summary, re.M), name
    costs = re.findall(
        r"(\d+) entries \((checkpoint: [\d.,]+ MiB uploaded|tail of \d+: nothing uploaded)\)",
        summary,
    )
    assert [int(n) for n, _ in costs] == [a - b for b, a in hwms], costs
    assert costs[0][1].startswith("checkpoint"), "the first run publishes the first checkpoint"


def results(title: str, out: str) -> list[str]:
    """The documents of the result table printed under ``title``."""
    block = out[out.index(title) :].split("\n")[3:8]
    return [row.split("|")[2].strip().strip("'") for row in block]


async def test_the_demo_searches_by_meaning_with_wordllama(tmp_path: Path) -> None:
    run = await deltalog(
        "demo", "--receipts", "30", "--more", "3", "--embedder", "wordllama", "-q",
        TMPDIR=str(tmp_path),
    )  # fmt: skip
    assert run.code == 0, run.err
    out = run.out
    assert re.search(r"^    embedder wordllama:l2_supercat:256:\S+ \(256 dims\)", out, re.M), out
    walmart = results("words like 'walmart'", out)
    assert walmart[0] == "WAL*MART", walmart
    fruit = results("lines like 'fruit'", out)
    produce = re.compile(r"TOMATO|AVOCADO|STRAWBERR|BANANA|ORANGE|APPLE|GRAPE|LEMON")
    assert produce.search(fruit[0]) and not any("FRUIT" in line for line in fruit), fruit
    paid = results("lines like 'credit card payment'", out)
    assert re.search(r"MASTERCARD|VISA|AMEX|DISCOVER", paid[0]), paid
