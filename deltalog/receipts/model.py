"""Receipts: the OCR output producers embed, and the records made from it.

- A **receipt** is one receipt found on one image: ``image_id`` (a UUID),
  ``receipt_id`` (a number within the image), the merchant, its **lines**
  and its **words**.
- A **word** sits on a line (``line_id``) and has a ``word_id``; a line
  holds the words whose ``line_id`` is its own.
- A **record** is what enters a collection for one word or line: an id, the
  raw text as document, flat metadata, and the text that is embedded (the
  **input**, which carries the neighbours for context).

Coordinates are fractions of the image, ``y = 0`` at the bottom. A word's
``x, y`` is its centroid; a line's ``x, y`` is the bottom-left corner of its
box. Lines are read top to bottom (``y`` descending) and the words of a line
left to right (``x`` ascending).

Ids, inputs and metadata follow ``RECEIPTS.md`` exactly: existing data
depends on them. JSONL holds one receipt per line; ``read_jsonl`` names the
line of anything it cannot use.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections import defaultdict
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import msgspec

from deltalog.entry import Metadata
from deltalog.errors import InvalidInput

__all__ = [
    "EDGE",
    "LABELS",
    "LABEL_STATUSES",
    "LabelStatus",
    "SECTION_LABELS",
    "InvalidReceipt",
    "Line",
    "Receipt",
    "Records",
    "RecordId",
    "SectionLabel",
    "Word",
    "decode_receipt",
    "encode_receipt",
    "label_key",
    "line_inputs",
    "line_record_id",
    "line_records",
    "parse_record_id",
    "read_jsonl",
    "receipt_ids",
    "validate_receipt",
    "word_inputs",
    "word_record_id",
    "word_records",
    "write_jsonl",
]

EDGE = "<EDGE>"
"""Stands for a missing neighbour in embedding inputs and ``left``/``right``."""

LabelStatus = Literal["validated", "auto_suggested", "unvalidated"]
LABEL_STATUSES: tuple[LabelStatus, ...] = get_args(LabelStatus)

SectionLabel = Literal[
    "STOREFRONT",
    "ADDRESS",
    "ITEMS",
    "SECTION_HEADER",
    "SUMMARY",
    "TOTAL_LINE",
    "PAYMENT",
    "SURVEY",
    "FOOTER",
    "TRANSACTION_INFO",
]
SECTION_LABELS: tuple[SectionLabel, ...] = get_args(SectionLabel)

LABELS: tuple[str, ...] = (
    "MERCHANT_NAME",
    "STORE_HOURS",
    "PHONE_NUMBER",
    "WEBSITE",
    "LOYALTY_ID",
    "ADDRESS_LINE",
    "DATE",
    "TIME",
    "PAYMENT_METHOD",
    "COUPON",
    "DISCOUNT",
    "PRODUCT_NAME",
    "QUANTITY",
    "UNIT_PRICE",
    "LINE_TOTAL",
    "SUBTOTAL",
    "TAX",
    "TIP",
    "GRAND_TOTAL",
    "CHANGE",
    "CASH_BACK",
    "REFUND",
)
"""The word labels in use; others are allowed if they are upper-case names."""

log = logging.getLogger(__name__)
_LABEL = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_MAX_ID = 99_999  # ids are printed with five digits


class InvalidReceipt(InvalidInput):
    """A receipt that cannot be used; ``line`` is its JSONL line when it came from a file."""

    def __init__(self, reason: str, *, path: str | None = None, line: int | None = None) -> None:
        self.reason = reason
        self.path = path
        self.line = line
        where = f"{path or '<input>'}:{line}: " if line is not None else ""
        super().__init__(f"{where}{reason}")


# -- the model -------------------------------------------------------------


class Word(msgspec.Struct, frozen=True, kw_only=True):
    """One OCR word. ``labels`` are validated labels (``label_status`` "validated")."""

    line_id: int
    word_id: int
    text: str
    x: float
    y: float
    width: float
    height: float
    confidence: float
    label_status: LabelStatus = "unvalidated"
    labels: list[str] = msgspec.field(default_factory=list)


class Line(msgspec.Struct, frozen=True, kw_only=True):
    """One OCR line: its text, its box (bottom-left corner and size), its section."""

    line_id: int
    text: str
    x: float
    y: float
    width: float
    height: float
    confidence: float
    section_label: SectionLabel


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    """One receipt on one image, with its lines and words."""

    image_id: uuid.UUID
    receipt_id: int
    lines: list[Line]
    words: list[Word]
    merchant_name: str = ""


# -- ids -------------------------------------------------------------------


def line_record_id(image_id: uuid.UUID | str, receipt_id: int, line_id: int) -> str:
    """``IMAGE#{uuid}#RECEIPT#{receipt_id:05d}#LINE#{line_id:05d}``."""
    return f"IMAGE#{image_id}#RECEIPT#{receipt_id:05d}#LINE#{line_id:05d}"


