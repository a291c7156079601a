"""Extractive-QA exact match and F1, computed exactly as the official scorers do.

English follows the SQuAD v1.1 script: lower-case, drop ASCII punctuation, drop the articles
a/an/the, collapse spaces; F1 over word tokens. Korean follows the KorQuAD v1.0 script: first
replace ``' " 《 》 < > 〈 〉 ( ) ‘ ’`` with spaces, then lower-case, drop ASCII punctuation and
collapse spaces (no article removal); F1 over the characters of the tokens. Both take the best
score over the gold answers and average ×100 over *every* gold question, so a question with no
prediction scores 0 (and is listed), never skipped. CJK punctuation such as 「」 or 。 is left in
place, as the official scripts leave it.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.data.read.readers import squad_questions
from tunesmith.errors import DataError

_PUNCT = set(string.punctuation)
_KORQUAD_PRECLEAN = re.compile("['\"《》<>〈〉()‘’]")


def _remove_punc(text: str) -> str:
    return "".join(ch for ch in text if ch not in _PUNCT)


def normalize_en(s: str) -> str:
    """SQuAD v1.1: white_space_fix(remove_articles(remove_punc(lower(s))))."""
    text = _remove_punc(s.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_ko(s: str) -> str:
    """KorQuAD v1.0: white_space_fix(remove_punc(lower(remove_(s))))."""
    text = _KORQUAD_PRECLEAN.sub(" ", s)
    return " ".join(_remove_punc(text.lower()).split())


def _f1(pred: list[str], gold: list[str]) -> float:
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0
    precision, recall = same / len(pred), same / len(gold)
    return (2 * precision * recall) / (precision + recall)


def f1_en(prediction: str, truth: str) -> float:
    """Bag-of-words F1 after SQuAD normalisation."""
    return _f1(normalize_en(prediction).split(), normalize_en(truth).split())


def f1_ko(prediction: str, truth: str) -> float:
    """Bag-of-characters F1 after KorQuAD normalisation (spaces between tokens dropped)."""
    return _f1(list("".join(normalize_ko(prediction).split())), list("".join(normalize_ko(truth).split())))


def exact_match(prediction: str, truth: str, lang: str = "en") -> bool:
    norm = normalize_ko if lang == "ko" else normalize_en
    return norm(prediction) == norm(truth)


def f1(prediction: str, truth: str, lang: str = "en") -> float:
    return (f1_ko if lang == "ko" else f1_en)(prediction, truth)


def best_over(metric: Callable[[str, str], float], prediction: str, truths: Sequence[str]) -> float:
    return max(metric(prediction, t) for t in truths)


@dataclass
class QAScore:
    exact_match: float  # ×100, as the official scripts print it
    f1: float
    total: int
    missing: list[str] = field(default_factory=list)  # gold ids with no prediction (scored 0)
    extra: list[str] = field(default_factory=list)  # predicted ids not in the gold file (ignored)
    per_example: dict[str, tuple[bool, float]] = field(default_factory=dict)

    def headline(self) -> dict:
        return {"exact_match": self.exact_match, "f1": self.f1}


def score_qa(gold: Mapping[str, Sequence[str]], predictions: Mapping[str, str], lang: str = "en") -> QAScore:
    """EM/F1 over every gold id in file order, summed the way the official scripts sum them."""
    if lang not in ("en", "ko"):
        raise DataError(f"unknown QA language {lang!r}; use 'en' (SQuAD v1.1) or 'ko' (KorQuAD v1.0)")
    em_fn = lambda p, t: exact_match(p, t, lang)  # noqa: E731
    f1_fn = f1_ko if lang == "ko" else f1_en
    em_sum, f1_sum, missing, per = 0, 0, [], {}
    for qid, truths in gold.items():
        if qid not in predictions:
            missing.append(qid)
            per[qid] = (False, 0.0)
            continue
        em, f = best_over(em_fn, predictions[qid], truths), best_over(f1_fn, predictions[qid], truths)
        em_sum += em
        f1_sum += f
        per[qid] = (bool(em), float(f))
    total = len(gold)
    if total == 0:
        raise DataError("the gold file has no questions")
    extra = [k for k in predictions if k not in gold]
    return QAScore(100.0 * em_sum / total, 100.0 * f1_sum / total, total, missing, extra, per)


def _load_json(path: Path, what: str):
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8; re-save the file as UTF-8") from None


def iter_squad(path: Path):
    """Yield ``(title, context, qa)`` for every question of a SQuAD-style file, in file order; a question
    without an id or a gold answer is an error (the official scoring needs both)."""
    doc = _load_json(Path(path), "Gold")
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: expected a SQuAD-style object with a 'data' list of articles")
    for where, _, article, para, qa in squad_questions(path, doc):
        if not isinstance(qa, dict) or "id" not in qa or not qa.get("answers"):
            raise DataError(f"{where}: a question needs an 'id' and a non-empty 'answers' list")
        if not all(isinstance(x, dict) and isinstance(x.get("text"), str) for x in qa["answers"]):
            raise DataError(f"{where}: every answer needs a 'text' string")
        yield article.get("title", ""), para.get("context", ""), qa


def read_gold(path: Path) -> dict[str, list[str]]:
    """``{question id: [gold answer texts]}`` from a SQuAD/KorQuAD JSON file."""
    gold: dict[str, list[str]] = {}
    for _, _, qa in iter_squad(path):
        if qa["id"] in gold:
            raise DataError(f"{path}: question id {qa['id']!r} appears twice")
        gold[str(qa["id"])] = [a["text"] for a in qa["answers"]]
    return gold


def read_predictions(path: Path) -> dict[str, str]:
    """A ``{id: answer}`` JSON object, as the official scripts take."""
    doc = _load_json(Path(path), "Predictions")
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object mapping question id to answer text")
    bad = [k for k, v in doc.items() if not isinstance(v, str)]
    if bad:
        raise DataError(f"{path}: answers must be strings; not a string for id(s) {bad[:5]}")
    return doc


def parse_answer(output: str) -> str:
    """The first non-empty line of a generated answer, stripped (the model may run on)."""
    for line in output.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""
