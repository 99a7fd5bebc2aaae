"""The receipt model: ids, embedding inputs, metadata and JSONL exactly as RECEIPTS.md says."""

from __future__ import annotations

import uuid
from pathlib import Path

import msgspec
import pytest

from deltalog.errors import InvalidInput
from deltalog.receipts.model import (
    EDGE,
    InvalidReceipt,
    Line,
    Receipt,
    RecordId,
    Word,
    decode_receipt,
    encode_receipt,
    line_inputs,
    line_record_id,
    line_records,
    parse_record_id,
    read_jsonl,
    receipt_ids,
    validate_receipt,
    word_inputs,
    word_record_id,
    word_records,
    write_jsonl,
)

IMAGE = uuid.UUID("3f2b9c1e-8d4a-4e6f-9a1b-2c3d4e5f6a7b")


def word(line_id: int, word_id: int, text: str, x: float, **extra: object) -> Word:
    fields: dict[str, object] = {
        "line_id": line_id,
        "word_id": word_id,
        "text": text,
        "x": x,
        "y": 0.9 - 0.1 * line_id,
        "width": 0.05,
        "height": 0.02,
        "confidence": 0.9,
    }
    fields.update(extra)
    return Word(**fields)  # type: ignore[arg-type]


def line(line_id: int, text: str, y: float, section: str = "ITEMS") -> Line:
    return Line(
        line_id=line_id,
        text=text,
        x=0.1,
        y=y,
        width=0.8,
        height=0.02,
        confidence=0.95,
        section_label=section,  # type: ignore[arg-type]
    )


def sample() -> Receipt:
    """Three lines, listed out of visual order; line 1's words listed out of x order."""
    return Receipt(
        image_id=IMAGE,
        receipt_id=7,
        merchant_name="Costco Wholesale",
        lines=[
            line(1, "BANANAS 2 @ 0.59 1.18", 0.5),
            line(0, "COSTCO WHOLESALE", 0.9, "STOREFRONT"),
            line(2, "TOTAL 1.18", 0.2, "TOTAL_LINE"),
        ],
        words=[
            word(0, 0, "COSTCO", 0.3, label_status="validated", labels=["MERCHANT_NAME"]),
            word(0, 1, "WHOLESALE", 0.6, label_status="auto_suggested"),
            word(1, 4, "1.18", 0.8),
            word(1, 0, "BANANAS", 0.1),
            word(1, 1, "2", 0.3),
            word(1, 2, "@", 0.4),
            word(1, 3, "0.59", 0.5, confidence=0.5),
            word(2, 0, "TOTAL", 0.1),
            word(2, 1, "1.18", 0.7, label_status="validated", labels=["GRAND_TOTAL"]),
        ],
    )


def test_ids_follow_the_documented_format() -> None:
    assert (
        word_record_id(IMAGE, 7, 12, 3)
        == "IMAGE#3f2b9c1e-8d4a-4e6f-9a1b-2c3d4e5f6a7b#RECEIPT#00007#LINE#00012#WORD#00003"
    )
    assert (
        line_record_id(str(IMAGE), 1, 0)
        == "IMAGE#3f2b9c1e-8d4a-4e6f-9a1b-2c3d4e5f6a7b#RECEIPT#00001#LINE#00000"
    )


def test_ids_parse_back() -> None:
    assert parse_record_id(word_record_id(IMAGE, 7, 12, 3)) == RecordId(str(IMAGE), 7, 12, 3)
    assert parse_record_id(line_record_id(IMAGE, 2, 9)) == RecordId(str(IMAGE), 2, 9, None)
    for bad in ("", "IMAGE#x#RECEIPT#1#LINE#00001", "IMAGE#x#RECEIPT#00001#LINE#00001#WORD#1"):
        with pytest.raises(InvalidInput):
            parse_record_id(bad)


def test_receipt_ids_cover_every_word_and_line() -> None:
    words, lines = receipt_ids(sample())
    assert len(words) == 9 and len(lines) == 3
    assert words[2] == f"IMAGE#{IMAGE}#RECEIPT#00007#LINE#00001#WORD#00004"
    assert lines == [f"IMAGE#{IMAGE}#RECEIPT#00007#LINE#{n:05d}" for n in (1, 0, 2)]


def test_word_inputs_carry_two_neighbours_each_side() -> None:
    assert word_inputs(sample()) == [
        f"{EDGE} {EDGE} COSTCO WHOLESALE {EDGE}",
        f"{EDGE} COSTCO WHOLESALE {EDGE} {EDGE}",
        f"@ 0.59 1.18 {EDGE} {EDGE}",
        f"{EDGE} {EDGE} BANANAS 2 @",
        f"{EDGE} BANANAS 2 @ 0.59",
        "BANANAS 2 @ 0.59 1.18",
        f"2 @ 0.59 1.18 {EDGE}",
        f"{EDGE} {EDGE} TOTAL 1.18 {EDGE}",
        f"{EDGE} TOTAL 1.18 {EDGE} {EDGE}",
    ]


def test_line_inputs_are_above_line_below() -> None:
    assert line_inputs(sample()) == [
        "COSTCO WHOLESALE\nBANANAS 2 @ 0.59 1.18\nTOTAL 1.18",
        f"{EDGE}\nCOSTCO WHOLESALE\nBANANAS 2 @ 0.59 1.18",
        f"BANANAS 2 @ 0.59 1.18\nTOTAL 1.18\n{EDGE}",
    ]


