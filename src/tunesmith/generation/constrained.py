"""Schema-constrained decoding for local generation, with llguidance.

At every step the tokens that cannot continue a JSON value valid under the task's pydantic
schema are masked out, and the token limit is raised to the longest reply the bounded schema
allows, so a local model's reply always parses, however many tokens a character takes. llguidance was chosen
by measurement (docs/synth.md, benchmarks/constrained_decoding.py): one 8 MB wheel with no
dependencies, its own Hugging Face tokenizer bridge that works with transformers 5.x, and
compact JSON (no free whitespace for a small model to loop in).
"""

from __future__ import annotations

import copy
import json

from pydantic import BaseModel

from tunesmith.errors import ConfigError

MAX_STRING_CHARS = 400


COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def bounded_schema(schema: type[BaseModel], max_items: int | None = None, max_chars: int = MAX_STRING_CHARS) -> dict:
    """The schema's JSON Schema, compact, with no extra keys, a ``maxLength`` on every string and (when
    given) a ``maxItems`` on every array that has none: a small model otherwise runs on until ``max_tokens``."""
    doc = bound_json_schema(schema.model_json_schema(), max_items, max_chars)
    doc["x-guidance"] = COMPACT
    return doc


def bound_json_schema(doc: dict, max_items: int | None = None, max_chars: int = MAX_STRING_CHARS) -> dict:
    """A copy of a JSON Schema document with the bounds of :func:`bounded_schema` set where it sets none."""
    doc = copy.deepcopy(doc)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "string":
                node.setdefault("maxLength", max_chars)
            if node.get("type") == "object":
                node.setdefault("additionalProperties", False)  # no invented keys eating the token budget
            if node.get("type") == "array" and max_items:
                node.setdefault("maxItems", max_items)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return doc


# a token is at least one byte; a character is at most 6 bytes in a JSON string (an escape such as \u00e9)
BYTES_PER_CHAR = 6


def reply_token_bound(doc: dict) -> int | None:
    """The most tokens a compact reply valid under ``doc`` (from :func:`bounded_schema`) can take, or
    None when it is unbounded (an array without ``maxItems``, a string without ``maxLength``, a number).
    Generation limited to this many tokens is never cut mid-JSON."""
    defs = doc.get("$defs", {})

    def size(node) -> int | None:
        if "$ref" in node:
            return size(defs[node["$ref"].rsplit("/", 1)[-1]])
        if "enum" in node or "const" in node:
            values = node.get("enum", [node.get("const")])
            return max(len(json.dumps(v, ensure_ascii=False).encode()) for v in values)
        kind = node.get("type")
        if kind == "string" and "maxLength" in node:
            return 2 + BYTES_PER_CHAR * node["maxLength"]
        if kind == "boolean":
            return 5
        if kind == "null":
            return 4
        if kind == "array" and "maxItems" in node:
            item = size(node.get("items", {}))
            return None if item is None else 2 + node["maxItems"] * (item + 1)
        if kind == "object":
            total = 2
            for key, sub in node.get("properties", {}).items():
                inner = size(sub)
                if inner is None:
                    return None
                total += len(json.dumps(key).encode()) + 2 + inner
            return total
        for combo in ("anyOf", "oneOf"):
            if combo in node:
                sizes = [size(s) for s in node[combo]]
                return None if None in sizes else max(sizes)
        return None

    return size(doc)


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError as exc:
        raise ConfigError(
            "Schema-constrained local generation needs llguidance: pip install llguidance "
            "(or set synth.constrained: false)."
        ) from exc
    return llguidance


class JsonConstraint:
    """Builds one logits processor per batch that keeps every row inside one JSON schema."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int], schema: dict):
        llg = _llguidance()
        self.llg = llg
        self.tokenizer = llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
        self.grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        message = llg.LLMatcher.validate_grammar(self.grammar, self.tokenizer)
        if message:  # an error message, empty when the grammar is fine
            raise ConfigError(f"JSON schema not usable for constrained decoding: {message}")

    def __call__(self, rows: int, prompt_len: int):
        return _MaskProcessor(self.llg, [self.llg.LLMatcher(self.tokenizer, self.grammar) for _ in range(rows)],
                              prompt_len)


class _MaskProcessor:
    """A transformers logits processor: feed each row's last token to its matcher, then mask."""

    def __init__(self, llg, matchers, prompt_len: int):
        self.llg, self.matchers, self.prompt_len = llg, matchers, prompt_len
        self.mask = None  # allocated on the first call, sized to the model's logits

    def __call__(self, input_ids, scores):
        torch_mod = self.llg.torch
        if self.mask is None:
            self.mask = torch_mod.allocate_token_bitmask(len(self.matchers), scores.shape[-1])
        if input_ids.shape[1] > self.prompt_len:
            for m, tok in zip(self.matchers, input_ids[:, -1].tolist(), strict=True):
                if not m.is_stopped() and not m.is_error():
                    m.consume_token(tok)
        for i, m in enumerate(self.matchers):
            if m.is_error():  # cannot happen under the mask; if it does, leave the row free (the reply fails
                self.mask[i] = -1  # validation and is re-asked) rather than mask every token (NaN when sampling)
            else:
                torch_mod.fill_next_token_bitmask(m, self.mask, i)
        torch_mod.apply_token_bitmask_inplace(scores, self.mask.to(scores.device))
        return scores
