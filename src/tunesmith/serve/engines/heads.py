"""Trained heads (classifier, regression, span) behind the OpenAI chat API.

A head does not generate: it reads the last user message (the prompt it was trained on, rendered from
the recipe's template) and answers with the label, the number or the span, as the assistant's message.
An OpenAI-client user sees a chat completion like any other model's, streamed or not.

A classifier head also says how sure it is: with ``logprobs: true`` the choice's ``logprobs.content``
holds the answer as one token whose ``logprob`` is the label's log-probability and whose
``top_logprobs`` are the ``top_logprobs`` most probable labels, in OpenAI's shape. Regression and span
heads have no distribution to show: their ``logprobs`` stays null.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from pathlib import Path

from tunesmith.serve.errors import APIError


def is_head_folder(path) -> bool:
    return (Path(path) / "head.json").is_file() or (Path(path) / "labels.json").is_file()


class ServedHead:
    """A head predictor with a lock: requests are answered one forward pass at a time, off the event loop."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.lock = threading.Lock()

    @property
    def kind(self) -> str:
        """classifier, regression or span."""
        return self.predictor.head

    @property
    def label_probabilities(self) -> bool:
        """Whether it answers with a distribution over labels (a classifier), which logprobs can show."""
        return self.predictor.kind.label_probabilities

    def answer(self, text: str) -> str:
        with self.lock:
            return self.predictor.answer(text)

    def ranked_labels(self, text: str) -> list[tuple[str, float]]:
        with self.lock:
            return self.predictor.ranked_labels(text)

    def tokens(self, text: str) -> int:
        return len(self.predictor.tokenizer(text, add_special_tokens=False)["input_ids"])


def load_head(path, base_model: str) -> ServedHead:
    from tunesmith.models.head_predictor import HeadPredictor

    return ServedHead(HeadPredictor(Path(path), base_model=base_model))


def user_text(messages: list[dict]) -> str:
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
    if not last:
        raise APIError(400, "A head model answers the last user message; this request has none.", param="messages")
    return last


async def chat_reply(head: ServedHead, body, messages: list[dict], lane, key):
    """The chat completion (or its chunk stream) whose message is the head's answer, computed in the heads' lane
    as ``key``'s work."""
    from fastapi.responses import StreamingResponse

    from tunesmith.errors import DataError

    text = user_text(messages)
    try:
        if body.logprobs and head.label_probabilities:  # one forward pass gives the label and its distribution
            ranked = await lane.run(key, head.ranked_labels, text)
            answer, logprobs = ranked[0][0], label_logprobs(ranked, body.top_logprobs or 0)
        else:
            answer, logprobs = await lane.run(key, head.answer, text), None
    except DataError as exc:  # e.g. a span head's message that does not follow its prompt template
        raise APIError(400, str(exc), param="messages") from None
    prompt, completion = head.tokens(text), head.tokens(answer)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion * body.n, "total_tokens": prompt + completion * body.n}
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        return StreamingResponse(_chunks(answer, logprobs, body, cid, created, usage), media_type="text/event-stream")
    return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop",
                         "logprobs": logprobs} for i in range(body.n)],
            "usage": usage}


def label_logprobs(ranked: list[tuple[str, float]], top: int) -> dict:
    """OpenAI's ``choice.logprobs`` for a classifier's answer: the winning label as the one token, with the
    ``top`` most probable labels (a probability of 0 reads -9999.0, OpenAI's floor, since JSON has no -inf)."""
    def entry(label: str, p: float) -> dict:
        return {"token": label, "logprob": math.log(p) if p > 0 else -9999.0, "bytes": list(label.encode("utf-8"))}

    return {"content": [{**entry(*ranked[0]), "top_logprobs": [entry(*lp) for lp in ranked[:top]]}], "refusal": None}


async def _chunks(answer: str, logprobs: dict | None, body, cid: str, created: int, usage: dict):
    def chunk(choices: list[dict], extra: dict | None = None) -> str:
        doc = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
               "choices": choices, **(extra or {})}
        return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"

    for i in range(body.n):  # the answer is one delta, so its logprobs ride on it
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": answer}, "finish_reason": None,
                      "logprobs": logprobs}])
        yield chunk([{"index": i, "delta": {}, "finish_reason": "stop", "logprobs": None}])
    if body.include_usage:
        yield chunk([], {"usage": usage})
    yield "data: [DONE]\n\n"
