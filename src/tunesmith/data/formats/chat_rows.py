"""OpenAI chat fine-tuning examples → training rows whose every weight-1 assistant turn is a target.

A conversation trains as one sequence, as OpenAI trains it: the tokens of each assistant message with
weight 1 (the default) — its text and tool calls, and the end-of-turn the template closes it with —
carry a loss; every other token (system, user, tool results, weight-0 assistant turns) is context only
(label -100). Tools and calls are rendered by :mod:`tunesmith.data.formats.tool_format`.

Rows are ``{"messages": [...], "tools": [...] | None}``; TRL-style ``{"prompt", "completion"}`` rows
(the recipe path) are tokenized by :func:`tokenize_example`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.data.formats.chat import check_example, check_messages, hint, tools_of
from tunesmith.data.formats.tool_format import assistant_text, plain_messages, render
from tunesmith.errors import DataError


def conversation_row(ex: dict) -> dict:
    """One (valid) chat example as a training row."""
    return {"messages": ex["messages"], "tools": tools_of(ex)}


def read_chat_file(path: Path, name: str | None = None) -> list[dict]:
    """A chat fine-tuning JSONL file → training rows; the first bad line stops with a DataError that
    names ``name`` (default: the path), the line and OpenAI's error kind."""
    name = name or str(path)
    rows = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError:
            ex = None
        errors = check_example(ex)
        if errors:
            raise DataError(f"{name} line {lineno}: {errors[0]} ({hint(errors[0])})")
        rows.append(conversation_row(ex))
    if not rows:
        raise DataError(f"{name}: no examples")
    return rows


def _trained(messages: list[dict]) -> list[bool]:
    return [m["role"] == "assistant" and m.get("weight", 1) == 1 for m in messages]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversation(row: dict, tokenizer, train_on_inputs: bool = False) -> dict:
    """Token ids of the whole conversation and the mask of target tokens (every weight-1 assistant turn).

    Each turn's span is found by rendering the conversation up to it: the tokens between the prompt
    ending just before it (with the assistant header) and the conversation through it. A template that
    renders a prefix differently once more follows cannot be masked, and says so.
    """
    messages, tools = row["messages"], row.get("tools")
    full = _ids(tokenizer, render(tokenizer, messages, tools))
    mask = [bool(train_on_inputs)] * len(full)
    for i, trained in enumerate(_trained(messages)):
        if not trained:
            continue
        before = _ids(tokenizer, render(tokenizer, messages[:i], tools, add_generation_prompt=True))
        through = _ids(tokenizer, render(tokenizer, messages[: i + 1], tools))
        if full[: len(through)] != through or through[: len(before)] != before:
            raise DataError(
                "the chat template renders a conversation's start differently when more turns follow, so its "
                "assistant turns cannot be masked; use a model whose template is prefix-stable")
        mask[len(before): len(through)] = [True] * (len(through) - len(before))
    return {"input_ids": full, "completion_mask": mask}


def _template_ids(encoded) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a BatchEncoding in transformers 5, a list before."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def tokenize_example(
    prompt: list[dict], completion: list[dict], tokenizer, train_on_inputs: bool = False
) -> dict:
    """Token ids of the whole conversation and a mask of the tokens that carry a loss.

    The completion (the assistant turn with its closing end-of-turn token and whatever the
    template appends after it) is always trained; the prompt only with ``train_on_inputs``.
    """
    prompt_ids = _template_ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
    full_ids = _template_ids(tokenizer.apply_chat_template(prompt + completion, tokenize=True))
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(
            "the chat template renders the prompt differently when the answer follows it, so the prompt "
            "tokens cannot be masked; use a model whose template is prefix-stable or set "
            "train.train_on_inputs: true"
        )
    n_prompt = len(prompt_ids)
    mask = [bool(train_on_inputs)] * n_prompt + [True] * (len(full_ids) - n_prompt)
    return {"input_ids": full_ids, "completion_mask": mask}


def tokenize_rows(rows: list[dict], tokenizer, train_on_inputs: bool = False) -> list[dict]:
    """Conversation rows and prompt/completion rows → tokenized examples (with ``length``)."""
    out = []
    for row in rows:
        if "messages" in row:
            ex = tokenize_conversation(row, tokenizer, train_on_inputs)
        else:
            ex = tokenize_example(row["prompt"], row["completion"], tokenizer, train_on_inputs)
        ex["length"] = len(ex["input_ids"])
        out.append(ex)
    return out


def row_tokens(row: dict, tokenizer) -> int:
    """Tokens of a row's whole chat text (either row form)."""
    if "messages" in row:
        return len(_ids(tokenizer, render(tokenizer, row["messages"], row.get("tools"))))
    return len(_template_ids(tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)))


def last_turn_pair(row: dict) -> dict:
    """A conversation row as the prompt/completion pair of its last trained assistant turn (tools and calls
    in the hermes text form): what a generation evaluation compares with the model's answer."""
    messages = row["messages"]
    last = max(i for i, t in enumerate(_trained(messages)) if t)
    prompt = plain_messages(messages[:last], row.get("tools"))
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": assistant_text(messages[last])}]}


def openai_preference(row: dict) -> tuple:
    """An OpenAI DPO row → (prompt, preferred, non-preferred) messages in the hermes text form (the input's
    tools in the system message, calls as ``<tool_call>`` text). A part that breaks the rules is returned
    as it is, for the caller to report."""
    inp = row.get("input") if isinstance(row.get("input"), dict) else {}

    def plain(messages, tools=None):
        ok = isinstance(messages, list) and not check_messages(messages)
        return plain_messages(messages, tools) if ok else messages

    return (plain(inp.get("messages"), tools_of(inp)), plain(row.get("preferred_output")),
            plain(row.get("non_preferred_output")))
