"""Check a JSONL file for OpenAI's hosted fine-tuning the way OpenAI's data-preparation cookbook does.

Format errors are counted by kind (the cookbook's keys), examples missing a system or user
message are counted, token counts follow the cookbook's rule (3 per message, +1 per ``name``,
+3 to prime the reply) and examples over the model's limit are flagged. The cost estimate
uses the cookbook's epoch rule: billable = sum(min(limit, tokens)), charged ≈ epochs × billable.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunesmith.errors import DataError

ALLOWED_KEYS = {"role", "content", "name", "function_call", "weight"}
ROLES = {"system", "user", "assistant", "function"}
# Training-example token limits from OpenAI's fine-tuning guide; pass --max-tokens for other models.
MODEL_LIMITS = {"gpt-3.5-turbo": 16_385, "gpt-4o-mini": 65_536, "gpt-4o": 65_536}
DEFAULT_LIMIT = 16_385  # the cookbook's value since openai-cookbook PR 1413


@dataclass
class Validation:
    path: Path
    n: int = 0
    errors: Counter = field(default_factory=Counter)
    error_lines: dict = field(default_factory=dict)  # kind -> first few line numbers
    missing_system: int = 0
    missing_user: int = 0
    n_messages: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    assistant_tokens: list[int] = field(default_factory=list)
    limit: int = DEFAULT_LIMIT

    @property
    def over_limit(self) -> int:
        return sum(t > self.limit for t in self.tokens)

    def error(self, kind: str, line: int) -> None:
        self.errors[kind] += 1
        self.error_lines.setdefault(kind, [])
        if len(self.error_lines[kind]) < 5:
            self.error_lines[kind].append(line)


def default_epochs(n: int, target: int = 3, min_examples: int = 100, max_examples: int = 25_000) -> int:
    """The cookbook's rule for the default number of epochs."""
    if n == 0:
        return target
    if n * target < min_examples:
        return min(25, min_examples // n)
    if n * target > max_examples:
        return max(1, max_examples // n)
    return target


def read_lines(path: Path):
    if not path.is_file():
        raise DataError(f"File not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8; re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield lineno, line


def validate_chat(path: Path, count_tokens, limit: int = DEFAULT_LIMIT) -> Validation:
    """Validate an OpenAI chat fine-tuning file; ``count_tokens(str) -> int``."""
    v = Validation(Path(path), limit=limit)
    for lineno, line in read_lines(v.path):
        v.n += 1
        try:
            ex = json.loads(line)
        except json.JSONDecodeError:
            v.error("data_type", lineno)
            continue
        if not isinstance(ex, dict):
            v.error("data_type", lineno)
            continue
        messages = ex.get("messages")
        if not isinstance(messages, list) or not messages:
            v.error("missing_messages_list", lineno)
            continue
        bad = False
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                v.error("message_missing_key", lineno)
                bad = True
                continue
            if set(m) - ALLOWED_KEYS:
                v.error("message_unrecognized_key", lineno)
                bad = True
            if m["role"] not in ROLES:
                v.error("unrecognized_role", lineno)
                bad = True
            content = m.get("content")
            if (not isinstance(content, str) or not content) and not m.get("function_call"):
                v.error("missing_content", lineno)
                bad = True
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            v.error("example_missing_assistant_message", lineno)
            bad = True
        if bad:
            continue
        roles = [m["role"] for m in messages]
        v.missing_system += "system" not in roles
        v.missing_user += "user" not in roles
        v.n_messages.append(len(messages))
        total = 3
        for m in messages:
            total += 3 + sum(
                count_tokens(str(val)) for k, val in m.items() if k in ("role", "content", "name")
            )
            total += 1 if "name" in m else 0
        v.tokens.append(total)
        v.assistant_tokens.append(
            sum(count_tokens(m["content"]) for m in messages if m["role"] == "assistant")
        )
    return v


def _dist(values: list[int]) -> str:
    if not values:
        return "–"
    a = np.asarray(values)
    return (
        f"min {a.min():,}, max {a.max():,}, mean {a.mean():,.1f}, median {np.median(a):,.0f}, "
        f"p10 {np.quantile(a, 0.1):,.0f}, p90 {np.quantile(a, 0.9):,.0f}"
    )


def render(v: Validation, price_per_million: float | None, epochs: int | None, tokenizer_name: str) -> str:
    """A plain-text report: errors by kind, warnings, distributions, token totals and cost."""
    lines = [f"{v.path}: {v.n:,} examples"]
    if v.errors:
        lines.append("format errors:")
        lines += [
            f"  {k}: {c} (lines {', '.join(map(str, v.error_lines[k]))}{'…' if c > 5 else ''})"
            for k, c in sorted(v.errors.items())
        ]
    else:
        lines.append("no format errors")
    lines += [
        f"examples missing a system message: {v.missing_system}",
        f"examples missing a user message: {v.missing_user}",
        f"messages per example: {_dist(v.n_messages)}",
        f"tokens per example: {_dist(v.tokens)}",
        f"assistant tokens per example: {_dist(v.assistant_tokens)}",
        f"examples over the {v.limit:,}-token limit (would be truncated): {v.over_limit}",
    ]
    billable = sum(min(v.limit, t) for t in v.tokens)
    n_epochs = epochs or default_epochs(len(v.tokens))
    lines += [
        f"token counts use the {tokenizer_name} tokenizer and the cookbook's per-message rule (approximate)",
        f"billable tokens per epoch: {billable:,}",
        f"epochs: {n_epochs}" + ("" if epochs else " (cookbook default)"),
        f"tokens charged for training: ~{n_epochs * billable:,}",
    ]
    if price_per_million is not None:
        lines.append(
            f"estimated cost: ~${n_epochs * billable * price_per_million / 1e6:,.2f} "
            f"at ${price_per_million}/1M training tokens"
        )
    return "\n".join(lines)


def token_counter(name: str):
    """``count(text) -> int`` with a Hugging Face tokenizer (name or folder) or tiktoken's cl100k_base."""
    if name in ("cl100k_base", "o200k_base"):
        try:
            import tiktoken

            enc = tiktoken.get_encoding(name)
        except Exception as exc:  # not installed, or its BPE file cannot be downloaded
            raise DataError(
                f"tiktoken encoding '{name}' is unavailable ({type(exc).__name__}); "
                "install tiktoken with network access once, or use --tokenizer MODEL"
            ) from None
        return lambda text: len(enc.encode(text, disallowed_special=()))
    from tunesmith.models.loading import load_tokenizer

    tok = load_tokenizer(name)
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
