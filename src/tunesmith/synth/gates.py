"""Quality gates for generated text: a weak teacher's garbage is refused with a reason.

Constrained decoding makes a reply well-formed; it does not make it good. A small model fills
a schema with "...", one word, a phrase repeated until the token limit, or English in a Korean
task. Each gate returns the reason a text is refused, or None when it passes; every task runs
its output through ``text_problem`` and writes the refusals to ``rejected.jsonl``.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from tunesmith.synth.text import jaccard, normalize

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\$\{?[a-z_]+\}?|<[a-z_ ]+>", re.IGNORECASE)  # {{x}}, $n, <answer>
_LOOP = re.compile(r"(.{1,30}?)\1{4,}", re.DOTALL)  # a unit repeated 5+ times in a row
SCRIPTS = {"ko": ("HANGUL", "Hangul")}  # languages whose text must be mostly in their own script


def is_blank(text: str) -> bool:
    """Empty, or only punctuation, symbols and spaces ("...", "-", "[]")."""
    return not any(unicodedata.category(c)[0] in "LN" for c in text)


def is_loop(text: str) -> bool:
    """A repetition loop: a short unit repeated 5+ times in a row, or one word 3-gram filling a third of the words."""
    if _LOOP.search(text):
        return True
    words = normalize(text).split()
    grams = Counter(tuple(words[i : i + 3]) for i in range(len(words) - 2))
    if not grams:
        return False
    count = grams.most_common(1)[0][1]
    return count >= 3 and 3 * count >= len(words) / 3


def script_share(text: str, language: str) -> float | None:
    """Share of letters written in the language's script; None when the text has no letters."""
    letters = [c for c in text if unicodedata.category(c).startswith("L")]
    if not letters or language not in SCRIPTS:
        return None
    name = SCRIPTS[language][0]
    return sum(1 for c in letters if unicodedata.name(c, "").startswith(name)) / len(letters)


def text_problem(text: str, language: str = "en", min_chars: int = 3, min_share: float = 0.5,
                 template: str | None = None) -> str | None:
    """Why a generated text is refused (empty, punctuation only, too short, template placeholder,
    copied from the prompt's own instructions, loop, wrong script), or None."""
    text = text.strip()
    if not text:
        return "empty"
    if is_blank(text):
        return "punctuation only"
    if len(text) < min_chars:
        return "too short"
    if _PLACEHOLDER.search(text):
        return "template placeholder"
    if template and len(normalize(text)) >= 4 and normalize(text) in normalize(template):
        return "copied from the prompt"
    if is_loop(text):
        return "repetition loop"
    share = script_share(text, language)
    if share is not None and share < min_share:
        return f"wrong script (only {share:.0%} {SCRIPTS[language][1]} letters)"
    return None


_KO_QUESTION_ENDINGS = ("까", "나요", "가요", "는가", "인가", "을지", "ㄹ지")


def question_problem(text: str, language: str = "en") -> str | None:
    """A generated question that is not one: a heading ("4. Spam and Inauthentic Activity"), a link or a
    statement. It must end with a question mark (Korean: or an interrogative ending such as -까, -나요)."""
    text = text.strip().rstrip("\"')”’")
    if text.endswith(("?", "？")):
        return None
    if language == "ko" and text.endswith(_KO_QUESTION_ENDINGS):
        return None
    return "not a question (no question mark)"


def copy_problem(candidate: str, original: str, others: list[str], threshold: float) -> str | None:
    """A paraphrase equal to, containing, or too close to the original or an earlier paraphrase, or
    under 40% of the original's length (a fragment, not a rewording)."""
    cand = normalize(candidate)
    if len(cand) < 0.4 * len(normalize(original)):
        return "too short for a paraphrase"
    for label, ref in [("the original", original)] + [("another paraphrase", o) for o in others]:
        r = normalize(ref)
        if cand == r:
            return f"equal to {label}"
        if r and r in cand:
            return f"copies {label}"
        sim = jaccard(candidate, ref)
        if sim >= threshold:
            return f"near-duplicate of {label} (Jaccard {sim:.2f})"
    return None


def reason_key(reason: str) -> str:
    """The reason without its particulars, for counting: 'wrong script (only 3% ...)' -> 'wrong script'."""
    return re.split(r" \(|:", reason, maxsplit=1)[0]