def word_record_id(image_id: uuid.UUID | str, receipt_id: int, line_id: int, word_id: int) -> str:
    """``IMAGE#{uuid}#RECEIPT#{receipt_id:05d}#LINE#{line_id:05d}#WORD#{word_id:05d}``."""
    return f"{line_record_id(image_id, receipt_id, line_id)}#WORD#{word_id:05d}"


class RecordId(NamedTuple):
    image_id: str
    receipt_id: int
    line_id: int
    word_id: int | None
    """``None`` for a line id."""


_RECORD_ID = re.compile(
    r"^IMAGE#(?P<image>[^#]+)#RECEIPT#(?P<receipt>\d{5})#LINE#(?P<line>\d{5})"
    r"(?:#WORD#(?P<word>\d{5}))?$"
)


def parse_record_id(record_id: str) -> RecordId:
    """The parts of a word or line id; ``InvalidInput`` if it is neither."""
    match = _RECORD_ID.match(record_id)
    if match is None:
        raise InvalidInput(f"{record_id!r} is not a word or line id")
    word = match["word"]
    return RecordId(
        match["image"],
        int(match["receipt"]),
        int(match["line"]),
        None if word is None else int(word),
    )


def label_key(label: str) -> str:
    """The metadata key of a validated label: ``label_MERCHANT_NAME``."""
    if not _LABEL.match(label):
        raise InvalidInput(f"invalid label {label!r}: use an upper-case name such as GRAND_TOTAL")
    return f"label_{label}"


# -- validation --------------------------------------------------------------


def validate_receipt(receipt: Receipt) -> Receipt:
    """Check what msgspec's types cannot; raise ``InvalidReceipt`` naming the problem."""
    if not 0 <= receipt.receipt_id <= _MAX_ID:
        raise InvalidReceipt(f"receipt_id {receipt.receipt_id} is outside 0..{_MAX_ID}")
    if not receipt.words:
        raise InvalidReceipt(
            f"receipt {receipt.image_id}/{receipt.receipt_id} has no words: nothing to embed"
        )
    line_ids = _check_lines(receipt.lines)
    seen: set[tuple[int, int]] = set()
    for i, word in enumerate(receipt.words):
        _check_word(f"words[{i}]", word, line_ids)
        if (word.line_id, word.word_id) in seen:
            raise InvalidReceipt(
                f"words[{i}]: duplicate word (line_id {word.line_id}, word_id {word.word_id})"
            )
        seen.add((word.line_id, word.word_id))
    return receipt


def _check_lines(lines: list[Line]) -> set[int]:
    line_ids: set[int] = set()
    for i, line in enumerate(lines):
        where = f"lines[{i}]"
        _check_id(where, "line_id", line.line_id)
        if line.line_id in line_ids:
            raise InvalidReceipt(f"{where}: duplicate line_id {line.line_id}")
        line_ids.add(line.line_id)
        _check_text(where, line.text)
        _check_geometry(where, line.x, line.y, line.width, line.height, line.confidence)
    return line_ids


