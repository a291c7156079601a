"""Fill-in-the-blank question/answer pairs from document text, without a teacher model.

``qa_from_documents.method: cloze`` picks sentences of each chunk and blanks one span out of each
(a number or date, a quoted term, a capitalised name, else the sentence's closing words); the
question is the sentence with the blank, the answer the span. Every answer is a span of its chunk by
construction. It needs no LLM, so it works offline where a small teacher writes unusable pairs
(docs/synth_results.md), at the cost of questions that read like a reading-comprehension drill.
"""

from __future__ import annotations

import random
import re

BLANK = "___"  # three: five in a row would be refused by the repetition-loop gate
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")  # markdown [text](url) -> text
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_NUMBER = re.compile(r"\b\d[\d,.:/-]*(?:\s+(?:days?|hours?|minutes?|years?|months?|weeks?|percent|MB|GB)\b|%"
                     r"|개월|시간|일|년|월|주|분|원|명|개)?")
_QUOTED = re.compile(r"[\"“]([^\"”]{3,60})[\"”]")
_NAME = re.compile(r"(?<!^)(?<![.!?]\s)\b([A-Z][\w'-]+(?:\s+(?:of|and|the|for|&)?\s*[A-Z][\w'-]+)+)")
_STOP = {"the", "a", "an", "of", "to", "and", "or", "in", "on", "for", "with", "by", "as", "at", "from", "that",
         "this", "is", "are", "be", "any", "your", "our", "its", "their"}
_KO_PARTICLES = ("으로", "에서", "에게", "까지", "부터", "은", "는", "이", "가", "을", "를", "의", "에", "로", "와", "과", "도")
QUESTION = {
    "en": 'Which words fill the blank in "{sentence}"?',
    "ko": '"{sentence}" — 빈칸에 들어갈 말은 무엇인가요?',
}


def clean(text: str) -> str:
    """Markdown links to their text; front-matter, heading and list markers removed."""
    text = _LINK.sub(r"\1", text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line == "---" or re.match(r"^[a-z_]+:\s", line):  # front matter such as 'title: ...'
            continue
        lines.append(re.sub(r"^(#+|\*|-|\d+\.)\s+", "", line))
    return "\n".join(lines)


def sentences(text: str, language: str) -> list[str]:
    """Sentences long enough to ask about (English 8-40 words, Korean 4-30 words), without URLs."""
    low, high = (4, 30) if language == "ko" else (8, 40)
    out = []
    for s in _SENTENCE_END.split(clean(text)):
        s = s.strip()
        if low <= len(s.split()) <= high and "http" not in s and s[-1:] in ".!?다요":
            out.append(s)
    return out


def answer_span(sentence: str, language: str) -> str | None:
    """The span to blank out: a number, a quoted term, a capitalised name, else the closing words."""
    for pattern in (_NUMBER, _QUOTED) if language == "ko" else (_NUMBER, _QUOTED, _NAME):
        m = pattern.search(sentence)
        if m:
            span = (m.group(1) if m.groups() else m.group(0)).strip(" ,.")
            if len(span) >= 2 and span != sentence.rstrip(".!?"):
                return span
    words = sentence.rstrip(".!?").split()
    if language == "ko":
        longest = max(words, key=len)
        for particle in _KO_PARTICLES:
            if longest.endswith(particle) and len(longest) > len(particle) + 1:
                return longest[: -len(particle)]
        return longest if len(longest) >= 2 else None
    tail = words[-3:]
    while tail and tail[0].lower() in _STOP:
        tail = tail[1:]
    span = " ".join(tail).strip(",;:()")
    return span if len(span) >= 3 else None


def cloze_pairs(text: str, n: int, language: str = "en", seed: int = 0, seen: set[str] | None = None) -> list[dict]:
    """Up to ``n`` fill-in-the-blank pairs from one chunk; sentences in ``seen`` (from overlapping
    chunks) are skipped and added to it."""
    seen = set() if seen is None else seen
    pool = [s for s in sentences(text, language) if s not in seen]
    random.Random(f"{seed}:{text[:64]}").shuffle(pool)
    pairs = []
    for sentence in pool:
        if len(pairs) == n:
            break
        span = answer_span(sentence, language)
        if not span or span not in sentence:
            continue
        seen.add(sentence)
        blanked = sentence.replace(span, BLANK, 1)
        pairs.append({"question": QUESTION.get(language, QUESTION["en"]).format(sentence=blanked), "answer": span})
    return pairs
