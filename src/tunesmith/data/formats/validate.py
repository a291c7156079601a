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

from tunesmith.data.formats.chat import check_example, check_messages, hint
from tunesmith.data.formats.json_lines import NotUTF8, utf8_lines
from tunesmith.errors import DataError

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
    warnings: Counter = field(default_factory=Counter)

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
    """(line number, text) of each non-blank line of the JSON lines file at ``path``, read a line at a time (a file of
    hundreds of MB is never held whole); a DataError for a missing, empty or non-UTF-8 file."""
    if not path.is_file():
        raise DataError(f"File not found: {path}")
    blank = True
    try:
        for lineno, line in utf8_lines(path):
            if line.strip():
                blank = False
                yield lineno, line
    except NotUTF8 as bad:
        raise DataError(f"{path}:{bad.line}: bytes that are not UTF-8; re-save the file as UTF-8") from None
    if blank:
        raise DataError(f"{path}: the file is empty")


def _objects(v: Validation):
    """``(line number, dict)`` for each line of ``v.path``, counting it; a line that is not a JSON
    object is a ``data_type`` error and is not yielded."""
    for lineno, line in read_lines(v.path):
        v.n += 1
        try:
            ex = json.loads(line)
        except json.JSONDecodeError:
            ex = None
        if isinstance(ex, dict):
            yield lineno, ex
        else:
            v.error("data_type", lineno)


def _chat_tokens(messages: list[dict], count_tokens, tools: list[dict] | None = None) -> int:
    """3 per message + the tokens of role, content and name + 1 per name + 3 to prime the reply; tool calls
    and the function definitions count as their JSON text."""
    total = 3 + (count_tokens(json.dumps(tools)) if tools else 0)
    for m in messages:
        total += 3 + sum(count_tokens(str(val)) for k, val in m.items() if k in ("role", "content", "name") and val)
        total += 1 if "name" in m else 0
        total += sum(count_tokens(json.dumps(m[k])) for k in ("tool_calls", "function_call") if m.get(k))
    return total


def _assistant_tokens(messages: list[dict], count_tokens) -> int:
    """Tokens of the trained (weight-1) assistant messages: their text and their calls."""
    return sum(count_tokens(str(m.get("content") or "")) + sum(count_tokens(json.dumps(m[k]))
               for k in ("tool_calls", "function_call") if m.get(k))
               for m in messages if m["role"] == "assistant" and m.get("weight", 1) == 1)


def _tally(v: Validation, messages: list[dict], answers: list[dict], count_tokens, extra: list[dict] = (),
           tools: list[dict] | None = None) -> None:
    """Statistics of one well-formed example: roles and count of ``messages``, tokens of ``messages``
    plus ``extra`` (DPO's two outputs) and ``tools``, assistant tokens of ``answers``."""
    roles = [m["role"] for m in messages]
    v.missing_system += not {"system", "developer"} & set(roles)
    v.missing_user += "user" not in roles
    v.n_messages.append(len(messages))
    v.tokens.append(_chat_tokens(messages + list(extra), count_tokens, tools))
    v.assistant_tokens.append(_assistant_tokens(answers, count_tokens))


def validate_chat(path: Path, count_tokens, limit: int = DEFAULT_LIMIT) -> Validation:
    """Validate an OpenAI chat fine-tuning file (:func:`tunesmith.data.formats.chat.check_example`, every error
    kind of every line); ``count_tokens(str) -> int``."""
    from tunesmith.data.formats.chat import tools_of

    v = Validation(Path(path), limit=limit)
    for lineno, ex in _objects(v):
        errors = check_example(ex)
        for kind in errors:
            v.error(kind, lineno)
        if not errors:
            _tally(v, ex["messages"], ex["messages"], count_tokens, tools=tools_of(ex))
    return v


def validate_dpo(path: Path, count_tokens, limit: int = DEFAULT_LIMIT) -> Validation:
    """OpenAI preference (DPO) format: ``input.messages`` (with ``tools`` beside them, as in chat examples)
    plus one preferred and one non-preferred assistant message, each text or tool calls. Tokens per
    example: the input and both outputs, by the chat rule."""
    from tunesmith.data.formats.chat import function_names, tools_of

    v = Validation(Path(path), limit=limit)
    for lineno, ex in _objects(v):
        inp = ex.get("input")
        errors: list[str] = []
        names = function_names(inp, errors) if isinstance(inp, dict) else None
        messages = inp.get("messages") if isinstance(inp, dict) else None
        errors += check_messages(messages, names, final_calls_open=False)
        outputs = []
        for key in ("preferred_output", "non_preferred_output"):
            out = ex.get(key)
            good = isinstance(out, list) and len(out) == 1 and isinstance(out[0], dict)
            if not good or out[0].get("role") != "assistant" or check_messages(out, names):
                errors.append(f"invalid_{key}")
            else:
                outputs.append(out[0])
        for kind in dict.fromkeys(errors):
            v.error(kind, lineno)
        if not errors:
            _tally(v, messages, outputs, count_tokens, extra=outputs, tools=tools_of(inp))
    return v


def is_prompt_row(row: object) -> bool:
    """A reinforcement row: messages that end before the answer (the model writes it; graders score it)."""
    messages = row.get("messages") if isinstance(row, dict) else None
    return (isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict)
            and messages[-1].get("role") != "assistant")


