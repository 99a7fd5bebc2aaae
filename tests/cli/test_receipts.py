"""``deltalog ingest`` and ``deltalog query`` end to end with the WordLlama embedder.

On moto's S3 + DynamoDB server (a child process on loopback), in this
process, with every connection off loopback refused: the model loads from
the installed wheel and nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltalog import LogConfig
from deltalog.cli import main
from deltalog.receipts.generate import generate_receipts
from deltalog.receipts.model import write_jsonl
from deltalog.receipts.wordllama import NORMALISATION
from tests.network import NetworkGuard, no_network

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