def _check_word(where: str, word: Word, line_ids: set[int]) -> None:
    _check_id(where, "word_id", word.word_id)
    if word.line_id not in line_ids:
        raise InvalidReceipt(f"{where}: line_id {word.line_id} is not a line of this receipt")
    _check_text(where, word.text)
    _check_geometry(where, word.x, word.y, word.width, word.height, word.confidence)
    if word.labels and word.label_status != "validated":
        raise InvalidReceipt(
            f"{where}: has labels {word.labels} but label_status {word.label_status!r}; "
            "only validated words carry labels"
        )
    for label in word.labels:
        if not _LABEL.match(label):
            raise InvalidReceipt(f"{where}: invalid label {label!r}: use an upper-case name")


def _check_id(where: str, name: str, value: int) -> None:
    if not 0 <= value <= _MAX_ID:
        raise InvalidReceipt(f"{where}: {name} {value} is outside 0..{_MAX_ID}")


def _check_text(where: str, text: str) -> None:
    if not text.strip():
        raise InvalidReceipt(f"{where}: empty text")


def _check_geometry(where: str, *values: float) -> None:
    names = ("x", "y", "width", "height", "confidence")
    for name, value in zip(names, values, strict=True):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise InvalidReceipt(f"{where}: {name} {value} is outside 0..1")


# -- embedding inputs and records --------------------------------------------


def _words_by_line(receipt: Receipt) -> dict[int, list[Word]]:
    """The words of each line, left to right."""
    by_line: dict[int, list[Word]] = defaultdict(list)
    for word in receipt.words:
        by_line[word.line_id].append(word)
    for words in by_line.values():
        words.sort(key=lambda w: (w.x, w.word_id))
    return by_line


def _neighbours(receipt: Receipt) -> dict[tuple[int, int], tuple[str, str, str, str]]:
    """Per word: ``(L2, L1, R1, R2)``, ``EDGE`` where there is no neighbour."""
    out: dict[tuple[int, int], tuple[str, str, str, str]] = {}
    for words in _words_by_line(receipt).values():
        texts = [EDGE, EDGE, *(w.text for w in words), EDGE, EDGE]
        for i, word in enumerate(words, start=2):
            out[word.line_id, word.word_id] = (
                texts[i - 2],
                texts[i - 1],
                texts[i + 1],
                texts[i + 2],
            )
    return out


def word_inputs(receipt: Receipt) -> list[str]:
    """Per word, in ``receipt.words`` order: ``"L2 L1 WORD R1 R2"``."""
    context = _neighbours(receipt)
    out = []
    for word in receipt.words:
        l2, l1, r1, r2 = context[word.line_id, word.word_id]
        out.append(f"{l2} {l1} {word.text} {r1} {r2}")
    return out


def line_inputs(receipt: Receipt) -> list[str]:
    """Per line, in ``receipt.lines`` order: the line above, the line, the line below.

    Joined by newlines; ``EDGE`` stands for the missing neighbour of the
    first and the last line.
    """
    order = sorted(receipt.lines, key=lambda line: (-line.y, line.line_id))
    texts = [EDGE, *(line.text for line in order), EDGE]
    around = {line.line_id: i for i, line in enumerate(order, start=1)}
    return [
        f"{texts[around[line.line_id] - 1]}\n{line.text}\n{texts[around[line.line_id] + 1]}"
        for line in receipt.lines
    ]


@dataclass(frozen=True, slots=True)
class Records:
    """What one receipt adds to one collection, in the same order in every list."""

    ids: list[str]
    documents: list[str]
    metadatas: list[Metadata]
    inputs: list[str]
    """The texts to embed."""