def validate_reinforcement(path: Path, count_tokens, limit: int = DEFAULT_LIMIT) -> Validation:
    """OpenAI's reinforcement format: ``messages`` (developer/system/user turns, ending before the answer) plus any
    other fields, which graders read as ``{{item.*}}``. Tokens per example: the prompt's, by the chat rule."""
    v = Validation(Path(path), limit=limit)
    for lineno, ex in _objects(v):
        messages = as_system(ex.get("messages"))
        errors = check_messages(messages)
        for kind in errors:
            v.error(kind, lineno)
        ok = not errors
        if ok and messages[-1]["role"] == "assistant":
            v.error("final_message_is_assistant", lineno)
            ok = False
        if ok:
            _tally(v, messages, [], count_tokens)
    return v


def as_system(messages):
    """OpenAI's developer messages as the system messages chat templates know; anything else as it is."""
    if not isinstance(messages, list):
        return messages
    return [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in messages]


def validate_completion(path: Path, count_tokens, limit: int = DEFAULT_LIMIT) -> Validation:
    """Legacy prompt/completion: the keys, an empty completion, and the legacy validator's warnings
    (completions without a leading space, duplicate rows)."""
    v = Validation(Path(path), limit=limit)
    seen: set[tuple] = set()
    for lineno, ex in _objects(v):
        if not all(isinstance(ex.get(k), str) for k in ("prompt", "completion")):
            v.error("missing_key", lineno)
            continue
        if set(ex) - {"prompt", "completion"}:
            v.error("unrecognized_key", lineno)
            continue
        if not ex["completion"].strip():
            v.error("missing_content", lineno)
            continue
        v.warnings["completion does not start with a space"] += not ex["completion"].startswith(" ")
        v.warnings["duplicate rows"] += (ex["prompt"], ex["completion"]) in seen
        seen.add((ex["prompt"], ex["completion"]))
        v.tokens.append(count_tokens(ex["prompt"]) + count_tokens(ex["completion"]))
        v.assistant_tokens.append(count_tokens(ex["completion"]))
    return v


VALIDATORS = {
    "openai-chat": validate_chat,
    "openai-dpo": validate_dpo,
    "openai-completion": validate_completion,
    "openai-reinforcement": validate_reinforcement,
}


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
            "  " + _problem(k, c, v.error_lines[k]) for k, c in sorted(v.errors.items())
        ]
    else:
        lines.append("no format errors")
    lines += [f"{k}: {c}" for k, c in sorted(v.warnings.items())]
    if v.n_messages:  # chat and preference files
        lines += [
            f"examples missing a system message: {v.missing_system}",
            f"examples missing a user message: {v.missing_user}",
            f"messages per example: {_dist(v.n_messages)}",
        ]
    lines += [
        f"tokens per example: {_dist(v.tokens)}",
        f"answer tokens per example (assistant / completion): {_dist(v.assistant_tokens)}",
        f"examples over the {v.limit:,}-token limit (would be truncated): {v.over_limit}",
    ]
    billable = sum(min(v.limit, t) for t in v.tokens)
    n_epochs = epochs or default_epochs(len(v.tokens))
    lines += [
        f"token counts (approximate) use the {tokenizer_name} tokenizer; chat: the cookbook's message rule",
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


def validate_upload(path: Path, count_tokens=None) -> list[str]:
    """Problems that make a fine-tuning upload unusable, as ``kind: N (lines …)`` strings; [] if fine.

    The format (chat, DPO preference or reinforcement prompts) is read from the first JSON line. Used by the server's
    ``POST /v1/files``, with a cheap whitespace token count unless a counter is given. Messages
    name lines, never the server's path of the file.
    """
    count_tokens = count_tokens or (lambda text: len(text.split()))
    first_line = None
    try:
        for _, line in utf8_lines(path):  # the whole file is UTF-8, read a line at a time
            first_line = first_line or (line if line.strip() else None)
    except NotUTF8 as bad:
        return [f"not_utf8: bytes that are not UTF-8 (line {bad.line}); save the file as UTF-8 JSON lines"]
    if first_line is None:
        return ["empty_file: the file has no lines"]
    try:
        first = json.loads(first_line)
    except json.JSONDecodeError:
        first = None
    dpo = isinstance(first, dict) and "preferred_output" in first
    if is_prompt_row(first):  # reinforcement prompts, unless the file is a chat file with a few answers missing
        prompts = upload_problems(validate_reinforcement(Path(path), count_tokens))
        if not prompts:
            return []
    v = (validate_dpo if dpo else validate_chat)(Path(path), count_tokens)
    if v.n == 0 and not v.errors:
        return ["empty_file: the file has no examples"]
    problems = upload_problems(v)
    if is_prompt_row(first):
        problems.append("read as reinforcement prompts (messages that end before the answer): " + "; ".join(prompts))
    return problems


def upload_problems(v: Validation) -> list[str]:
    """Each error kind of ``v`` as an upload's problem (:func:`_problem`), as the server refuses a file with them."""
    return [_problem(kind, n, v.error_lines.get(kind, [])) for kind, n in v.errors.items()]


def _problem(kind: str, n: int, lines: list[int]) -> str:
    """``kind: N (lines …): what to do`` — one upload problem as the client reads it."""
    more = "…" if n > len(lines) else ""
    what = hint(kind)
    return f"{kind}: {n} (lines {', '.join(map(str, lines))}{more})" + (f": {what}" if what else "")


def upload_format(path: Path) -> str:
    """What a (validated) upload trains, read from its first line: 'dpo' (a preference pair), 'reinforcement'
    (a prompt without its answer) or 'supervised'."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                return "dpo" if "preferred_output" in row else "reinforcement" if is_prompt_row(row) else "supervised"
    return "supervised"
