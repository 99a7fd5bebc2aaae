"""``deltalog ingest`` and ``deltalog query`` end to end.

On moto's S3 + DynamoDB server (a child process on loopback) and real
Chroma, through ``deltalog.cli.main`` in this process: with the WordLlama
embedder (every connection off loopback refused: the model loads from the
installed wheel and nothing is downloaded), and with the offline hashing
embedder, where a word's own input text finds that word at distance 0.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest

from compactor import Compactor
from deltalog import DeltaLog, LogConfig, Reader, Seal
from deltalog.cli import main
from deltalog.cli.soak import ChildProcesses
from deltalog.receipts.embed import HashingEmbedder
from deltalog.receipts.generate import generate_receipts
from deltalog.receipts.ingest import receipt_key
from deltalog.receipts.model import Receipt, word_inputs, word_records, write_jsonl
from deltalog.receipts.wordllama import NORMALISATION
from deltalog.storage.faults import Fault, FaultProxy, Request
from tests.commands import cli_env
from tests.compaction import until_reached
from tests.network import NetworkGuard, no_network

DIM = 16
WORDLLAMA = f"wordllama:l2_supercat:256:{NORMALISATION}"


@pytest.fixture
def loopback_only() -> Iterator[NetworkGuard]:
    with no_network(loopback=True) as guard:
        yield guard
    assert guard.attempts == []


def where(config: LogConfig) -> list[str]:
    return [
        *("--bucket", config.bucket, "--table", config.table, "--log", config.log),
        *("--endpoint-url", str(config.endpoint_url)),
    ]


def query(config: LogConfig, text: str, *flags: str) -> list[str]:
    search = ["--collection", "words", "--text", text, "--consistency", "fresh"]
    return ["query", *search, *flags, *where(config)]


def test_ingest_and_query_with_wordllama(
    config: LogConfig,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    loopback_only: NetworkGuard,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # auto: WordLlama
    path = tmp_path / "receipts.jsonl"
    write_jsonl(path, generate_receipts(6, seed=14))
    assert main(["ingest", str(path), "-q", *where(config)]) == 0
    out = capsys.readouterr().out
    assert f"embedder {WORDLLAMA} (256 dims): WordLlama" in out
    assert "deltas written" in out

    assert main(query(config, "grand total", "-k", "6", "--json")) == 0
    found = json.loads(capsys.readouterr().out)
    assert "TOTAL" in found["documents"][0]  # the words of '**** TOTAL 12.34' lines
    assert main(query(config, "grand total", "--embedder", "wordllama")) == 0
    assert f"words like 'grand total', embedded with {WORDLLAMA}" in capsys.readouterr().out

    assert main(["ingest", str(path), "-q", "--embedder", "wordllama", *where(config)]) == 0
    assert re.search(r"^duplicates skipped\s+6$", capsys.readouterr().out, re.M)


def test_switching_embedders_on_a_log_is_refused(
    config: LogConfig,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    loopback_only: NetworkGuard,
) -> None:
    path = tmp_path / "receipts.jsonl"
    write_jsonl(path, generate_receipts(2, seed=15))
    assert main(["ingest", str(path), "-q", "--embedder", "wordllama", *where(config)]) == 0
    capsys.readouterr()

    assert main(["ingest", str(path), "-q", "--embedder", "hash", *where(config)]) == 1
    err = capsys.readouterr().err
    assert "DimensionMismatch: collection 'words': holds 256-dimensional vectors" in err
    assert "the embedder hashing-v1 has 384" in err
    assert "start a new log (another --log name)" in err and "rebuild" in err

    assert main(query(config, "grand total", "--embedder", "hash")) == 1
    err = capsys.readouterr().err
    assert "holds 256-dimensional vectors" in err
    assert "the query, embedded with hashing-v1, has 384" in err


def a_unique_word(receipts: list[Receipt]) -> tuple[Receipt, str, str]:
    """A receipt, one of its words' embedding input and its id: no other word embeds alike.

    (The hashing embedder hashes a bag of words: two contexts of the same
    words in another order embed to the same vector.)
    """
    texts = [text for receipt in receipts for text in word_inputs(receipt)]
    vectors = HashingEmbedder(DIM).embed_sync(texts)
    receipt = receipts[1]
    start = len(word_inputs(receipts[0]))
    for index, record_id in enumerate(word_records(receipt).ids):
        distances = np.sum((vectors - vectors[start + index]) ** 2, axis=1)
        if np.sum(distances < 1e-3) == 1:
            return receipt, texts[start + index], record_id
    raise AssertionError("no word with a vector of its own")


def test_query_command_fresh_json_then_snapshot_table(
    config: LogConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    receipts = list(generate_receipts(3, seed=5))
    path = tmp_path / "receipts.jsonl"
    write_jsonl(path, receipts)
    assert (
        main(["ingest", str(path), "--embedder", "hash", "--dim", str(DIM), "-q", *where(config)])
        == 0
    )
    receipt, text, word_id = a_unique_word(receipts)
    merchant = receipt.merchant_name
    search = ["query", "--collection", "words", "--text", text, "-k", "4",
             "--embedder", "hash", "--dim", str(DIM), "--cache-dir", str(tmp_path / "cache"),
             "--where", f"merchant_name={merchant}", "--where", f"receipt_id={receipt.receipt_id}",
             *where(config)]  # fmt: skip
    capsys.readouterr()

    assert main([*search, "--consistency", "fresh", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"ids", "distances", "documents", "metadatas"}
    ids, distances = result["ids"][0], result["distances"][0]
    assert len(ids) == 4 and ids[0] == word_id
    assert distances[0] == pytest.approx(0.0, abs=1e-5) and distances == sorted(distances)
    for metadata in result["metadatas"][0]:
        assert (metadata["merchant_name"], metadata["receipt_id"]) == (merchant, receipt.receipt_id)
    words = {w.text for w in receipt.words}
    assert set(result["documents"][0]) <= words, "the stored document is the word itself"

    assert main([*search, "--consistency", "snapshot"]) == 0
    assert capsys.readouterr().out == "no results\n", "nothing is compacted yet"

    compact = ["compact", "--cache-dir", str(tmp_path / "compactor"), "-q", *where(config)]
    assert main(compact) == 0
    capsys.readouterr()
    assert main(search) == 0  # snapshot consistency is the default
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if re.match(r"^\s*#\s*\|\s*distance\b", line))
    assert re.split(r"\s*\|\s*", lines[header].strip()) == [
        "#",
        "distance",
        "document",
        "merchant",
        "id",
    ]
    first = re.split(r"\s*\|\s*", lines[header + 2].strip())
    assert first[0] == "1" and first[1] == "0.0000" and first[3:] == [merchant, word_id]
    rows = [line for line in lines[header + 2 :] if line.strip()]
    assert len(rows) == 4


async def test_an_ingest_stopped_by_ctrl_c_reruns_at_once(
    config: LogConfig, tmp_path: Path
) -> None:
    """Issue 19 item 3: SIGINT mid-ingest, then the same ingest again, at once.

    ``ingest`` runs as a user runs it (``python -m deltalog``) through a proxy
    that lets two entries through and then holds every entry's write: the
    process is stopped with entries reserved, their receipts' keys claimed,
    and nothing written there. The rerun starts at once (with a grace of
    2 s, ``DELTALOG_GRACE``, so the test need not wait a minute): it meets
    those keys at unwritten seqs, retries until they are older than the
    grace, seals the seqs itself and writes the receipts. Every receipt is
    then in the log exactly once, and in the fold. About 10 s idle (20 s at
    load 20): two ``deltalog`` processes, the grace, a compaction.
    """
    receipts = list(generate_receipts(24, seed=19))
    path = tmp_path / "receipts.jsonl"
    write_jsonl(path, receipts)
    assert config.endpoint_url is not None
    ingest = [sys.executable, "-m", "deltalog", "ingest", str(path), "-q"]
    ingest += ["--embedder", "hash", "--dim", str(DIM), "--concurrency", "4"]
    location = ["--bucket", config.bucket, "--table", config.table, "--log", config.log]
    held, never = anyio.Event(), anyio.Event()
    puts = 0

    def entry_put(request: Request) -> bool:
        nonlocal puts
        if request.operation != "PutObject" or "/entries/" not in request.path:
            return False
        puts += 1
        if puts > 2:
            held.set()
        return puts > 2

    with ChildProcesses(tmp_path / "logs", cli_env()) as children:
        async with FaultProxy(config.endpoint_url) as proxy:
            proxy.script(Fault.DELAY, when=entry_put, until=never.wait, times=10**6)
            first = children.start("ingest", [*ingest, *location, "--endpoint-url", proxy.url])
            await until_reached(held, first)
            first.signal(signal.SIGINT)
            with anyio.fail_after(60):
                await first.exited()
        # The proxy is gone: the held writes never land.
        async with DeltaLog.open(config) as log:
            status = await log.status()
        assert status.hole_count >= 1, "the interrupted ingest left reserved seqs unwritten"
        assert status.entries < len(receipts), first.stderr()

        children.env["DELTALOG_GRACE"] = "2"
        rerun = children.start("rerun", [*ingest, *location, "--endpoint-url", config.endpoint_url])
        with anyio.fail_after(120):
            code = await rerun.exited()
        assert code == 0, rerun.stderr()

    async with Compactor(config, cache_dir=tmp_path / "cache", grace=0) as compactor:
        await compactor.run_once()  # seals what was reserved and never claimed
    async with DeltaLog.open(config) as log:
        entries = [entry async for _, entry in log.read()]
    keys = [d.idempotency_key or "" for entry in entries for d in entry.deltas]
    assert sorted(keys) == sorted(receipt_key(r, HashingEmbedder(DIM)) for r in receipts)
    reasons = [entry.reason for entry in entries if isinstance(entry, Seal)]
    assert any(r.startswith("seq reserved for idempotency key") for r in reasons), reasons
    async with Reader.open(config, cache_dir=tmp_path / "reader") as reader:
        words = await reader.get(collection="words")
    assert sorted(words["ids"]) == sorted(i for r in receipts for i in word_records(r).ids)
