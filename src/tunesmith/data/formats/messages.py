"""Format examples as chat messages and render them with the model's chat template."""

from __future__ import annotations

from collections.abc import Sequence

from tunesmith.config import DataSection
from tunesmith.records import Example, render_prompt


def chat_messages(example: Example, cfg: DataSection, labels: Sequence[str] | None = None) -> list[dict]:
    """System (unless ``system_prompt`` is null) and user message; ``labels`` appends the label list.

    A fine-tuned model learns the label set from its data, so the list is only worth its tokens
    for a model that has not seen it (the base model).
    """
    user = render_prompt(example, cfg.prompt)
    if labels:
        user += "\n\nAnswer with exactly one of these labels: " + ", ".join(labels) + "."
    messages = [{"role": "user", "content": user}]
    if cfg.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The prompt string up to and including the assistant turn's header."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn(tokenizer) -> str:
    """The text the chat template puts right after an assistant message (e.g. ``<|im_end|>``).

    Label scoring appends it to each label so that 'card' is not preferred over 'card_arrival'
    merely for being a prefix.
    """
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\x00"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    after = text.split("\x00", 1)[1]
    eos = tokenizer.eos_token or ""
    if eos and eos in after:
        return after[: after.index(eos) + len(eos)]
    return after.rstrip("\n") or eos
