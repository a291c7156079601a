"""What each field of a data file is, as a person would read it: the target, a label set or free text, an input
or something to leave out (ids, URLs, dates, e-mail addresses, phone numbers, amounts of money, file names, numbers,
a copy of the target), each with its reason; and a field that splits the labels almost perfectly on its own, named
as a likely leak. Values are read by parsers (:mod:`tunesmith.runs.values`), not matched against patterns.

:mod:`tunesmith.runs.starter` asks these questions of the file ``tunesmith init`` reads.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC
from urllib.parse import urlsplit

from tunesmith.data.steps.curation import number_value
from tunesmith.runs.values import as_addresses, as_date, as_money, as_number, as_phone, digits_code

TARGET_NAMES = ("label", "labels", "category", "class", "intent", "target", "y", "sentiment", "rating", "stars",
                "score", "price", "answer", "output", "completion", "response")
LABEL_NAMES = re.compile(r"(^|_)(label|labels|class|intent|category|sentiment|stars?|rating|grade|y)($|_)",
                         re.IGNORECASE)
ID_NAMES = re.compile(r"(^|_)(id|uuid|index|idx|key)$", re.IGNORECASE)
FILE_NAME = re.compile(r"^\S+\.(jpe?g|png|gif|webp|bmp|tiff?|svg|pdf|txt|csv|tsv|jsonl?|xml|html?|wav|mp3|flac|ogg"
                       r"|mp4|mov|avi|zip|gz|docx?|xlsx?|pptx?)$", re.IGNORECASE)
MAX_CLASSES = 1000  # a label set can have hundreds of classes; more distinct short values than this is free text
LABEL_MAX_CHARS = 60  # labels are short: longer values are text to write, not a class to pick
MIN_PER_LABEL = 2  # values that repeat at least this often on average are a label set
FREE_TEXT_CHARS = 40  # a field this long on average is free text, even when few of its values differ
MOSTLY = 0.9  # a field is dates (addresses, ...) when this share of its values reads as one
LEAK_RIGHT = 0.97  # a field alone that puts this share of rows in the right label is a likely leak...
LEAK_ERRORS = 0.25  # ...when it also makes at most this share of the errors of always answering the commonest label
LEAK_ROWS = 30  # rows needed before a leak is named
LEAK_BINS = 20  # ordered values (dates, numbers) are cut into this many runs of rows to split the labels

@dataclass
class Column:
    """One field of the data: what its values look like."""

    name: str
    values: list

    def __post_init__(self) -> None:
        self.present = [v for v in self.values if v not in (None, "") and not (isinstance(v, str) and not v.strip())]

    @property
    def numeric(self) -> bool:
        return bool(self.present) and all(number_value(v) is not None for v in self.present)

    @property
    def integers(self) -> bool:
        return self.numeric and all(float(number_value(v)).is_integer() for v in self.present)

    @property
    def distinct(self) -> int:
        return len({key(v) for v in self.present})

    @property
    def mean_chars(self) -> float:
        return sum(len(str(v)) for v in self.present) / max(1, len(self.present))

    @property
    def is_text(self) -> bool:
        return bool(self.present) and all(isinstance(v, str) for v in self.present) and not self.numeric

    def share(self, reads) -> float:
        """The share of (the first 500) present values that ``reads`` (a parser returning None for "not one")
        or a pattern accepts."""
        test = reads.match if isinstance(reads, re.Pattern) else reads
        sample = [str(v).strip() for v in self.present[:500]]
        return sum(not (r is None or r is False) for r in map(test, sample)) / max(1, len(sample))

    def describe(self) -> str:
        kind = "number" if self.numeric else "text" if self.is_text else type(self.present[0]).__name__ \
            if self.present else "empty"
        example = str(self.present[0]) if self.present else ""
        example = example if len(example) <= 40 else example[:37] + "..."
        empty = len(self.values) - len(self.present)
        return (f"{self.name}: {kind}, {self.distinct:,} distinct, {self.mean_chars:,.0f} chars on average"
                + (f", {empty:,} empty" if empty else "") + (f", e.g. {example}" if example else ""))


def key(value) -> str:
    return value.strip() if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def columns_of(records) -> list[Column]:
    names = list(dict.fromkeys(k for r in records[:1000] for k in r.data))
    return [Column(n, [r.data.get(n) for r in records]) for n in names]


def not_content(col: Column) -> str | None:
    """Why a field is not something to read or predict (an id, URLs, file names, e-mail addresses, dates, phone
    numbers, number codes), or None."""
    if not col.present:
        return "empty on every row"
    if ID_NAMES.search(col.name):
        return "an id (its name)"
    if all(isinstance(v, str) for v in col.present):  # "+1 555 137 9325" reads as a number too: parse first
        for reads, why in ((is_url, "URLs"), (FILE_NAME, "file names"), (as_addresses, ADDRESSES),
                           (as_date, None), (as_phone, "phone numbers (who to call, not what the row says)")):
            if col.share(reads) >= MOSTLY:
                return why or dates(col)
    if col.share(digits_code) >= MOSTLY:
        return "an id (numbers written as codes: leading zeros or ten digits and more)"
    if looks_like_codes(col):
        return "an id (a different number on every row)" if col.numeric else "an id (a different code on every row)"
    return None


ADDRESSES = ("e-mail addresses (who sent or handled the row: personal data, and a model would learn the people "
             "instead of the text; name it in data.input_fields to read it anyway)")


def is_url(text: str) -> bool:
    if " " in text:
        return False
    parts = urlsplit(text if "://" in text else "//" + text if text.lower().startswith("www.") else text)
    return parts.scheme.lower() in ("http", "https", "ftp", "") and "." in parts.netloc


def dates(col: Column) -> str:
    """"dates" with the form they are written in and an example (RFC 2822 from mail systems, ISO 8601, ...)."""
    forms = Counter(read[1] for v in col.present[:500] if (read := as_date(v)) is not None)
    form = forms.most_common(1)[0][0]
    example = next(str(v).strip() for v in col.present if (read := as_date(v)) and read[1] == form)
    return f"dates ({form}, e.g. '{example}'): when a row was written, not what it says"


def looks_like_codes(col: Column) -> bool:
    """Every value different, one word with a digit in it: product codes, hashes, row numbers."""
    sample = [str(v).strip() for v in col.present[:1000]]
    return (len(sample) >= 10 and len(set(sample)) == len(sample) and all(" " not in v for v in sample)
            and sum(any(c.isdigit() for c in v) for v in sample) >= 0.9 * len(sample)
            and not (col.numeric and not col.integers))


def is_label_set(col: Column) -> bool:
    """Short values that repeat: at most :data:`MAX_CLASSES` of them, each on :data:`MIN_PER_LABEL`+ rows on
    average."""
    n = col.distinct
    return (2 <= n <= MAX_CLASSES and col.mean_chars <= LABEL_MAX_CHARS
            and len(col.present) >= MIN_PER_LABEL * n)


def guess_kind(col: Column) -> tuple[str, str]:
    """The task kind a target field asks for, and why."""
    n = col.distinct
    if col.numeric:
        if col.integers and (n <= 20 or LABEL_NAMES.search(col.name)) and is_label_set(col):
            return "classification", f"'{col.name}' holds {n} distinct numbers: each one a label"
        return "regression", f"'{col.name}' holds numbers with {n:,} distinct values"
    if is_label_set(col):
        return "classification", (f"'{col.name}' holds {n:,} distinct values that repeat (short, "
                                  f"{len(col.present) / n:,.0f} rows each on average): a label set")
    if 2 <= n <= MAX_CLASSES and col.mean_chars <= LABEL_MAX_CHARS:  # short values, but too few rows each
        return "generation", (f"'{col.name}' holds {n:,} distinct short values with {len(col.present) / n:,.1f} rows "
                              f"each on average, fewer than the {MIN_PER_LABEL} a label needs: generated as text")
    return "generation", (f"'{col.name}' is free text ({n:,} distinct values in {len(col.present):,} rows, "
                          f"{col.mean_chars:,.0f} chars on average)")


def tied_to_target(col: Column, target: Column) -> str | None:
    """Why a field would hand the model the answer: it copies the target, or each of its values goes with one
    target value (checked on the rows); None when it does not."""
    pairs = [(a, b) for a, b in zip(col.values, target.values, strict=True)
             if a not in (None, "") and b not in (None, "")]
    if len(pairs) < 10:
        return None
    same = sum(same_value(a, b) for a, b in pairs)
    if same >= 0.9 * len(pairs):
        return f"copies the target on {same:,} of {len(pairs):,} rows"
    groups: dict[str, set] = defaultdict(set)
    for a, b in pairs:
        groups[key(a)].add(key(b))
    if len(groups) * 3 <= len(pairs) and len({key(b) for _, b in pairs}) > 1 and all(
            len(g) == 1 for g in groups.values()):
        return f"determines the target (each of its {len(groups):,} values goes with one target value)"
    return None


def same_value(a, b) -> bool:
    x, y = number_value(a), number_value(b)
    if x is not None and y is not None:
        return abs(x - y) <= 1e-9 * max(1.0, abs(x), abs(y))
    return key(a).casefold() == key(b).casefold()


def leave_out(col: Column, target: Column) -> str | None:
    """Why ``col`` is not an input for ``target``, or None when it is text a model can read. A field that splits
    the target's labels almost perfectly on its own is named as a likely leak, whatever else it is."""
    why = not_content(col) or tied_to_target(col, target) or not_text(col)
    leak = likely_leak(col, target) if why is None or not why.startswith(("copies", "determines")) else None
    return "; ".join(filter(None, [why, leak])) or None


