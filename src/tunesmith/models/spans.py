"""Spans of extractive QA: a question and its context, the context cut into overlapping windows (``train.span_stride``
tokens shared, so no context is dropped and an answer near a window edge is whole in the next), an answer's
character span turned into window token positions, and the best span read back from start/end logits."""

from __future__ import annotations

import math

from tunesmith.errors import DataError
from tunesmith.records import Example


def model_inputs(tokenizer, row: dict) -> dict:
    """The keys of an encoded row the model takes (a decoder has no token_type_ids)."""
    return {k: row[k] for k in tokenizer.model_input_names if k in row and k != "attention_mask"}



def question_and_context(example: Example, fields: list[str], context_field: str) -> tuple[str, str]:
    if context_field not in example.inputs:
        raise DataError(f"train.context_field '{context_field}' is not an input field of example {example.id} "
                        f"(its fields: {', '.join(example.inputs)})")
    question = "\n".join(str(example.inputs[f]) for f in fields if f != context_field and f in example.inputs)
    return question, str(example.inputs[context_field])



def windows(tokenizer, question: str, context: str, max_len: int, stride: int) -> list[dict]:
    """The question with each window of the context (``stride`` tokens shared by neighbours); every row keeps
    the character offsets of its context tokens (``None`` for question and special tokens)."""
    enc = tokenizer(question, context, truncation="only_second", max_length=max_len, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    out = []
    for i, ids in enumerate(enc["input_ids"]):
        seq = enc.sequence_ids(i)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], seq, strict=True)]
        row = {"input_ids": ids, "length": len(ids), "offsets": offsets}
        if "token_type_ids" in enc:
            row["token_type_ids"] = enc["token_type_ids"][i]
        out.append(row)
    return out



def answer_span(example: Example, context: str) -> tuple[int, int] | None:
    """Character span of the first gold answer: its recorded start when it matches, else its first occurrence."""
    answer = (example.meta.get("answers") or [example.target])[0]
    start = example.meta.get("answer_start")
    if not (isinstance(start, int) and context[start : start + len(answer)] == answer):
        start = context.find(answer)
    return None if start < 0 or not answer else (start, start + len(answer))



def label_window(row: dict, span: tuple[int, int]) -> tuple[int, int]:
    """Token start/end of ``span`` in the window, or (0, 0) when the window does not hold all of it."""
    inside = [i for i, o in enumerate(row["offsets"]) if o is not None]
    first, last = inside[0], inside[-1]
    if row["offsets"][first][0] > span[0] or row["offsets"][last][1] < span[1]:
        return 0, 0
    start = next(i for i in inside if row["offsets"][i][1] > span[0])
    end = next(i for i in reversed(inside) if row["offsets"][i][0] < span[1])
    return start, end



def best_span(start_logits, end_logits, offsets: list, max_answer: int) -> tuple[float, tuple[int, int] | None]:
    """Highest start + end score over context tokens with start <= end < start + max_answer."""
    import torch

    ctx = torch.tensor([o is not None for o in offsets] + [False] * (len(start_logits) - len(offsets)))
    if not ctx.any():
        return -math.inf, None
    s = start_logits.masked_fill(~ctx, -1e9)
    e = end_logits.masked_fill(~ctx, -1e9)
    scores = s[:, None] + e[None, :]
    n = len(s)
    band = torch.ones(n, n, dtype=torch.bool).triu() & ~torch.ones(n, n, dtype=torch.bool).triu(max_answer)
    scores = scores.masked_fill(~band, -math.inf)
    flat = int(scores.argmax())
    i, j = divmod(flat, n)
    if offsets[i] is None or j >= len(offsets) or offsets[j] is None:
        return -math.inf, None
    return float(scores[i, j]), (offsets[i][0], offsets[j][1])
