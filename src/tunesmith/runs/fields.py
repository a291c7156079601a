"""What each field of a data file is, as a person would read it: the target, a label set or free text, an input
or something to leave out (ids, URLs, dates, file names, numbers, a copy of the target), each with its reason.

:mod:`tunesmith.runs.starter` asks these questions of the file ``tunesmith init`` reads.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass

from tunesmith.data.steps import number_value

TARGET_NAMES = ("label", "labels", "category", "class", "intent", "target", "y", "sentiment", "rating", "stars",
                "score", "price", "answer", "output", "completion", "response")
LABEL_NAMES = re.compile(r"(^|_)(label|labels|class|intent|category|sentiment|stars?|rating|grade|y)($|_)",
                         re.IGNORECASE)
ID_NAMES = re.compile(r"(^|_)(id|uuid|index|idx|key)$", re.IGNORECASE)
URL = re.compile(r"^(https?://|www\.)\S+$", re.IGNORECASE)
FILE_NAME = re.compile(r"^\S+\.(jpe?g|png|gif|webp|bmp|tiff?|svg|pdf|txt|csv|tsv|jsonl?|xml|html?|wav|mp3|flac|ogg"
                       r"|mp4|mov|avi|zip|gz|docx?|xlsx?|pptx?)$", re.IGNORECASE)
DATE = re.compile(r"^(\d{1,4}[-./]\d{1,2}[-./]\d{1,4}([ T]\d{1,2}:\d{2}.*)?|\d{1,2}[- ][A-Za-z]{3,9}[- ,]+\d{2,4}"
                  r"|[A-Za-z]{3,9} \d{1,2},? \d{4}|\d{1,2}:\d{2}(:\d{2})?)$")
NUMBERISH = re.compile(r"^[-+]?[\d.,\s]*\d[\d.,\s]*%?$|^[₹$€£¥₩][\d.,\s]+$")
MAX_CLASSES = 1000  # a label set can have hundreds of classes; more distinct short values than this is free text
LABEL_MAX_CHARS = 60  # labels are short: longer values are text to write, not a class to pick
MIN_PER_LABEL = 2  # values that repeat at least this often on average are a label set
FREE_TEXT_CHARS = 40  # a field this long on average is free text, even when few of its values differ


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

    def share(self, pattern: re.Pattern) -> float:
        sample = self.present[:500]
        return sum(bool(pattern.match(str(v).strip())) for v in sample) / max(1, len(sample))

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
    """Why a field is not something to read or predict (an id, URLs, dates, file names), or None."""
    if not col.present:
        return "empty on every row"
    if ID_NAMES.search(col.name):
        return "an id (its name)"
    if col.is_text and col.share(URL) >= 0.9:
        return "URLs"
    if col.is_text and col.share(FILE_NAME) >= 0.9:
        return "file names"
    if col.is_text and col.share(DATE) >= 0.9:
        return "dates"
    if looks_like_codes(col):
        return "an id (a different code on every row)"
    return None


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
    """Why ``col`` is not an input for ``target``, or None when it is text a model can read."""
    why = not_content(col) or tied_to_target(col, target)
    if why:
        return why
    if not col.is_text:
        return "numbers" if col.numeric else f"not text ({type(col.present[0]).__name__})"
    if col.share(NUMBERISH) >= 0.9:
        return "numbers (written as text)"
    if col.distinct == 1:
        return "the same value on every row"
    return None


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
