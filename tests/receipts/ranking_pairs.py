"""Semantic ranking pairs for the WordLlama embedder, from receipts vocabulary.

Written and committed before the model's output on them was looked at (issue
14): each pair says that ``query`` ranks ``related`` above ``unrelated``
(cosine similarity), never by how much. Texts are as receipts print them:
upper-case OCR, with prices, item numbers and the ``<EDGE>`` padding of word
inputs. A pair the model gets wrong stays here, marked in the test with the
reason, so the record of what was chosen beforehand is complete.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["PAIRS", "RankingPair"]


class RankingPair(NamedTuple):
    query: str
    related: str
    unrelated: str


PAIRS: tuple[RankingPair, ...] = (
    # a field asked for in plain words, above an item line
    RankingPair("payment", "VISA CARD PAYMENT", "ORGANIC BANANAS"),
    RankingPair("total", "BALANCE DUE", "GARDEN HOSE"),
    RankingPair("grand total", "**** TOTAL 45.67", "PEANUT BUTTER 3.49"),
    RankingPair("sales tax", "TAX 8.250% 1.23", "SOURDOUGH BREAD 4.99"),
    RankingPair("subtotal", "SUB TOTAL 23.10", "LARGE EGGS 12CT 5.49"),
    RankingPair("credit card", "MASTERCARD", "STRAWBERRIES"),
    RankingPair("cash", "CASH TENDERED 20.00", "PAINT ROLLER 8.97"),
    RankingPair("change", "CHANGE DUE 2.50", "BABY SPINACH 3.99"),
    RankingPair("discount", "COUPON SAVINGS -1.00", "DUCT TAPE 5.98"),
    RankingPair("phone number", "TEL (206) 555-0142", "CHICKEN BREAST 9.87"),
    RankingPair("date", "03/14/2024 2:35 PM", "LARGE EGGS"),
    RankingPair("thank you", "THANK YOU FOR SHOPPING AT SAFEWAY", "ROMA TOMATOES 2LB 3.12"),
    RankingPair("returns", "RETURNS ACCEPTED WITHIN 30 DAYS WITH RECEIPT", "CHIPS GUAC 4.25"),
    # a kind of product, above another kind's item
    RankingPair("fruit", "ORGANIC BANANAS", "LAUNDRY DETERGENT"),
    RankingPair("dairy", "CHEDDAR CHEESE", "EXTENSION CORD"),
    RankingPair("coffee", "LATTE GRANDE", "GARDEN HOSE"),
    RankingPair("medicine", "IBUPROFEN 200MG", "CHEESEBURGER"),
    RankingPair("gasoline", "UNLEADED", "BLUEBERRY MUFFIN"),
    # a merchant, its own spellings above another merchant
    RankingPair("Trader Joe's", "TRADER JOES", "WHOLE FOODS MARKET"),
    RankingPair("Home Depot", "THE HOME DEPOT #0042", "STARBUCKS"),
    RankingPair("Walgreens", "WALGREENS", "CHEVRON"),
    RankingPair("Walmart", "WAL*MART", "TARGET"),
    RankingPair("CVS Pharmacy", "CVS/PHARMACY", "SHAKE SHACK"),
    # word inputs as ingest embeds them: two neighbours each side, <EDGE> padding
    RankingPair("grand total", "<EDGE> **** TOTAL 45.67 <EDGE>", "123456 ORGANIC BANANAS 3.49 F"),
    RankingPair(
        "card payment",
        "<EDGE> <EDGE> VISA ************4821 CHIP",
        "<EDGE> <EDGE> SUBTOTAL 23.10 <EDGE>",
    ),
)
