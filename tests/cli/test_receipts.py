"""The receipts commands (``ingest`` is tested with the ingest module): ``query``.

Runs ``deltalog.cli.main`` in this process against moto's server and real
Chroma, with the offline hashing embedder: the query command embeds its
text with the embedder the receipts were ingested with, so a word's own
input text finds that word at distance 0.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from deltalog import LogConfig
from deltalog.cli import main
from deltalog.receipts.embed import HashingEmbedder
from deltalog.receipts.generate import generate_receipts
from deltalog.receipts.model import Receipt, word_inputs, word_records, write_jsonl

DIM = 16


def where(config: LogConfig) -> list[str]:
    return [
        "--bucket", config.bucket, "--table", config.table, "--log", config.log,
        "--endpoint-url", str(config.endpoint_url),
    ]  # fmt: skip


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
    query = ["query", "--collection", "words", "--text", text, "-k", "4",
             "--embedder", "hash", "--dim", str(DIM), "--cache-dir", str(tmp_path / "cache"),
             "--where", f"merchant_name={merchant}", "--where", f"receipt_id={receipt.receipt_id}",
             *where(config)]  # fmt: skip
    capsys.readouterr()

    assert main([*query, "--consistency", "fresh", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"ids", "distances", "documents", "metadatas"}
    ids, distances = result["ids"][0], result["distances"][0]
    assert len(ids) == 4 and ids[0] == word_id
    assert distances[0] == pytest.approx(0.0, abs=1e-5) and distances == sorted(distances)
    for metadata in result["metadatas"][0]:
        assert (metadata["merchant_name"], metadata["receipt_id"]) == (merchant, receipt.receipt_id)
    words = {w.text for w in receipt.words}
    assert set(result["documents"][0]) <= words, "the stored document is the word itself"

    assert main([*query, "--consistency", "snapshot"]) == 0
    assert capsys.readouterr().out == "no results\n", "nothing is compacted yet"

    compact = ["compact", "--cache-dir", str(tmp_path / "compactor"), "-q", *where(config)]
    assert main(compact) == 0
    capsys.readouterr()
    assert main(query) == 0  # snapshot consistency is the default
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