def word_records(receipt: Receipt) -> Records:
    """The ``words`` collection's records of a receipt."""
    context = _neighbours(receipt)
    image_id = str(receipt.image_id)
    ids, metadatas = [], []
    for word in receipt.words:
        _, l1, r1, _ = context[word.line_id, word.word_id]
        ids.append(word_record_id(image_id, receipt.receipt_id, word.line_id, word.word_id))
        meta: Metadata = {
            "image_id": image_id,
            "receipt_id": receipt.receipt_id,
            "line_id": word.line_id,
            "word_id": word.word_id,
            "text": word.text,
            "x": word.x,
            "y": word.y,
            "width": word.width,
            "height": word.height,
            "confidence": word.confidence,
            "left": l1,
            "right": r1,
            "merchant_name": receipt.merchant_name,
            "label_status": word.label_status,
        }
        meta.update(dict.fromkeys(map(label_key, word.labels), True))
        metadatas.append(meta)
    documents = [word.text for word in receipt.words]
    return Records(ids, documents, metadatas, word_inputs(receipt))


def line_records(receipt: Receipt) -> Records:
    """The ``lines`` collection's records of a receipt.

    Lines carry ``merchant_name`` too, so that merchant updates (which set
    it on every word and line) keep words and lines alike.
    """
    image_id = str(receipt.image_id)
    by_line = _words_by_line(receipt)
    ids: list[str] = []
    metadatas: list[Metadata] = []
    for line in receipt.lines:
        ids.append(line_record_id(image_id, receipt.receipt_id, line.line_id))
        words = by_line.get(line.line_id, [])
        avg = round(sum(w.confidence for w in words) / len(words), 4) if words else line.confidence
        metadatas.append(
            {
                "image_id": image_id,
                "receipt_id": receipt.receipt_id,
                "line_id": line.line_id,
                "text": line.text,
                "x": line.x,
                "y": line.y,
                "width": line.width,
                "height": line.height,
                "confidence": line.confidence,
                "avg_word_confidence": avg,
                "section_label": line.section_label,
                "merchant_name": receipt.merchant_name,
            }
        )
    documents = [line.text for line in receipt.lines]
    return Records(ids, documents, metadatas, line_inputs(receipt))


# -- JSON and JSONL ------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Receipt)


def encode_receipt(receipt: Receipt) -> bytes:
    """Canonical JSON: the same receipt always gives the same bytes."""
    return _encoder.encode(receipt)


def decode_receipt(data: bytes | str) -> Receipt:
    """Decode and validate one receipt; ``InvalidReceipt`` says what is wrong."""
    try:
        receipt = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidReceipt(f"not a valid receipt: {exc}") from exc
    return validate_receipt(receipt)


OnError = Literal["stop", "skip"]


def read_jsonl(
    path: str | Path,
    *,
    on_error: OnError = "stop",
    skipped: list[InvalidReceipt] | None = None,
) -> Generator[tuple[int, Receipt], None, None]:
    """``(line number, receipt)`` for each non-blank line of a JSONL file.

    A line that is not a valid receipt raises ``InvalidReceipt`` naming the
    line (``on_error="stop"``, after every receipt before it was yielded), or
    is skipped (``on_error="skip"``): its error is appended to ``skipped``
    when given, else logged as a warning.
    """
    if on_error not in ("stop", "skip"):
        raise InvalidInput(f"on_error must be 'stop' or 'skip', not {on_error!r}")
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.strip():
                continue
            try:
                yield number, decode_receipt(raw)
            except InvalidReceipt as exc:
                error = InvalidReceipt(exc.reason, path=str(path), line=number)
                if on_error == "stop":
                    raise error from exc
                if skipped is None:
                    log.warning("skipped %s", error)
                else:
                    skipped.append(error)


def write_jsonl(path: str | Path, receipts: Iterable[Receipt]) -> int:
    """Write one receipt per line; return how many."""
    count = 0
    with open(path, "wb") as file:
        for receipt in receipts:
            file.write(encode_receipt(receipt))
            file.write(b"\n")
            count += 1
    return count


def receipt_ids(receipt: Receipt) -> tuple[list[str], list[str]]:
    """Every word id and every line id of a receipt."""
    image_id = str(receipt.image_id)
    words = [
        word_record_id(image_id, receipt.receipt_id, w.line_id, w.word_id) for w in receipt.words
    ]
    lines = [line_record_id(image_id, receipt.receipt_id, ln.line_id) for ln in receipt.lines]
    return words, lines
