"""Curation steps: composable, recipe-ordered, each keeping a record or dropping it with a reason.

Every step is a function ``(records, spec, ctx) -> (kept, rejected)`` over ``Record``s.
``run_steps`` applies them in order, checks that kept + dropped equals the input of every
step and returns one summary row per step, so nothing disappears silently.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from tunesmith.config import (
    BalanceStep,
    CharLengthStep,
    ExactDedupStep,
    LanguageStep,
    NearDedupStep,
    NumericRangeStep,
    RegexStep,
    SampleStep,
    ScrubStep,
    SemanticDedupStep,
    TokenLengthStep,
)
from tunesmith.data.tokens import token_counts, token_offsets
from tunesmith.errors import DataError
from tunesmith.records import Record, Rejected, field_text


@dataclass
class StepContext:
    """What steps may need besides their spec: a lazy tokenizer and the error policy."""

    tokenizer: Callable[[], object] | None = None
    on_error: str = "fail"
    _tok: object = field(default=None, repr=False)

    def tok(self):
        if self._tok is None:
            if self.tokenizer is None:
                raise DataError("this step needs a tokenizer; set model.name in the recipe")
            self._tok = self.tokenizer()
        return self._tok

    def portable(self, with_tokenizer: bool) -> StepContext:
        """This context for another process (a Ray worker, the local engine's second process): with the tokenizer
        loaded here where the steps there need it, as its plain Rust backend where it has one (the same counts and
        cuts, unpickled without importing transformers), so that no model files are needed there."""
        if not with_tokenizer:
            return StepContext(on_error=self.on_error)
        from tunesmith.data.tokens import plain_backend

        tok = self.tok()
        return StepContext(on_error=self.on_error, _tok=plain_backend(tok) or tok)


@dataclass
class StepRow:
    step: str
    n_in: int
    kept: int
    dropped: int
    changed: int = 0


def run_steps(
    records: list[Record], specs: list, ctx: StepContext, on_step: Callable[[StepRow], None] | None = None
) -> tuple[list[Record], list[Rejected], list[StepRow]]:
    """Apply ``specs`` in order; returns the survivors, every dropped record and the summary rows.

    ``on_step(row)`` is called after each step (progress display).
    """
    rejected: list[Rejected] = []
    rows: list[StepRow] = []
    for i, spec in enumerate(specs):
        name = f"{i + 1}:{spec.step}"
        check_fields(_fields_of(records), spec, name)
        kept, dropped, row = apply_step(records, spec, ctx, name, STEPS[type(spec)])
        rows.append(row)
        rejected += dropped
        records = kept
        if on_step:
            on_step(rows[-1])
    return records, rejected, rows


def apply_step(records: list[Record], spec, ctx: StepContext, name: str, fn) -> tuple[list, list, StepRow]:
    """One step over ``records`` (all of them, or one batch): kept, dropped (tagged with the step) and counts."""
    mutates = isinstance(spec, ScrubStep | CharLengthStep | TokenLengthStep | NumericRangeStep)  # their fields only
    fields = spec.fields if mutates else []
    before = {id(r): [r.data.get(f) for f in fields] for r in records} if mutates else {}
    kept, dropped = fn(records, spec, ctx)
    for r in dropped:
        r.stage = name
    if len(kept) + len(dropped) != len(records):  # an invariant of every step, not user input
        raise AssertionError(f"step {name}: {len(kept)} kept + {len(dropped)} dropped != {len(records)} in")
    changed = sum(before[id(r)] != [r.data.get(f) for f in fields] for r in kept) if mutates else 0
    return kept, dropped, StepRow(name, len(records), len(kept), len(dropped), changed)


def _fields_of(records: list[Record]) -> set[str]:
    return set().union(*(r.data for r in records)) if records else set()


def check_fields(seen: set[str], spec, name: str) -> None:
    """A field the step names that no record has is a recipe mistake: fail with the fields present."""
    wanted = list(getattr(spec, "fields", []) or []) + ([spec.field] if getattr(spec, "field", None) else [])
    if not seen:
        return
    for f in wanted:
        if f not in seen:
            raise DataError(
                f"data.steps[{name}]: no record has the field '{f}'; fields present: {sorted(seen)}"
            )


def _drop(rec: Record, reason: str) -> Rejected:
    return Rejected(rec.source, "", reason, rec.data)


# --- scrub and lengths ----------------------------------------------------------------------------

_BRACKETS = re.compile(r"\[[^\[\]]{0,80}\]|\{[^{}]{0,80}\}|<[^<>]{0,80}>")
_CODE = re.compile(r"\b(?=\w*\d)\w{7,}\b")


def scrub_text(text: str, spec: ScrubStep) -> str:
    """Remove phrases, bracket noise and product codes; collapse whitespace. (A pattern runs only on text that
    holds what it looks for: brackets, a digit.)"""
    for phrase in _phrases(tuple(spec.phrases)):
        text = phrase.sub(" ", text)
    if spec.brackets and ("[" in text or "{" in text or "<" in text):
        text = _BRACKETS.sub(" ", text)
    if spec.codes and _DIGIT.search(text):
        text = _CODE.sub(" ", text)
    if spec.whitespace:
        text = " ".join(text.split())  # the same as collapsing \s+ and stripping: both split on str.isspace
    return text


_DIGIT = re.compile(r"\d")


@lru_cache(maxsize=64)
def _phrases(phrases: tuple[str, ...]) -> list[re.Pattern]:
    return [re.compile(re.escape(p), re.IGNORECASE) for p in phrases]


_CODE_ASCII = (r"\b(?:[0-9]\w{6,}|\w[0-9]\w{5,}|\w{2}[0-9]\w{4,}|\w{3}[0-9]\w{3,}|\w{4}[0-9]\w{2,}|\w{5}[0-9]\w+"
               r"|\w{6,}[0-9]\w*)\b")  # _CODE on ASCII text, without look-ahead (RE2): a word of 7+ with a digit


def scrub_texts(texts: list[str], spec: ScrubStep) -> list[str]:
    """``scrub_text`` of many texts, with the same results: the product codes of the ASCII texts (where Python's
    word and digit classes are RE2's) removed by one pass of Arrow's regex engine, ten times faster."""
    if not spec.codes:
        return [scrub_text(t, spec) for t in texts]
    plain = spec.model_copy(update={"codes": False, "whitespace": False})
    texts = [scrub_text(t, plain) for t in texts]
    ascii_at = [k for k, t in enumerate(texts) if t.isascii() and _DIGIT.search(t)]
    if ascii_at:
        import pyarrow as pa
        import pyarrow.compute as pc

        cut = pc.replace_substring_regex(pa.array([texts[k] for k in ascii_at], pa.large_string()), _CODE_ASCII, " ")
        for k, t in zip(ascii_at, cut.to_pylist(), strict=True):
            texts[k] = t
    done = set(ascii_at)
    out = []
    for k, t in enumerate(texts):
        if k not in done and not t.isascii() and _DIGIT.search(t):
            t = _CODE.sub(" ", t)
        out.append(" ".join(t.split()) if spec.whitespace else t)
    return out


def scrub(records, spec: ScrubStep, ctx):
    for f in spec.fields:
        at = [r for r in records if isinstance(r.data.get(f), str)]
        for rec, text in zip(at, scrub_texts([r.data[f] for r in at], spec), strict=True):
            rec.data[f] = text
    kept, dropped = [], []
    for rec in records:
        if all(not str(rec.data.get(f) or "").strip() for f in spec.fields):
            dropped.append(_drop(rec, f"empty after scrub ({', '.join(spec.fields)})"))
        else:
            kept.append(rec)
    return kept, dropped


def char_length(records, spec: CharLengthStep, ctx):
    kept, dropped = [], []
    for rec in records:
        reason = None
        for f in spec.fields:
            text = str(rec.data.get(f) or "")
            if len(text) < spec.min:
                reason = f"{f}: {len(text)} characters < min {spec.min}"
            elif spec.max and len(text) > spec.max:
                if spec.truncate:
                    rec.data[f] = text[: spec.max]
                else:
                    reason = f"{f}: {len(text)} characters > max {spec.max}"
            if reason:
                break
        (dropped.append(_drop(rec, reason)) if reason else kept.append(rec))
    return kept, dropped


def token_length(records, spec: TokenLengthStep, ctx):
    tok = ctx.tok()
    reasons: dict[int, str] = {}
    for f in spec.fields:
        texts = [str(r.data.get(f) or "") for r in records]
        counts = token_counts(texts, tok)
        too_long = []
        for i, n in enumerate(counts.tolist()):
            if i in reasons:
                continue
            if n < spec.min:
                reasons[i] = f"{f}: {n} tokens < min {spec.min}"
            elif spec.max and n > spec.max:
                if spec.truncate:
                    too_long.append(i)
                else:
                    reasons[i] = f"{f}: {n} tokens > max {spec.max}"
        for i, offs in zip(too_long, token_offsets([texts[i] for i in too_long], tok), strict=True):
            records[i].data[f] = texts[i][: offs[spec.max - 1][1]]
    kept = [r for i, r in enumerate(records) if i not in reasons]
    return kept, [_drop(records[i], reasons[i]) for i in sorted(reasons)]


# --- value filters ----------------------------------------------------------------------------

_NUM_NOISE = re.compile(r"[\s,_₹$€£¥₩]")


def number_value(value) -> float | None:
    """A float from a number or a string such as '₹1,299' or '12.5'; None when it is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(_NUM_NOISE.sub("", str(value)))
    except ValueError:
        return None


def numeric_range(records, spec: NumericRangeStep, ctx):
    kept, dropped = [], []
    for rec in records:
        f = spec.fields[0]
        raw = rec.data.get(f)
        x = number_value(raw) if raw not in (None, "") else None
        if x is None or np.isnan(x):
            reason = f"{f}: {raw!r} is not a number"
            if ctx.on_error == "fail":
                raise DataError(
                    f"{rec.source}: {reason}. Fix the value, or set data.on_error: skip to set it aside."
                )
        elif spec.min is not None and x < spec.min:
            reason = f"{f}: {x:g} < min {spec.min:g}"
        elif spec.max is not None and x > spec.max:
            reason = f"{f}: {x:g} > max {spec.max:g}"
        else:
            rec.data[f] = x
            kept.append(rec)
            continue
        dropped.append(_drop(rec, reason))
    return kept, dropped


def regex(records, spec: RegexStep, ctx):
    try:
        pattern = re.compile(spec.pattern)
    except re.error as exc:
        raise DataError(f"data.steps regex: bad pattern {spec.pattern!r} ({exc})") from None
    kept, dropped = [], []
    for rec in records:
        hit = pattern.search(field_text(rec, spec.fields)) is not None
        if hit == (spec.action == "keep"):
            kept.append(rec)
        else:
            dropped.append(_drop(rec, f"{'matches' if hit else 'does not match'} /{spec.pattern}/"))
    return kept, dropped


SCRIPTS = {
    "en": r"A-Za-z",
    "ko": r"\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f",
    "ja": r"\u3040-\u30ff",
    "zh": r"\u4e00-\u9fff",
    "ru": r"\u0400-\u04ff",
    "ar": r"\u0600-\u06ff",
    "el": r"\u0370-\u03ff",
    "he": r"\u0590-\u05ff",
    "th": r"\u0e00-\u0e7f",
    "hi": r"\u0900-\u097f",
}


def script_ratio(text: str, langs: list[str]) -> float:
    """Share of letters written in the scripts of ``langs`` (a script check, not a language model)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    pattern = re.compile("[" + "".join(SCRIPTS[lang] for lang in langs) + "]")
    return sum(1 for c in letters if pattern.match(c)) / len(letters)


def language(records, spec: LanguageStep, ctx):
    kept, dropped = [], []
    for rec in records:
        ratio = script_ratio(field_text(rec, spec.fields), spec.languages)
        if ratio >= spec.min_ratio:
            kept.append(rec)
        else:
            dropped.append(
                _drop(
                    rec, f"{ratio:.0%} of letters in {'/'.join(spec.languages)} script < {spec.min_ratio:.0%}"
                )
            )
    return kept, dropped


# --- dedup ------------------------------------------------------------------------------------


def exact_dedup(records, spec: ExactDedupStep, ctx):
    from tunesmith.data.dedup.index import normalized_key

    first: dict[str, str] = {}
    kept, dropped = [], []
    for rec in records:
        key = normalized_key(rec, spec)
        if key in first:
            dropped.append(_drop(rec, f"exact duplicate of {first[key]}"))
        else:
            first[key] = rec.source
            kept.append(rec)
    return kept, dropped


def drop_later_matches(records: list[Record], i: np.ndarray, j: np.ndarray, sim: np.ndarray, reason):
    """Keep the rows without an earlier match; a row with one is dropped, its reason naming its best earlier
    match (``minhash.best_earlier``)."""
    from tunesmith.data.dedup.minhash import best_earlier

    i, j, sim = best_earlier(i, j, sim)
    best = {b: (a, s) for a, b, s in zip(i.tolist(), j.tolist(), sim.tolist(), strict=True)}
    kept, dropped = [], []
    for k, rec in enumerate(records):
        if k in best:
            a, s = best[k]
            dropped.append(_drop(rec, reason(records[a].source, s)))
        else:
            kept.append(rec)
    return kept, dropped


def near_dedup(records, spec: NearDedupStep, ctx):
    from tunesmith.data.dedup.minhash import near_matches, near_reason

    texts = [field_text(r, spec.fields) for r in records]
    i, j, sim = near_matches(texts, spec.threshold, spec.unit, spec.ngram, spec.num_perm, spec.seed)
    return drop_later_matches(records, i, j, sim, near_reason)


def semantic_dedup(records, spec: SemanticDedupStep, ctx):
    from tunesmith.models.embeddings import embed

    emb = embed([field_text(r, spec.fields) for r in records], spec.model, spec.batch_size)
    found = []
    for lo in range(0, len(records), 256):  # 256 x n similarities at a time
        sims = emb[lo : lo + 256] @ emb.T
        ii, jj = np.nonzero(sims >= spec.threshold)
        later = ii + lo < jj
        found.append((ii[later] + lo, jj[later], sims[ii[later], jj[later]].astype(np.float64)))
    i, j, sim = (np.concatenate(x) for x in zip(*found, strict=True)) if found else (np.empty(0, int),) * 3
    return drop_later_matches(records, i, j, sim, lambda src, s: f"semantic duplicate of {src} (similarity {s:.2f})")


# --- balance, sample, order --------------------------------------------------------------------


def balance(records, spec: BalanceStep, ctx):
    f = spec.fields[0]
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        by_label[str(rec.data.get(f))].append(i)
    if spec.target:
        unknown = sorted(set(spec.target) - set(by_label))
        if unknown:
            raise DataError(
                f"data.steps balance: target labels {unknown} are not in the data ({sorted(by_label)})"
            )
        total = sum(spec.target.values())
        share = {k: v / total for k, v in spec.target.items()}
        n = min(len(by_label[k]) / s for k, s in share.items() if s > 0)
        caps = {k: int(n * share.get(k, 0)) for k in by_label}
    else:
        cap = spec.max_per_label or min(len(v) for v in by_label.values())
        caps = {k: cap for k in by_label}
    rng = random.Random(spec.seed)
    keep: set[int] = set()
    for label, idx in by_label.items():
        keep.update(rng.sample(idx, min(caps[label], len(idx))))
    kept = [r for i, r in enumerate(records) if i in keep]
    dropped = [
        _drop(r, f"over the cap of {caps[str(r.data.get(f))]} for {f}={r.data.get(f)!r}")
        for i, r in enumerate(records)
        if i not in keep
    ]
    return kept, dropped


def sample(records, spec: SampleStep, ctx):
    n = spec.n if spec.n is not None else round(len(records) * (spec.fraction or 1.0))
    if spec.n is None and spec.fraction is None:
        raise DataError("data.steps sample: give n or fraction")
    chosen = set(random.Random(spec.seed).sample(range(len(records)), min(n, len(records))))
    kept = [r for i, r in enumerate(records) if i in chosen]
    return kept, [_drop(r, f"not in the sample of {n}") for i, r in enumerate(records) if i not in chosen]


STEPS = {
    ScrubStep: scrub,
    CharLengthStep: char_length,
    TokenLengthStep: token_length,
    NumericRangeStep: numeric_range,
    RegexStep: regex,
    LanguageStep: language,
    ExactDedupStep: exact_dedup,
    NearDedupStep: near_dedup,
    SemanticDedupStep: semantic_dedup,
    BalanceStep: balance,
    SampleStep: sample,
}


def token_limits(specs: list) -> tuple[int | None, int | None]:
    """The ``token_length`` step's min and max, which the profile's token-length plot draws."""
    for spec in specs:
        if spec.step == "token_length":
            return spec.min or None, spec.max
    return None, None


def summary_table(rows: list[StepRow]) -> str:
    """Markdown table: per step, records in, kept, dropped, changed."""
    lines = ["| step | in | kept | dropped | changed |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r.step} | {r.n_in} | {r.kept} | {r.dropped} | {r.changed} |" for r in rows]
    return "\n".join(lines)
