"""What `tunesmith init` reads each value and field as: dates in the forms mail systems, databases and people write
them, e-mail addresses, phone numbers, amounts of money and number codes, each by a parser; a field that splits the
labels on its own named as a likely leak, and one that does not left alone."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from tunesmith.runs.fields import Column, leave_out, likely_leak, not_content
from tunesmith.runs.values import as_addresses, as_date, as_money, as_phone


@pytest.mark.parametrize(("text", "form", "day"), [
    ("Tue, 06 Aug 2002 11:48:09 +0100", "RFC 2822", "2002-08-06"),
    ("Tue, 06 Aug 2002 11:48:09 -0700 (PDT)", "RFC 2822", "2002-08-06"),
    ("2024-03-05T14:22:10Z", "ISO 8601", "2024-03-05"),
    ("2024-03-05 14:22:10", "ISO 8601", "2024-03-05"),
    ("March 5, 2024", "written out", "2024-03-05"),
    ("5 March 2024", "written out", "2024-03-05"),
    ("05/03/2024 14:22", "written out", None),
    ("2024년 3월 5일", "written out", "2024-03-05"),
])
def test_dates_in_every_common_form_are_read(text, form, day):
    when, how = as_date(text)
    assert how == form and (day is None or when.strftime("%Y-%m-%d") == day)


@pytest.mark.parametrize("text", ["10-20", "May", "1.5", "20240305", "Card 3", "version 2", "3rd floor", ""])
def test_numbers_ranges_and_words_are_not_dates(text):
    assert as_date(text) is None


def test_addresses_phones_and_money_are_read_and_text_is_not():
    assert as_addresses("Anna Keller <anna.keller@team.example.org>") == ["anna.keller@team.example.org"]
    assert as_addresses("a@b.com, C <c@d.org>") == ["a@b.com", "c@d.org"]
    assert as_addresses("write to a@b.com please") is None and as_addresses("x@y") is None
    assert as_phone("+44 20 7946 0958") == "442079460958" and as_phone("(555) 123-4567") == "5551234567"
    assert as_phone("12345678") is None and as_phone("2024-03-05") is None and as_phone("1,234,567") is None
    assert as_phone("12345.67") is None
    assert as_money("₹1,299") == (1299.0, "₹") and as_money("12.50 EUR") == (12.5, "EUR")
    assert as_money("Rs. 499") == (499.0, "RS") and as_money("$12.50") == (12.5, "$") and as_money("12") is None


def column(name: str, values) -> Column:
    return Column(name, list(values))


def test_fields_are_classified_with_their_reason():
    rng = random.Random(1)
    n = 60
    cases = {
        "sent": ([format_datetime(datetime(2024, 1, 1, tzinfo=UTC) + timedelta(hours=7 * i)) for i in range(n)],
                 "dates (RFC 2822, e.g."),
        "agent": ([f"agent{i % 5}@support.example.com" for i in range(n)], "e-mail addresses"),
        "phone": ([f"+1 555 {rng.randrange(1000):03d} {rng.randrange(10_000):04d}" for _ in range(n)], "phone numbers"),
        "order": ([f"{i:08d}" for i in range(n)], "an id (numbers written as codes"),
        "ticket": ([str(480_211 + 3 * i) for i in range(n)], "an id (a different number on every row)"),
        "link": ([f"www.example.com/p/{i}" for i in range(n)], "URLs"),
    }
    for name, (values, why) in cases.items():
        assert (not_content(column(name, values)) or "").startswith(why), name
    labels = column("label", ["a", "b"] * (n // 2))
    assert leave_out(column("refund", [f"${rng.randrange(400)}.{rng.randrange(100):02d}" for _ in range(n)]),
                     labels) == "amounts of money ($)"
    assert leave_out(column("subject", [f"about my card, row {i}" for i in range(n)]), labels) is None


def test_a_date_range_per_label_is_named_a_likely_leak_and_mixed_dates_are_not():
    rng = random.Random(2)
    start = {"ham": datetime(2002, 8, 1, tzinfo=UTC), "spam": datetime(2002, 10, 1, tzinfo=UTC)}
    labels = [rng.choice(["ham", "ham", "spam"]) for _ in range(300)]
    leaked = [format_datetime(start[y] + timedelta(days=rng.randrange(55), seconds=rng.randrange(86_400)))
              for y in labels]
    why = likely_leak(column("date", leaked), column("label", labels))
    assert why.startswith("a likely leak: on its own it puts 100% of rows in the right label"), why
    assert "ham 2002-08-" in why and "spam 2002-10-" in why
    mixed = [format_datetime(start["ham"] + timedelta(days=rng.randrange(120))) for _ in labels]
    assert likely_leak(column("date", mixed), column("label", labels)) is None
    assert "a likely leak" in leave_out(column("date", leaked), column("label", labels))


def test_a_category_that_almost_always_names_the_label_is_a_likely_leak():
    rng = random.Random(3)
    labels = [rng.choice(["ham", "spam"]) for _ in range(200)]
    folder = [("Junk" if y == "spam" else "Inbox") if i % 40 else "Inbox" for i, y in enumerate(labels)]
    why = leave_out(column("folder", folder), column("label", labels))
    assert why is not None and "a likely leak: on its own it puts 9" in why
    noise = [rng.choice(["web", "mail", "phone"]) for _ in labels]
    assert likely_leak(column("channel", noise), column("label", labels)) is None