def test_word_records() -> None:
    records = word_records(sample())
    assert records.ids[0] == f"IMAGE#{IMAGE}#RECEIPT#00007#LINE#00000#WORD#00000"
    assert records.documents == [w.text for w in sample().words]
    assert records.inputs == word_inputs(sample())
    assert records.metadatas[0] == {
        "image_id": str(IMAGE),
        "receipt_id": 7,
        "line_id": 0,
        "word_id": 0,
        "text": "COSTCO",
        "x": 0.3,
        "y": 0.9,
        "width": 0.05,
        "height": 0.02,
        "confidence": 0.9,
        "left": EDGE,
        "right": "WHOLESALE",
        "merchant_name": "Costco Wholesale",
        "label_status": "validated",
        "label_MERCHANT_NAME": True,
    }
    third = records.metadatas[2]  # "1.18" at the right end of line 1
    assert (third["left"], third["right"], third["label_status"]) == ("0.59", EDGE, "unvalidated")
    assert not any(k.startswith("label_") and k != "label_status" for k in third)
    assert records.metadatas[8]["label_GRAND_TOTAL"] is True


def test_line_records() -> None:
    records = line_records(sample())
    assert records.ids == [f"IMAGE#{IMAGE}#RECEIPT#00007#LINE#{n:05d}" for n in (1, 0, 2)]
    assert records.documents == [ln.text for ln in sample().lines]
    assert records.inputs == line_inputs(sample())
    assert records.metadatas[0] == {
        "image_id": str(IMAGE),
        "receipt_id": 7,
        "line_id": 1,
        "text": "BANANAS 2 @ 0.59 1.18",
        "x": 0.1,
        "y": 0.5,
        "width": 0.8,
        "height": 0.02,
        "confidence": 0.95,
        "avg_word_confidence": pytest.approx((0.9 * 4 + 0.5) / 5),
        "section_label": "ITEMS",
        "merchant_name": "Costco Wholesale",
    }


def test_metadata_values_are_flat_scalars() -> None:
    for records in (word_records(sample()), line_records(sample())):
        for meta in records.metadatas:
            assert all(type(v) in (str, int, float, bool) for v in meta.values()), meta


# -- validation ----------------------------------------------------------------


def changed(**fields: object) -> Receipt:
    return msgspec.structs.replace(sample(), **fields)


@pytest.mark.parametrize(
    ("receipt", "message"),
    [
        (changed(words=[]), "has no words"),
        (changed(receipt_id=100_000), "receipt_id 100000"),
        (changed(words=[word(5, 0, "X", 0.1)]), "line_id 5 is not a line"),
        (changed(words=[word(0, 0, "A", 0.1), word(0, 0, "B", 0.2)]), "duplicate word"),
        (changed(words=[word(0, 0, " ", 0.1)]), "empty text"),
        (changed(words=[word(0, 0, "A", 1.5)]), "x 1.5 is outside 0..1"),
        (changed(words=[word(0, 0, "A", 0.1, confidence=float("nan"))]), "confidence nan"),
        (changed(words=[word(0, 0, "A", 0.1, labels=["TOTAL"])]), "only validated words"),
        (
            changed(words=[word(0, 0, "A", 0.1, label_status="validated", labels=["total"])]),
            "invalid label 'total'",
        ),
        (changed(lines=[line(0, "A", 0.9), line(0, "B", 0.5)]), "duplicate line_id 0"),
    ],
)
def test_invalid_receipts_are_refused(receipt: Receipt, message: str) -> None:
    with pytest.raises(InvalidReceipt, match=message) as caught:
        validate_receipt(receipt)
    assert isinstance(caught.value, InvalidInput)


def test_decode_names_what_is_wrong() -> None:
    with pytest.raises(InvalidReceipt, match="receipt_id"):
        decode_receipt(b'{"image_id": "3f2b9c1e-8d4a-4e6f-9a1b-2c3d4e5f6a7b"}')
    with pytest.raises(InvalidReceipt, match="UUID"):
        decode_receipt(encode_receipt(sample()).replace(str(IMAGE).encode(), b"not-a-uuid"))
    assert decode_receipt(encode_receipt(sample())) == sample()


# -- JSONL -----------------------------------------------------------------------


def write_lines(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_jsonl_round_trip(tmp_path: Path) -> None:
    receipts = [sample(), changed(receipt_id=8, merchant_name="")]
    assert write_jsonl(tmp_path / "r.jsonl", receipts) == 2
    assert [r for _, r in read_jsonl(tmp_path / "r.jsonl")] == receipts
    assert [n for n, _ in read_jsonl(tmp_path / "r.jsonl")] == [1, 2]


def test_jsonl_stop_names_the_line(tmp_path: Path) -> None:
    good = encode_receipt(sample())
    path = write_lines(tmp_path / "r.jsonl", good, b"", b'{"image_id": ', good)
    items = read_jsonl(path)
    assert next(items)[0] == 1
    with pytest.raises(InvalidReceipt, match=r"r\.jsonl:3: not a valid receipt") as caught:
        next(items)
    assert caught.value.line == 3


def test_jsonl_skip_reports_each_bad_line(tmp_path: Path) -> None:
    good = encode_receipt(sample())
    empty = encode_receipt(changed(words=[]))
    path = write_lines(tmp_path / "r.jsonl", b"[1, 2]", good, empty, b"", good)
    skipped: list[InvalidReceipt] = []
    assert [n for n, _ in read_jsonl(path, on_error="skip", skipped=skipped)] == [2, 5]
    assert [e.line for e in skipped] == [1, 3]
    assert "has no words" in str(skipped[1]) and ":3:" in str(skipped[1])


def test_jsonl_on_error_must_be_known(tmp_path: Path) -> None:
    assert write_jsonl(tmp_path / "r.jsonl", [sample()]) == 1
    with pytest.raises(InvalidInput, match="on_error"):
        list(read_jsonl(tmp_path / "r.jsonl", on_error="ignore"))  # type: ignore[arg-type]
