"""Raw exports as teams write them, built from real text: an inbox export (ham from Alpaca instructions and
BANKING77 customer messages, spam from Amazon India product listings; RFC 2822 dates, HTML bodies, empty subjects),
a CRM ticket export (created-at timestamps, agent e-mail addresses, phone numbers, refund amounts) and an
Excel-saved CSV (a byte-order mark, CRLF line ends, ``;`` between fields).

The inbox export reads ../shared/data (products_amazon_in may be used in tests only, never copied into the
repository); its dates plant a leak on purpose: the ham was "collected" in August and September 2002, the spam
in October and November, as in the public spam corpora, so that the date alone splits the labels.

``python -m tests.raw_exports emails OUTDIR`` writes ``emails.csv`` (train) and ``emails_test.csv`` (held out)
for a timing of ``tunesmith init`` and ``tunesmith run --quick`` on them.
"""

from __future__ import annotations

import csv
import html
import io
import json
import random
import sys
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ALPACA = "instructions/llamafactory_alpaca_en_demo.json"
BANKING77 = "banking77/banking77_train.csv"
PRODUCTS = "products_amazon_in/amazon_in_products_shared.csv"
FIRST = ("Anna", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Pavel", "Quinn", "Rosa", "Sam", "Tara")
LAST = ("Keller", "Novak", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Silva", "Brennan", "Haas", "Petrov")
ZONES = (timezone(timedelta(hours=1)), timezone(timedelta(hours=-7)), UTC, timezone(timedelta(hours=2)),
         timezone(timedelta(hours=-4)))
HAM_DAYS = (datetime(2002, 8, 1), 61)  # August and September 2002
SPAM_DAYS = (datetime(2002, 10, 1), 61)  # October and November 2002


def shared_files(shared: Path = SHARED) -> dict[str, Path] | None:
    """The shared files the inbox export is built from, or None when a clone has no ../shared."""
    files = {k: shared / v for k, v in (("alpaca", ALPACA), ("banking", BANKING77), ("products", PRODUCTS))}
    return files if all(p.is_file() for p in files.values()) else None


def rfc2822(rng: random.Random, start: datetime, days: int) -> str:
    """A date as mail systems write it, e.g. ``Tue, 06 Aug 2002 11:48:09 +0100``, sometimes with a zone comment."""
    when = start + timedelta(days=rng.randrange(days), seconds=rng.randrange(86_400))
    zone = rng.choice(ZONES)
    text = format_datetime(when.replace(tzinfo=zone))
    return text + (" (PDT)" if zone.utcoffset(None) == timedelta(hours=-7) and rng.random() < 0.5 else "")


def colleague(rng: random.Random) -> str:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    return f"{first} {last} <{first.lower()}.{last.lower()}@team.example.org>"


def ham_rows(files: dict[str, Path], rng: random.Random, n_banking: int) -> list[dict]:
    """Colleagues' mail (an instruction and its answer) and customers' messages, some of them in HTML."""
    alpaca = json.loads(files["alpaca"].read_text(encoding="utf-8"))
    with open(files["banking"], newline="", encoding="utf-8") as fh:
        banking = list(csv.DictReader(fh))[:: max(1, 10_003 // n_banking)][:n_banking]
    rows = []
    for a in alpaca:
        body = "\n\n".join(filter(None, [a["input"], a["output"]]))
        rows.append({"subject": a["instruction"][:90], "body": body, "from": colleague(rng)})
    for i, b in enumerate(banking):
        subject = rng.choice(("Question about my account", "Help please", "Re: your message", "Card", "Urgent",
                              b["category"].replace("_", " ").capitalize()))
        rows.append({"subject": subject, "body": b["text"],
                     "from": f"customer{i:04d}@{rng.choice(('mail', 'inbox', 'post'))}.example.com"})
    for r in rows:
        if rng.random() < 0.25:
            r["body"] = "<div>" + "".join(f"<p>{html.escape(p)}</p>" for p in r["body"].split("\n\n")) + "</div>"
        r |= {"date": rfc2822(rng, *HAM_DAYS), "label": "ham"}
    return rows


def spam_rows(files: dict[str, Path], rng: random.Random) -> list[dict]:
    """Product offers as HTML mail: the listing's name, price, discount, bullet points and a review."""
    with open(files["products"], newline="", encoding="utf-8") as fh:
        products = list(csv.DictReader(fh))
    rows = []
    for p in products:
        bullets = "".join(f"<li>{html.escape(b.strip())}</li>" for b in p["about_product"].split("|") if b.strip())
        body = (f"<html><body><h2>{html.escape(p['product_name'])}</h2>"
                f"<p>Now only <b>{p['discounted_price']}</b> (was {p['actual_price']}): save "
                f"{p['discount_percentage']} today!</p><ul>{bullets}</ul>"
                f"<p><i>{html.escape(p['review_content'][:300])}</i></p>"
                f"<a href=\"{html.escape(p['product_link'])}\">Buy now</a></body></html>")
        brand = "".join(c for c in p["product_name"].split()[0].lower() if c.isalnum()) or "shop"
        subject = rng.choice((f"{p['discount_percentage']} off: {p['product_name'][:50]}",
                              f"Deal of the day - {p['product_name'][:60]}", p["review_title"][:60]))
        rows.append({"subject": subject, "body": body, "from": f"{brand.title()} Offers <deals@{brand}-offers.example>",
                     "date": rfc2822(rng, *SPAM_DAYS), "label": "spam"})
    return rows


def email_export(files: dict[str, Path], seed: int = 7, test_share: float = 0.3, n_banking: int = 966,
                 unusable_test: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train rows, test rows)`` of an inbox export: ``message_id, date, from, subject, body, label``. Empty
    subjects (3% of ham, 12% of spam) and a few empty senders, as real inboxes have; ``unusable_test`` test rows
    have neither subject nor body (nothing to read)."""
    rng = random.Random(seed)
    rows = ham_rows(files, rng, n_banking) + spam_rows(files, rng)
    rng.shuffle(rows)
    out = []
    for i, r in enumerate(rows):
        if rng.random() < (0.03 if r["label"] == "ham" else 0.12):
            r["subject"] = ""
        if rng.random() < 0.01:
            r["from"] = ""
        out.append({"message_id": f"<{rng.getrandbits(48):012x}.{i}@mail.example.net>", "date": r["date"],
                    "from": r["from"], "subject": r["subject"], "body": r["body"], "label": r["label"]})
    n_test = int(len(out) * test_share)
    test, train = out[:n_test], out[n_test:]
    for r in test[:unusable_test]:
        r["subject"] = r["body"] = ""
    return train, test


def crm_tickets(messages: list[dict], seed: int = 11) -> list[dict]:
    """A CRM ticket export of customer messages (``text``, ``category``): a ticket number, an ISO created-at
    timestamp, the agent's e-mail address, the customer's phone number, a refund amount and the channel."""
    rng = random.Random(seed)
    agents = [f"{f.lower()}.{rng.choice(LAST).lower()}@support.example.com" for f in FIRST[:8]]
    start = datetime(2024, 1, 2, 8, 0, tzinfo=UTC)
    rows = []
    for i, m in enumerate(messages):
        when = start + timedelta(minutes=37 * i + rng.randrange(30))
        rows.append({"ticket": str(480_211 + i * 3 + rng.randrange(3)), "created_at": when.isoformat(),
                     "agent_email": rng.choice(agents), "customer_phone": f"+44 20 7946 {rng.randrange(10_000):04d}",
                     "refund": f"${rng.randrange(0, 400)}.{rng.randrange(100):02d}", "channel": rng.choice(
                         ("email", "chat", "phone")), "subject": "" if rng.random() < 0.1 else m["text"][:40],
                     "description": m["text"], "category": m["category"]})
    return rows


def csv_text(rows: list[dict], delimiter: str = ",", line_end: str = "\n") -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter=delimiter, lineterminator=line_end)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def excel_csv(rows: list[dict]) -> bytes:
    """The rows as Excel saves "CSV UTF-8" in a European locale: a byte-order mark, CRLF, ``;`` separators."""
    return csv_text(rows, ";", "\r\n").encode("utf-8-sig")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != "emails":
        raise SystemExit("usage: python -m tests.raw_exports emails OUTDIR")
    files = shared_files()
    if files is None:
        raise SystemExit(f"shared data not found under {SHARED}")
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    train, test = email_export(files)
    (out / "emails.csv").write_text(csv_text(train), encoding="utf-8")
    (out / "emails_test.csv").write_text(csv_text(test), encoding="utf-8")
    print(f"{len(train):,} train and {len(test):,} test emails → {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
