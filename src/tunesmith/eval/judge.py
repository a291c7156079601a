"""LLM-as-judge through any OpenAI-compatible endpoint.

Pairwise: each example is judged twice with the answers' positions swapped, and a contender
wins only if the judge prefers it in both orders; a split verdict is a tie. This cancels the
judges' well-known bias towards the first (or second) position. Rubric: a 1-10 score per answer.
A failed call or a verdict that cannot be read is counted, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tunesmith.clients.endpoint import EndpointClient
from tunesmith.records import parse_number

PAIRWISE = (
    "You are comparing two answers to the same question.\n\nQuestion:\n{question}\n\n"
    "Reference answer (may be empty):\n{reference}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\n"
    "Which answer is better? Reply with exactly one word: A, B or tie."
)
RUBRIC = (
    "{rubric}\n\nQuestion:\n{question}\n\nReference answer (may be empty):\n{reference}\n\n"
    "Answer:\n{answer}\n\nReply with a single integer score from 1 (worst) to 10 (best)."
)


def parse_verdict(text: str | None) -> str | None:
    """'A', 'B' or 'tie' from the judge's first word; anything else is unreadable (None)."""
    if not text:
        return None
    m = re.match(r"\W*(a|b|tie)\b", text.strip(), flags=re.IGNORECASE)
    return None if not m else ("tie" if m.group(1).lower() == "tie" else m.group(1).upper())


def combine(first: str | None, swapped: str | None) -> str | None:
    """Verdict for contender x from (x as A) and (x as B): 'win', 'loss', 'tie' or None if unreadable."""
    if first is None or swapped is None:
        return None
    x_first = {"A": 1, "B": -1, "tie": 0}[first]
    x_swapped = {"B": 1, "A": -1, "tie": 0}[swapped]
    if x_first == x_swapped == 1:
        return "win"
    if x_first == x_swapped == -1:
        return "loss"
    return "tie"


def pairwise(
    client: EndpointClient,
    questions: Sequence[str],
    references: Sequence[str],
    x: Sequence[str],
    y: Sequence[str],
    advance=lambda n: None,
) -> tuple[dict, list[str | None]]:
    """Win rate of ``x`` over ``y`` (ties count half) and the per-example verdicts."""
    convs = []
    for q, r, ax, ay in zip(questions, references, x, y, strict=True):
        convs.append([{"role": "user", "content": PAIRWISE.format(question=q, reference=r, a=ax, b=ay)}])
        convs.append([{"role": "user", "content": PAIRWISE.format(question=q, reference=r, a=ay, b=ax)}])
    replies = client.chat_many(convs, max_tokens=4)
    verdicts = [
        combine(parse_verdict(replies[2 * i].text), parse_verdict(replies[2 * i + 1].text))
        for i in range(len(questions))
    ]
    advance(len(questions))
    counted = [v for v in verdicts if v is not None]
    wins, ties = counted.count("win"), counted.count("tie")
    summary = {
        "n": len(verdicts),
        "wins": wins,
        "losses": counted.count("loss"),
        "ties": ties,
        "unjudged": len(verdicts) - len(counted),
        "win_rate": (wins + 0.5 * ties) / len(counted) if counted else None,
    }
    return summary, verdicts


def rubric(
    client: EndpointClient,
    rubric_text: str,
    questions: Sequence[str],
    references: Sequence[str],
    answers: Sequence[str],
    advance=lambda n: None,
) -> tuple[dict, list[float | None]]:
    """Mean 1-10 rubric score (unreadable or out-of-range scores are counted as unjudged)."""
    convs = [
        [{"role": "user", "content": RUBRIC.format(rubric=rubric_text, question=q, reference=r, answer=a)}]
        for q, r, a in zip(questions, references, answers, strict=True)
    ]
    replies = client.chat_many(convs, max_tokens=4, advance=advance)
    scores = []
    for rep in replies:
        s = parse_number(rep.text)
        scores.append(s if s is not None and 1 <= s <= 10 else None)
    got = [s for s in scores if s is not None]
    return {
        "n": len(scores),
        "unjudged": len(scores) - len(got),
        "mean_score": sum(got) / len(got) if got else None,
    }, scores