def not_text(col: Column) -> str | None:
    """Why a field that is not an id, a date or a copy of the target is still not text to read, or None."""
    if col.share(as_money) >= MOSTLY:
        marks = Counter(read[1] for v in col.present[:500] if (read := as_money(v)) is not None)
        return f"amounts of money ({', '.join(m for m, _ in marks.most_common(3))})"
    if not col.is_text:
        return "numbers" if col.numeric else f"not text ({type(col.present[0]).__name__})"
    if col.share(as_number) >= MOSTLY:
        return "numbers (written as text)"
    if col.distinct == 1:
        return "the same value on every row"
    return None


def ordered_values(col: Column) -> list | None:
    """The field's values as numbers that can be ordered (dates as timestamps, amounts, numbers), one per row
    (None where empty or unreadable), or None when the field is not dates, amounts or numbers."""
    for reads, value in ((as_date, lambda r: r[0].timestamp()), (as_money, lambda r: r[0]),
                         (as_number, lambda r: r)):
        if col.share(reads) >= MOSTLY:
            return [None if v in (None, "") or (r := reads(v)) is None else value(r) for v in col.values]
    return None


def likely_leak(col: Column, target: Column) -> str | None:
    """Why ``col`` alone would give the labels away, or None: ordered values (dates, amounts, numbers) cut into
    :data:`LEAK_BINS` runs, or each repeated value, whose commonest label is right for :data:`LEAK_RIGHT` of the
    rows and makes at most :data:`LEAK_ERRORS` of the errors of always answering the commonest label. Dates
    collected at different times per label (spam in one month, ham in another) are the classic case."""
    if not is_label_set(target):
        return None
    ordered = ordered_values(col)
    if ordered is not None:
        pairs = sorted((x, key(y)) for x, y in zip(ordered, target.values, strict=True)
                       if x is not None and y not in (None, ""))
        size = max(5, -(-len(pairs) // LEAK_BINS))
        groups = [[y for _, y in pairs[i:i + size]] for i in range(0, len(pairs), size)]
    else:
        by_value: dict[str, list] = defaultdict(list)
        for x, y in zip(col.values, target.values, strict=True):
            if x not in (None, "") and y not in (None, ""):
                by_value[key(x)].append(key(y))
        groups = list(by_value.values())
        if len(groups) * 3 > sum(map(len, groups)):  # too few rows per value to tell
            return None
    n = sum(map(len, groups))
    if n < LEAK_ROWS:
        return None
    common = Counter(y for g in groups for y in g).most_common(1)[0][1]
    right = sum(Counter(g).most_common(1)[0][1] for g in groups)
    if ordered is not None:  # one cut point may split two labels better than fixed runs of rows
        right = max(right, best_cut([y for _, y in pairs]))
    if right < LEAK_RIGHT * n or n - right > LEAK_ERRORS * (n - common):
        return None
    where = f": {ranges(pairs, col)}" if ordered is not None else ""
    return (f"a likely leak: on its own it puts {right / n:.0%} of rows in the right label (always answering the "
            f"commonest label: {common / n:.0%}){where}. A model would learn it instead of the text")


def best_cut(labels: list[str]) -> int:
    """The rows one cut point puts right (the commonest label on each side of it), over ordered ``labels``."""
    before, after = Counter(), Counter(labels)
    best = max(after.values())
    for y in labels:
        before[y] += 1
        after[y] -= 1
        best = max(best, max(before.values()) + max(after.values()))
    return best


def ranges(pairs: list[tuple[float, str]], col: Column) -> str:
    """Each label's span of values, e.g. ``ham 2002-08-01 to 2002-09-30, spam 2002-10-01 to 2002-11-30``."""
    from datetime import datetime

    is_date = col.share(as_date) >= MOSTLY
    span: dict[str, list[float]] = {}
    for x, y in pairs:
        lo_hi = span.setdefault(y, [x, x])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], x), max(lo_hi[1], x)
    shown = (lambda x: datetime.fromtimestamp(x, UTC).strftime("%Y-%m-%d")) if is_date else (
        lambda x: f"{x:,.6g}")
    spans = sorted(span.items(), key=lambda kv: kv[1][0])
    return ", ".join(f"{y} {shown(a)} to {shown(b)}" for y, (a, b) in spans[:4]) + (" ..." if len(spans) > 4 else "")


def is_free_text(col: Column) -> bool:
    """Text to read: long on average, or different on most rows."""
    return col.mean_chars >= FREE_TEXT_CHARS or col.distinct >= 0.5 * len(col.present)


def scripts(texts: list[str]) -> Counter:
    """Letters by writing system (LATIN, HANGUL, CJK, CYRILLIC, ...), from their Unicode names."""
    out: Counter = Counter()
    for text in texts[:2000]:
        for c in text:
            if c.isalpha():
                out[script_of(c)] += 1
    return out


def script_of(c: str) -> str:
    name = unicodedata.name(c, "")
    first = name.split(" ")[0] if name else "OTHER"
    return {"HIRAGANA": "KANA", "KATAKANA": "KANA"}.get(first, first)


def label_counts(col: Column) -> Counter:
    return Counter(key(v) for v in col.present)
