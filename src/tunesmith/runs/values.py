"""What one value of a data file is, read by parsers rather than guessed by patterns: a date (RFC 2822 as mail
systems write it, ISO 8601, and the forms people type, read by ``email.utils``, ``datetime`` and ``dateutil``), e-mail
addresses (``email.utils.getaddresses``), a phone number, an amount of money, a plain number.

:mod:`tunesmith.runs.fields` asks these of every field ``tunesmith init`` reads.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, datetime
from email.utils import getaddresses, parsedate_to_datetime

from tunesmith.data.steps.curation import number_value

MONTHS = {m.lower() for m in (*calendar.month_name[1:], *calendar.month_abbr[1:])}
ADDRESS = re.compile(r"[^@\s<>(),;:\"]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
PHONE_CHARS = re.compile(r"\+?[\d\s().\-/]+(?:\s*(?:ext\.?|x)\s*\d{1,5})?", re.IGNORECASE)
CURRENCY_SYMBOLS = "₹$€£¥₩"
CURRENCY_CODES = ("USD", "EUR", "GBP", "INR", "JPY", "KRW", "CHF", "CAD", "AUD", "CNY", "RS.", "RS")
CJK_DATE = str.maketrans({"년": "-", "월": "-", "일": " ", "年": "-", "月": "-", "日": " "})


def as_date(value) -> tuple[datetime, str] | None:
    """``(when, form)`` where the text is a date or time on its own (form: ``RFC 2822``, ``ISO 8601`` or
    ``written out``); None for anything else. A plain number is never a date, nor a lone month or day (dateutil
    reads "May" or "10-20" as this year's dates): a written-out date needs three numbers, a month name and two,
    or a clock time."""
    text = str(value).strip()
    if not 4 <= len(text) <= 64 or not any(c.isdigit() for c in text) or number_value(text) is not None:
        return None
    try:
        return _aware(parsedate_to_datetime(text)), "RFC 2822"
    except (TypeError, ValueError, IndexError):
        pass
    try:
        return _aware(datetime.fromisoformat(text)), "ISO 8601"
    except ValueError:
        pass
    text = text.translate(CJK_DATE).strip(" -")
    numbers = re.findall(r"\d+", text)
    words = {w.lower().rstrip(".") for w in re.findall(r"[A-Za-z]+\.?", text)}
    if not (len(numbers) >= 3 or (words & MONTHS and len(numbers) >= 2) or re.search(r"\d:\d\d", text)):
        return None
    from dateutil import parser

    try:
        return _aware(parser.parse(text)), "written out"
    except (ValueError, OverflowError):
        return None


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def as_addresses(value) -> list[str] | None:
    """The e-mail addresses when the text is nothing but addresses (``a@b.org``, ``Name <a@b.org>``, a list of
    them), else None."""
    text = str(value).strip()
    if "@" not in text or len(text) > 1000:
        return None
    pairs = getaddresses([text])
    addresses = [a for _, a in pairs]
    if not addresses or not all(ADDRESS.fullmatch(a) and a in text for a in addresses):
        return None
    return addresses


def as_phone(value) -> str | None:
    """The digits of a phone number (7 to 15 of them, written with ``+``, spaces, dashes, dots or brackets), else
    None; a bare run of digits is a number or an id, not a phone number, and a date is a date."""
    text = str(value).strip()
    if not 7 <= len(text) <= 30 or not PHONE_CHARS.fullmatch(text) or re.fullmatch(r"-?\d+(\.\d+)?", text):
        return None
    digits = re.sub(r"\D", "", text.split("x")[0].split("ext")[0])
    separated = text.startswith("+") or bool(re.search(r"\d[\s().\-/]+\d", text))
    if not 7 <= len(digits) <= 15 or not separated or as_date(text) is not None:
        return None
    return digits


def as_money(value) -> tuple[float, str] | None:
    """``(amount, currency)`` for an amount written with a currency symbol or code (``₹1,299``, ``$12.50``,
    ``12.50 EUR``), else None."""
    text = str(value).strip()
    if not text:
        return None
    for mark in (*CURRENCY_SYMBOLS, *CURRENCY_CODES):
        for rest in (_after(text, mark), _before(text, mark)):
            if rest is not None and rest and (amount := number_value(rest)) is not None:
                return amount, mark.rstrip(".")
    return None


def _after(text: str, mark: str) -> str | None:
    sign, rest = ("-", text[1:]) if text.startswith("-") else ("", text)
    return sign + rest[len(mark):].strip() if rest[: len(mark)].upper() == mark.upper() else None


def _before(text: str, mark: str) -> str | None:
    return text[: -len(mark)].strip() if text.upper().endswith(mark.upper()) else None


def as_number(value) -> float | None:
    """A number written plainly or with separators (``1,299``, ``12.5``, ``64%``), else None."""
    text = str(value).strip().removesuffix("%")
    return number_value(text) if text else None


def digits_code(value) -> bool:
    """An integer written as a code: leading zeros (``00123``) or ten or more digits (an account or order number,
    not an amount)."""
    text = str(value).strip()
    return text.isdigit() and ((len(text) > 1 and text.startswith("0")) or len(text) >= 10)
