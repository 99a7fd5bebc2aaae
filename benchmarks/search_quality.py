"""How well a typed query finds the right receipt text: precision at 20.

Generated receipts know what each line and word is: a line's
``section_label``, a validated word's label. A query describing a section
(``"total amount"`` for ``TOTAL_LINE``) or a field (``"phone number"`` for
``PHONE_NUMBER``) is embedded and the 20 nearest texts are counted: the share
that carry the label is the query's precision; the figure is the mean over
the queries (fixed below, written before any embedder was measured).

- ``lines``: the line texts; ``line inputs``: what ingest embeds for a line
  (the lines above and below too); ``words``: validated words' inputs
  (two neighbours each side, ``<EDGE>`` padding).

``python -m benchmarks.search_quality`` prints the table for the hashing
embedder and WordLlama under each text normalisation tried (README
"Embedders"); ``search_quality`` gives the figures of one embedder.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from deltalog.receipts.embed import HashingEmbedder
from deltalog.receipts.generate import generate_receipts
from deltalog.receipts.model import EDGE, line_records, word_records
from deltalog.receipts.wordllama import WordLlamaEmbedder, normalise

__all__ = ["LINE_QUERIES", "WORD_QUERIES", "Quality", "Texts", "search_quality", "texts"]

LINE_QUERIES = {
    "store name": "STOREFRONT",
    "street address": "ADDRESS",
    "date and time of purchase": "TRANSACTION_INFO",
    "item bought and its price": "ITEMS",
    "department": "SECTION_HEADER",
    "subtotal and sales tax": "SUMMARY",
    "total amount": "TOTAL_LINE",
    "paid by credit card": "PAYMENT",
    "customer survey": "SURVEY",
    "thanks and return policy": "FOOTER",
}
WORD_QUERIES = {
    "merchant name": "MERCHANT_NAME",
    "phone number": "PHONE_NUMBER",
    "date": "DATE",
    "time": "TIME",
    "product": "PRODUCT_NAME",
    "quantity": "QUANTITY",
    "price of item": "LINE_TOTAL",
    "subtotal": "SUBTOTAL",
    "tax": "TAX",
    "grand total": "GRAND_TOTAL",
    "payment method": "PAYMENT_METHOD",
    "change": "CHANGE",
    "loyalty member number": "LOYALTY_ID",
    "website": "WEBSITE",
    "store hours": "STORE_HOURS",
    "address": "ADDRESS_LINE",
}
K = 20
Embed = Callable[[Sequence[str]], npt.NDArray[np.float32]]


@dataclass(frozen=True, slots=True)
class Texts:
    """Labelled receipt texts: lines (text and input) and validated words (input)."""

    line_texts: list[str]
    line_inputs: list[str]
    sections: npt.NDArray[np.str_]
    word_inputs: list[str]
    word_labels: npt.NDArray[np.str_]


@dataclass(frozen=True, slots=True)
class Quality:
    """Mean precision at 20 of the queries, per kind of text."""

    lines: float
    line_inputs: float
    words: float


def texts(receipts: int, *, seed: int) -> Texts:
    line_texts, line_inputs, sections, word_inputs, word_labels = [], [], [], [], []
    for receipt in generate_receipts(receipts, seed=seed):
        lines = line_records(receipt)
        line_texts += lines.documents
        line_inputs += lines.inputs
        sections += [str(m["section_label"]) for m in lines.metadatas]
        words = word_records(receipt)
        for word, text in zip(receipt.words, words.inputs, strict=True):
            if word.labels:
                word_inputs.append(text)
                word_labels.append(word.labels[0])
    return Texts(line_texts, line_inputs, np.array(sections), word_inputs, np.array(word_labels))


def _precision(
    embed: Embed, queries: dict[str, str], corpus: Sequence[str], labels: npt.NDArray[np.str_]
) -> float:
    vectors, asked = embed(corpus), embed(list(queries))
    found = [
        float((labels[np.argsort(-(vectors @ q))[:K]] == label).mean())
        for q, label in zip(asked, queries.values(), strict=True)
    ]
    return round(float(np.mean(found)), 3)


def search_quality(embed: Embed, data: Texts) -> Quality:
    """The mean precision at 20 of ``embed`` (unit rows) on ``data``."""
    return Quality(
        lines=_precision(embed, LINE_QUERIES, data.line_texts, data.sections),
        line_inputs=_precision(embed, LINE_QUERIES, data.line_inputs, data.sections),
        words=_precision(embed, WORD_QUERIES, data.word_inputs, data.word_labels),
    )


_SPACE = re.compile(r"\s+")
_VARIANTS: dict[str, Callable[[str], str]] = {
    "none": lambda t: t,
    "lower": str.lower,
    "lower+no-edge (the embedder's)": normalise,
    "lower+no-edge+no-digits": lambda t: re.sub(r"\d[\d.,:/%-]*", " ", normalise(t)),
    "lower+no-edge+split-punctuation": lambda t: normalise(re.sub(r"(?<=\w)[*/](?=\w)", " ", t)),
    "title case+no-edge": lambda t: _SPACE.sub(" ", t.replace(EDGE, " ")).strip().title(),
}


class _Variant(WordLlamaEmbedder):
    """WordLlama under another normalisation."""

    def __init__(self, name: str, fix: Callable[[str], str]) -> None:
        self.normalisation = name
        self._fix = fix
        super().__init__()

    def normalise(self, text: str) -> str:
        return self._fix(text)


def main() -> None:
    """Print the table of README "Embedders"."""
    data = texts(150, seed=11)
    rows = [("hashing-v1", search_quality(HashingEmbedder().embed_sync, data))]
    for name, fix in _VARIANTS.items():
        rows.append((f"wordllama, {name}", search_quality(_Variant(name, fix).embed_sync, data)))
    print(f"{len(data.line_texts)} lines, {len(data.word_inputs)} validated words; P@{K}")
    print(f"{'embedder':45} {'lines':>6} {'line inputs':>11} {'words':>6}")
    for name, q in rows:
        print(f"{name:45} {q.lines:6.3f} {q.line_inputs:11.3f} {q.words:6.3f}")


if __name__ == "__main__":
    main()
