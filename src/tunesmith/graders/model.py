"""``score_model`` and ``label_model`` graders: the grader's messages, rendered for each row, asked of a model.

The model is reached through a :class:`ChatBackend`: a local model run by the project's generation engine
(:class:`LocalBackend`), any OpenAI-compatible endpoint (:class:`EndpointBackend`), or the server's own
engine (the API supplies that one). One batch of rows is one ``chat_many`` call, so a local model answers
them in one continuous batch.

A score model is told to reply with a number in the grader's ``range`` (default [0, 1]) and may answer
``{"result": x}`` (OpenAI's structured form) or plain text whose first number is taken; a label model is
told the labels and must name exactly one. Anything else is a parse error for that row (reward 0).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tunesmith.graders import template
from tunesmith.scoring.metrics import parse_label

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class ModelReply:
    text: str | None
    error: str | None = None  # the call failed (server error)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ChatBackend(Protocol):
    def chat_many(self, model: str, conversations: Sequence[list[dict]], sampling: dict) -> list[ModelReply]: ...


class LocalBackend:
    """A local causal LM (embedded name, folder or HF id) answering through the continuous-batching engine, or,
    when generation goes to an engine that serves this model (a job on tunesmith serve's vLLM), there."""

    def __init__(self, name: str, max_tokens: int = 64, batch_size: int = 16):
        self.name, self.max_tokens, self.batch_size = name, max_tokens, batch_size
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            from tunesmith.generation import remote
            from tunesmith.machine.placement import pick_placement
            from tunesmith.models.loading import load_model, load_tokenizer

            server = remote.engine_for("eval")
            load = lambda: load_model(self.name, pick_placement())  # noqa: E731
            served = server is not None and self.name in server.served_models()
            self._loaded = (remote.RemoteModel(server, self.name, load) if served else load()), load_tokenizer(self.name)
        return self._loaded

    def chat_many(self, model: str, conversations: Sequence[list[dict]], sampling: dict) -> list[ModelReply]:
        from tunesmith.generation import generate

        lm, tok = self._load()
        prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        rows = generate(lm, tok, prompts, sampling.get("max_completions_tokens") or self.max_tokens, self.batch_size,
                        temperature=sampling.get("temperature") or 0.0, top_p=sampling.get("top_p") or 1.0,
                        seed=sampling.get("seed"))
        return [ModelReply(r.texts[0], None, r.prompt_tokens, r.completion_tokens) for r in rows]


class EndpointBackend:
    """An OpenAI-compatible endpoint (``eval.endpoints`` entry): greedy replies with the client's retries."""

    def __init__(self, spec, max_tokens: int = 64):
        from tunesmith.clients.endpoint import EndpointClient

        self.client, self.max_tokens = EndpointClient(spec), max_tokens

    def chat_many(self, model: str, conversations: Sequence[list[dict]], sampling: dict) -> list[ModelReply]:
        replies = self.client.chat_many(conversations, sampling.get("max_completions_tokens") or self.max_tokens)
        return [ModelReply(r.text, r.error) for r in replies]


def content_text(content) -> str:
    """A message's content as text: a string, or the text of its parts (images and audio are refused at check)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    return "\n".join(content_text(part) for part in content or [])


def conversation(grader: dict, sample: dict, item: dict) -> list[dict]:
    """The grader's messages rendered for one row, plus the answer-format instruction."""
    messages = [{"role": "system" if m.get("role") == "developer" else m.get("role", "user"),
                 "content": template.render(content_text(m.get("content")), sample, item)}
                for m in grader["input"]]
    if grader["type"] == "score_model":
        low, high = grader.get("range") or (0, 1)
        rule = f"Reply with only the score, a number from {low:g} to {high:g}."
    else:
        rule = "Reply with exactly one of these labels and nothing else: " + ", ".join(grader["labels"]) + "."
    return [*messages, {"role": "user", "content": rule}]


def parse_score(text: str, grader: dict) -> float | None:
    """The score in the reply (``{"result": x}`` or the first number), None when absent or out of range."""
    value = None
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and isinstance(doc.get("result"), int | float):
            value = float(doc["result"])
    except ValueError:
        pass
    if value is None:
        found = NUMBER.search(text)
        value = float(found.group()) if found else None
    low, high = grader.get("range") or (0, 1)
    return value if value is not None and low <= value <= high else None


def parse_model_label(text: str, labels: Sequence[str]) -> str | None:
    """The label the reply names: exactly, or as the only label mentioned among its words."""
    exact = parse_label(text, labels)
    if exact is not None:
        return exact
    found = [lab for lab in labels if re.search(rf"(?<!\w){re.escape(lab)}(?!\w)", text, flags=re.IGNORECASE)]
    return found[0] if len(found) == 1 else None


def reward_of(grader: dict, text: str) -> tuple[float | None, object]:
    """(reward or None when unreadable, what was read: the score or the label)."""
    if grader["type"] == "score_model":
        score = parse_score(text, grader)
        return score, score
    label = parse_model_label(text, grader["labels"])
    return (None if label is None else float(label in grader["passing_labels"])), label
