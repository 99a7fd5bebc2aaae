"""The synthetic receipt generator: deterministic, valid, shaped like RECEIPTS.md."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

import pytest

from deltalog.cli import main
from deltalog.receipts.generate import MERCHANTS, generate_receipts
from deltalog.receipts.model import (
    LABELS,
    SECTION_LABELS,
    Receipt,
    encode_receipt,
    line_records,
    read_jsonl,
    validate_receipt,
    word_records,
)


@pytest.fixture(scope="module")
def receipts() -> list[Receipt]:
    return list(generate_receipts(400, seed=11))


def test_same_seed_same_bytes() -> None:
    first = [encode_receipt(r) for r in generate_receipts(20, seed=5)]
    again = [encode_receipt(r) for r in generate_receipts(20, seed=5)]
    other = [encode_receipt(r) for r in generate_receipts(20, seed=6)]
    assert first == again
    assert first != other
    assert len(first) == 20


def test_every_receipt_is_valid_with_unique_ids(receipts: list[Receipt]) -> None:
    ids: set[str] = set()
    for receipt in receipts:
        validate_receipt(receipt)
        for records in (word_records(receipt), line_records(receipt)):
            ids.update(records.ids)
    assert len(ids) == sum(len(r.words) + len(r.lines) for r in receipts)
    shared = Counter(r.image_id for r in receipts)
    assert any(n == 2 for n in shared.values())  # some images hold two receipts
    assert {r.receipt_id for r in receipts} == {1, 2}


def test_sizes_follow_receipts_md(receipts: list[Receipt]) -> None:
    words = [len(r.words) for r in receipts]
    lines = [len(r.lines) for r in receipts]
    assert 78 <= statistics.mean(words) <= 92
    assert 14 <= statistics.mean(lines) <= 20
    assert min(words) >= 24 and max(words) <= 140


def test_merchants(receipts: list[Receipt]) -> None:
    assert len(MERCHANTS) >= 30
    for merchant in MERCHANTS:
        for part in merchant.name.split():
            assert not part[0].isalpha() or part[0].isupper(), merchant.name
            assert part == "&" or not part.isupper() or len(part) == 1, merchant.name
    names = Counter(r.merchant_name for r in receipts)
    assert len(names) >= 25
    assert 0 < names[""] < len(receipts) * 0.15  # a few merchants are not known yet


def test_sections_and_labels(receipts: list[Receipt]) -> None:
    sections = Counter(line.section_label for r in receipts for line in r.lines)
    assert set(sections) == set(SECTION_LABELS)
    words = [w for r in receipts for w in r.words]
    status = Counter(w.label_status for w in words)
    assert 0.15 < status["validated"] / len(words) < 0.5
    assert 0.05 < status["auto_suggested"] / len(words) < 0.3
    assert 0.3 < status["unvalidated"] / len(words) < 0.7
    labels = Counter(label for w in words for label in w.labels)
    assert set(labels) <= set(LABELS)
    assert len(labels) >= 15
    assert all(w.label_status == "validated" for w in words if w.labels)
    flagged = [m for r in receipts[:20] for m in word_records(r).metadatas if m.get("label_DATE")]
    assert flagged and all(m["label_status"] == "validated" for m in flagged)


def test_generate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "receipts.jsonl"
    assert main(["generate", "--receipts", "7", "--out", str(out), "--seed", "3"]) == 0
    assert [r for _, r in read_jsonl(out)] == list(generate_receipts(7, seed=3))
    assert "wrote 7 receipts" in capsys.readouterr().out
