"""Synthetic receipts that look like production, from a seed.

A receipt is laid out top to bottom in sections (``SECTION_LABELS``): the
storefront, the address and phone, transaction info, items (sometimes under
a section header), the summary, the total, payment, an optional survey and
the footer. About 16 lines and 85 words on average, 24 to 140 words. Words
carry the label the generator knows they have; a share of them is
validated (``label_X: true`` in metadata), some auto-suggested, the rest
unvalidated. The same seed always gives the same receipts, byte for byte.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from deltalog.receipts.model import LabelStatus, Line, Receipt, SectionLabel, Word

__all__ = ["MERCHANTS", "generate_receipt", "generate_receipts"]

MAX_WORDS = 140
MIN_WORDS = 24


@dataclass(frozen=True, slots=True)
class Merchant:
    name: str
    """Title case, as stored in ``merchant_name``."""
    storefront: str
    """As printed at the top of the receipt."""
    kind: str
    domain: str


def _m(name: str, kind: str, storefront: str | None = None) -> Merchant:
    slug = "".join(c for c in name.lower() if c.isalnum())
    return Merchant(name, storefront or name.upper(), kind, f"{slug}.com")


MERCHANTS: tuple[Merchant, ...] = (
    _m("Costco Wholesale", "warehouse"),
    _m("Sam's Club", "warehouse"),
    _m("Trader Joe's", "grocery"),
    _m("Whole Foods Market", "grocery"),
    _m("Safeway", "grocery"),
    _m("Kroger", "grocery"),
    _m("Sprouts Farmers Market", "grocery"),
    _m("Vons", "grocery"),
    _m("Ralphs", "grocery"),
    _m("Albertsons", "grocery"),
    _m("Publix", "grocery"),
    _m("Wegmans", "grocery"),
    _m("Aldi", "grocery"),
    _m("Target", "retail"),
    _m("Walmart", "retail", "WAL*MART"),
    _m("Dollar Tree", "retail"),
    _m("Home Depot", "hardware", "THE HOME DEPOT"),
    _m("Lowe's", "hardware", "LOWE'S HOME IMPROVEMENT"),
    _m("Ace Hardware", "hardware"),
    _m("Walgreens", "pharmacy"),
    _m("Cvs Pharmacy", "pharmacy", "CVS/PHARMACY"),
    _m("Rite Aid", "pharmacy"),
    _m("Starbucks", "cafe"),
    _m("Peet's Coffee", "cafe"),
    _m("Blue Bottle Coffee", "cafe"),
    _m("Panera Bread", "restaurant"),
    _m("Chipotle Mexican Grill", "restaurant", "CHIPOTLE"),
    _m("In-N-Out Burger", "restaurant"),
    _m("Shake Shack", "restaurant"),
    _m("Olive Garden", "restaurant"),
    _m("Shell", "fuel"),
    _m("Chevron", "fuel"),
    _m("Best Buy", "electronics"),
    _m("Staples", "electronics"),
    _m("Barnes & Noble", "retail", "BARNES & NOBLE BOOKSELLERS"),
    _m("Petco", "retail"),
)

_PRODUCTS: dict[str, tuple[str, ...]] = {
    "grocery": (
        "ORGANIC BANANAS",
        "AVOCADO",
        "WHOLE MILK",
        "LARGE EGGS",
        "SOURDOUGH BREAD",
        "GREEK YOGURT",
        "CHEDDAR CHEESE",
        "BABY SPINACH",
        "CHICKEN BREAST",
        "GROUND BEEF",
        "PASTA SAUCE",
        "SPAGHETTI",
        "ORANGE JUICE",
        "COFFEE BEANS",
        "ALMOND BUTTER",
        "STRAWBERRIES",
        "ROMA TOMATOES",
        "YELLOW ONION",
        "PEANUT BUTTER",
        "SPARKLING WATER",
    ),
    "warehouse": (
        "KS PAPER TOWEL",
        "KS BATH TISSUE",
        "ROTISSERIE CHICKEN",
        "KS WATER 40PK",
        "ORGANIC EGGS 24CT",
        "SALMON FILLET",
        "MIXED NUTS",
        "OLIVE OIL 2L",
        "LAUNDRY DETERGENT",
        "CROISSANTS 12CT",
        "BLUEBERRIES 18OZ",
        "PARMESAN WEDGE",
    ),
    "retail": (
        "GIFT CARD",
        "PHONE CHARGER",
        "NOTEBOOK",
        "SCENTED CANDLE",
        "TOOTHPASTE",
        "DISH SOAP",
        "HDMI CABLE",
        "KIDS T-SHIRT",
        "TRASH BAGS",
        "SNACK MIX",
        "BATTERIES AA 8PK",
        "PAPERBACK NOVEL",
    ),
    "hardware": (
        "WOOD SCREWS",
        "PAINT ROLLER",
        "INTERIOR PAINT GAL",
        "LED BULB 4PK",
        "GARDEN HOSE",
        "DUCT TAPE",
        "EXTENSION CORD",
        "POTTING SOIL",
        "SANDPAPER",
        "WORK GLOVES",
        "PVC ELBOW",
        "DRILL BIT SET",
    ),
    "pharmacy": (
        "IBUPROFEN 200MG",
        "VITAMIN D3",
        "BAND AIDS",
        "SUNSCREEN SPF 50",
        "COUGH DROPS",
        "SHAMPOO",
        "CONTACT SOLUTION",
        "RX PRESCRIPTION",
        "ALLERGY RELIEF",
        "HAND SANITIZER",
    ),
    "cafe": (
        "LATTE GRANDE",
        "CAPPUCCINO",
        "COLD BREW",
        "DRIP COFFEE",
        "CHAI TEA LATTE",
        "BLUEBERRY MUFFIN",
        "CROISSANT",
        "BAGEL CREAM CHEESE",
        "OAT MILK",
        "EXTRA SHOT",
    ),
    "restaurant": (
        "CHICKEN BOWL",
        "CHEESEBURGER",
        "FRIES",
        "SODA LARGE",
        "SIDE SALAD",
        "CHIPS GUAC",
        "DOUBLE DOUBLE",
        "MILKSHAKE",
        "SOUP OF THE DAY",
        "BREADSTICKS",
        "LEMONADE",
    ),
    "fuel": (
        "UNLEADED",
        "PREMIUM",
        "DIESEL",
        "CAR WASH",
        "ENERGY DRINK",
        "BOTTLED WATER",
        "BEEF JERKY",
    ),
    "electronics": (
        "USB-C CABLE",
        "WIRELESS MOUSE",
        "PRINTER PAPER",
        "INK CARTRIDGE",
        "EARBUDS",
        "SD CARD 64GB",
        "SURGE PROTECTOR",
        "LAPTOP SLEEVE",
        "BINDER CLIPS",
    ),
}

_STREETS = ("MAIN ST", "OAK AVE", "BROADWAY", "EL CAMINO REAL", "MARKET ST", "PACIFIC HWY")
_CITIES = (
    ("SEATTLE", "WA", "98101", "206"),
    ("PORTLAND", "OR", "97205", "503"),
    ("SAN DIEGO", "CA", "92101", "619"),
    ("AUSTIN", "TX", "78701", "512"),
    ("DENVER", "CO", "80202", "303"),
    ("CHICAGO", "IL", "60601", "312"),
    ("BOSTON", "MA", "02108", "617"),
)
_SECTION_HEADERS = ("GROCERY", "PRODUCE", "DAIRY", "HOUSEHOLD", "DELI", "BAKERY", "GENERAL")
_SIZES = ("12OZ", "16OZ", "1LB", "2LB", "6CT", "12CT", "LG", "SM", "ORG", "FAMILY")
_CASHIERS = ("MARIA", "JAMES", "PRIYA", "CHEN", "ALEX", "SAM", "DANA", "LUIS")
_ENTRY_MODES = ("CHIP READ", "CONTACTLESS", "SWIPED", "APPLE PAY")
_CARDS = ("VISA", "MASTERCARD", "AMEX", "DISCOVER", "DEBIT")

Token = tuple[str, str | None]
"""A word and the label the generator knows it has."""


@dataclass(slots=True)
class _Draft:
    """One line before layout: its section, its words, whether it is centred."""

    section: SectionLabel
    tokens: list[Token]
    centred: bool = False


def _words(text: str, label: str | None = None) -> list[Token]:
    return [(word, label) for word in text.split()]


def _money(rng: random.Random, low: float, high: float) -> float:
    return round(rng.uniform(low, high), 2)


def _header(rng: random.Random, merchant: Merchant) -> list[_Draft]:
    street = f"{rng.randint(10, 9999)} {rng.choice(_STREETS)}"
    city, state, zip_code, area = rng.choice(_CITIES)
    storefront: list[Token] = _words(merchant.storefront, "MERCHANT_NAME")
    if rng.random() < 0.4:
        storefront.append((f"#{rng.randint(1, 9999):04d}", None))
    phone: list[Token] = [
        ("TEL", None),
        (f"({area})", "PHONE_NUMBER"),
        (_phone(rng), "PHONE_NUMBER"),
    ]
    address = _words(f"{street} {city}, {state} {zip_code}", "ADDRESS_LINE")
    lines = [_Draft("STOREFRONT", storefront, True)]
    if rng.random() < 0.5:  # printed on one line, or street and city on two
        lines.append(_Draft("ADDRESS", address, True))
        lines.append(_Draft("ADDRESS", phone, True))
    else:
        cut = len(street.split())
        lines.append(_Draft("ADDRESS", address[:cut], True))
        lines.append(_Draft("ADDRESS", address[cut:] + phone, True))
    if rng.random() < 0.25:
        hours = f"{rng.randint(6, 9)}AM-{rng.randint(8, 11)}PM"
        lines.append(_Draft("ADDRESS", [("HOURS", None), (hours, "STORE_HOURS")], True))
    return lines


def _phone(rng: random.Random) -> str:
    return f"{rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"


def _transaction(rng: random.Random) -> list[_Draft]:
    date = f"{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}/{rng.randint(2021, 2025)}"
    time_ = f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d}"
    tokens: list[Token] = [(date, "DATE"), (time_, "TIME"), (rng.choice(("AM", "PM")), "TIME")]
    store, register = f"{rng.randint(1, 9999):04d}", f"{rng.randint(1, 40):02d}"
    tokens += _words(f"ST# {store} TE# {register} TR# {rng.randint(1, 99999):05d}")
    lines = [_Draft("TRANSACTION_INFO", tokens)]
    if rng.random() < 0.6:
        cashier = f"YOUR CASHIER TODAY WAS {rng.choice(_CASHIERS)}"
        lines.append(_Draft("TRANSACTION_INFO", _words(cashier)))
    return lines


def _item(rng: random.Random, product: str) -> tuple[_Draft, float]:
    tokens: list[Token] = []
    if rng.random() < 0.6:
        tokens.append((f"{rng.randint(10**5, 10**6 - 1)}", None))  # item number
    tokens += _words(product, "PRODUCT_NAME")
    if rng.random() < 0.45:
        tokens.append((rng.choice(_SIZES), "PRODUCT_NAME"))
    unit = _money(rng, 0.5, 25.0)
    quantity = 1
    if rng.random() < 0.45:
        quantity = rng.randint(2, 6)
        tokens += [(str(quantity), "QUANTITY"), ("@", None), (f"{unit:.2f}", "UNIT_PRICE")]
    total = round(unit * quantity, 2)
    tokens.append((f"{total:.2f}", "LINE_TOTAL"))
    if rng.random() < 0.6:
        tokens.append((rng.choice(("F", "T", "N")), None))
    return _Draft("ITEMS", tokens), total


def _items(rng: random.Random, merchant: Merchant, count: int) -> tuple[list[_Draft], float]:
    lines: list[_Draft] = []
    subtotal = 0.0
    products = _PRODUCTS[merchant.kind]
    for n in range(count):
        if rng.random() < (0.3 if n == 0 else 0.04):
            lines.append(_Draft("SECTION_HEADER", [(rng.choice(_SECTION_HEADERS), None)]))
        line, total = _item(rng, rng.choice(products))
        lines.append(line)
        subtotal += total
    return lines, round(subtotal, 2)


def _totals(rng: random.Random, subtotal: float) -> tuple[list[_Draft], float]:
    lines = [_Draft("SUMMARY", [("SUBTOTAL", None), (f"{subtotal:.2f}", "SUBTOTAL")])]
    if rng.random() < 0.2:
        off = _money(rng, 0.5, min(5.0, subtotal / 2 + 0.5))
        kind = rng.choice((("COUPON", "COUPON"), ("DISCOUNT", "DISCOUNT")))
        lines.append(_Draft("SUMMARY", [(kind[0], None), (f"-{off:.2f}", kind[1])]))
        subtotal = max(0.0, subtotal - off)
    rate = rng.choice((0.0, 0.0725, 0.08, 0.095, 0.1025))
    tax = round(subtotal * rate, 2)
    shown: list[Token] = [(f"{rate * 100:.3f}%", None)] if rate else []
    lines.append(_Draft("SUMMARY", [("TAX", None), *shown, (f"{tax:.2f}", "TAX")]))
    total = round(subtotal + tax, 2)
    if rng.random() < 0.1:
        tip = round(total * 0.18, 2)
        lines.append(_Draft("SUMMARY", [("TIP", None), (f"{tip:.2f}", "TIP")]))
        total = round(total + tip, 2)
    lines.append(
        _Draft("TOTAL_LINE", [("****", None), ("TOTAL", None), (f"{total:.2f}", "GRAND_TOTAL")])
    )
    return lines, total


def _payment(rng: random.Random, total: float) -> list[_Draft]:
    if rng.random() < 0.15:
        paid = float(int(total) + rng.choice((1, 5, 10, 20)))
        return [
            _Draft("PAYMENT", [("CASH", "PAYMENT_METHOD"), (f"{paid:.2f}", None)]),
            _Draft("PAYMENT", [("CHANGE", None), (f"{paid - total:.2f}", "CHANGE")]),
        ]
    card: list[Token] = [
        (rng.choice(_CARDS), "PAYMENT_METHOD"),
        (f"************{rng.randint(0, 9999):04d}", None),
        *_words(rng.choice(_ENTRY_MODES)),
        ("AMOUNT", None),
        (f"{total:.2f}", None),
    ]
    lines = [_Draft("PAYMENT", card)]
    if rng.random() < 0.3:
        lines.append(_Draft("PAYMENT", _words(f"APPROVED AUTH# {rng.randint(0, 999999):06d}")))
    return lines


def _footer(rng: random.Random, merchant: Merchant, items: int) -> list[_Draft]:
    lines = []
    if rng.random() < 0.5:
        lines.append(_Draft("FOOTER", [("ITEMS", None), ("SOLD", None), (str(items), None)]))
    if rng.random() < 0.35:
        member = f"{rng.randint(10**9, 10**10 - 1)}"
        lines.append(_Draft("FOOTER", [("MEMBER", None), ("#", None), (member, "LOYALTY_ID")]))
    if rng.random() < 0.3:
        survey = f"TELL US HOW WE DID AT SURVEY.{merchant.domain.upper()}"
        lines.append(_Draft("SURVEY", _words(survey), True))
    thanks = f"THANK YOU FOR SHOPPING AT {merchant.storefront}"
    if rng.random() < 0.5:
        thanks += " PLEASE COME AGAIN"
    last: list[Token] = _words(thanks)
    if rng.random() < 0.4:
        last.append((f"WWW.{merchant.domain.upper()}", "WEBSITE"))
    lines.append(_Draft("FOOTER", last, True))
    if rng.random() < 0.4:
        policy = f"RETURNS ACCEPTED WITHIN {rng.choice((14, 30, 90))} DAYS WITH RECEIPT"
        lines.append(_Draft("FOOTER", _words(policy), True))
    return lines


def _drafts(rng: random.Random, merchant: Merchant) -> list[_Draft]:
    count = max(1, min(30, round(rng.lognormvariate(1.45, 0.6))))
    while True:
        items, subtotal = _items(rng, merchant, count)
        totals, total = _totals(rng, subtotal)
        drafts = [
            *_header(rng, merchant),
            *_transaction(rng),
            *items,
            *totals,
            *_payment(rng, total),
            *_footer(rng, merchant, count),
        ]
        if sum(len(d.tokens) for d in drafts) <= MAX_WORDS or count == 1:
            return drafts
        count -= 1


# -- layout and labels ---------------------------------------------------------


def _status(rng: random.Random, label: str | None) -> tuple[LabelStatus, list[str]]:
    draw = rng.random()
    if label is not None:
        if draw < 0.5:
            return "validated", [label]
        return ("auto_suggested", []) if draw < 0.8 else ("unvalidated", [])
    return ("validated", []) if draw < 0.15 else ("unvalidated", [])


def _confidence(rng: random.Random) -> float:
    if rng.random() < 0.03:
        return round(rng.uniform(0.4, 0.8), 3)
    return round(max(0.8, 1.0 - rng.expovariate(30.0)), 3)


def _layout(rng: random.Random, drafts: list[_Draft]) -> tuple[list[Line], list[Word]]:
    top, pitch = 0.97, 0.94 / len(drafts)
    height = round(pitch * 0.7, 4)
    lines: list[Line] = []
    words: list[Word] = []
    for line_id, draft in enumerate(drafts):
        bottom = round(max(0.0, top - (line_id + 1) * pitch + rng.uniform(-0.1, 0.1) * pitch), 4)
        line_words = _place(rng, draft, line_id, bottom, height)
        words.extend(line_words)
        left = min(w.x - w.width / 2 for w in line_words)
        right = max(w.x + w.width / 2 for w in line_words)
        mean = sum(w.confidence for w in line_words) / len(line_words)
        lines.append(
            Line(
                line_id=line_id,
                text=" ".join(w.text for w in line_words),
                x=round(left, 4),
                y=bottom,
                width=round(right - left, 4),
                height=height,
                confidence=round(max(0.0, mean - rng.uniform(0.0, 0.02)), 3),
                section_label=draft.section,
            )
        )
    return lines, words


def _place(
    rng: random.Random, draft: _Draft, line_id: int, bottom: float, height: float
) -> list[Word]:
    char = rng.uniform(0.018, 0.024)
    chars = sum(len(text) for text, _ in draft.tokens) + len(draft.tokens) - 1
    char = min(char, 0.9 / chars)
    start = (1.0 - chars * char) / 2 if draft.centred else rng.uniform(0.04, 0.08)
    words: list[Word] = []
    cursor = start
    for word_id, (text, label) in enumerate(draft.tokens):
        width = len(text) * char
        status, labels = _status(rng, label)
        words.append(
            Word(
                line_id=line_id,
                word_id=word_id,
                text=text,
                x=round(cursor + width / 2, 4),
                y=round(bottom + height / 2, 4),
                width=round(width, 4),
                height=height,
                confidence=_confidence(rng),
                label_status=status,
                labels=labels,
            )
        )
        cursor += width + char
    return words


# -- receipts ------------------------------------------------------------------


def generate_receipt(
    rng: random.Random, *, image_id: uuid.UUID | None = None, receipt_id: int = 1
) -> Receipt:
    """One receipt drawn from ``rng``."""
    merchant = rng.choice(MERCHANTS)
    lines, words = _layout(rng, _drafts(rng, merchant))
    image = image_id or uuid.UUID(int=rng.getrandbits(128), version=4)
    known = rng.random() >= 0.05  # a few receipts have no merchant yet
    return Receipt(
        image_id=image,
        receipt_id=receipt_id,
        merchant_name=merchant.name if known else "",
        lines=lines,
        words=words,
    )


def generate_receipts(count: int, *, seed: int = 0) -> Iterator[Receipt]:
    """``count`` receipts; about one image in ten holds two receipts."""
    rng = random.Random(seed)
    made = 0
    while made < count:
        receipt = generate_receipt(rng)
        yield receipt
        made += 1
        if made < count and rng.random() < 0.1:
            yield generate_receipt(rng, image_id=receipt.image_id, receipt_id=2)
            made += 1
