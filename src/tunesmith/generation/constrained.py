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
import hashlib
import json
import threading
from collections import OrderedDict

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
    def bound(node: dict) -> None:
        if node.get("type") == "string":
            node.setdefault("maxLength", max_chars)
        if node.get("type") == "object":
            node.setdefault("additionalProperties", False)  # no invented keys eating the token budget
        if node.get("type") == "array" and max_items:
            node.setdefault("maxItems", max_items)

    doc = copy.deepcopy(doc)
    _each_node(doc, bound)
    return doc


def _each_node(doc, fn) -> None:
    """Call ``fn`` on every JSON object inside ``doc`` (the schema's nodes, and any object among its values)."""
    if isinstance(doc, dict):
        fn(doc)
        for v in doc.values():
            _each_node(v, fn)
    elif isinstance(doc, list):
        for v in doc:
            _each_node(v, fn)


# --- the JSON Schema subset an answer may be constrained to ------------------------------------------------

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id", "deprecated",
                         "readOnly", "writeOnly"})
# OpenAI's structured outputs in strict mode: objects (every property required, additionalProperties false), arrays,
# enums and consts, anyOf, $defs/$ref (recursion included), string/number/integer/boolean/null and type lists
STRICT_KEYWORDS = ANNOTATIONS | {"type", "properties", "required", "additionalProperties", "items", "enum", "const",
                                 "anyOf", "$ref", "$defs", "definitions", "pattern", "format", "multipleOf", "maximum",
                                 "exclusiveMaximum", "minimum", "exclusiveMinimum", "minItems", "maxItems"}
# without strict: what the decoder (llguidance) also enforces
LOOSE_KEYWORDS = STRICT_KEYWORDS | {"minLength", "maxLength", "prefixItems", "oneOf", "allOf", "minProperties",
                                    "maxProperties", "patternProperties", "discriminator"}
STRICT_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"})
TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


class SchemaRefused(ValueError):
    """A schema an answer cannot be constrained to: ``keyword`` at ``path`` (a JSON pointer into the schema)."""

    def __init__(self, keyword: str, path: str, why: str):
        super().__init__(f"'{keyword}' at '{path}' {why}")
        self.keyword, self.path = keyword, path


def check_output_schema(schema, strict: bool) -> None:
    """Refuse (:class:`SchemaRefused`, naming the keyword and its path) a schema outside the subset: with
    ``strict`` OpenAI's strict-mode rules (the root an object, every object closed with all its properties
    required, formats from its list); without, any keyword the decoder enforces. A keyword that would be
    ignored is refused too: an answer is never said to follow a schema it was not held to."""
    if not isinstance(schema, dict):
        raise SchemaRefused("schema", "#", "must be a JSON object (a JSON Schema document)")
    if strict and (schema.get("type") != "object" or "anyOf" in schema):
        raise SchemaRefused("type", "#", "must be 'object' at the root in strict mode (not anyOf)")
    allowed = STRICT_KEYWORDS if strict else LOOSE_KEYWORDS

    def walk(node, path: str) -> None:
        if isinstance(node, bool) and path.endswith(("/items", "/additionalProperties")):
            return
        if not isinstance(node, dict):
            raise SchemaRefused(path.rsplit("/", 1)[-1], path, "must be a schema (a JSON object)")
        for key in node:
            if key not in allowed:
                mode = "in strict mode" if strict and key in LOOSE_KEYWORDS else "by constrained decoding here"
                raise SchemaRefused(key, path, f"is not supported {mode}")
        _check_node(node, path, strict, schema)
        for key in _SUBSCHEMA_MAPS:
            for name, sub in (node.get(key) or {}).items():
                walk(sub, f"{path}/{key}/{name}")
        for key in _SUBSCHEMA_LISTS:
            for i, sub in enumerate(node.get(key) or []):
                walk(sub, f"{path}/{key}/{i}")
        for key in ("items", "additionalProperties"):
            if key in node and not isinstance(node[key], bool):
                walk(node[key], f"{path}/{key}")

    walk(schema, "#")


def _check_node(node: dict, path: str, strict: bool, root: dict) -> None:
    kinds = node.get("type", [])
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if kind not in TYPES:
            raise SchemaRefused("type", path, f"names '{kind}'; use one of {', '.join(sorted(TYPES))}")
    ref = node.get("$ref")
    if ref is not None and _resolve(root, ref) is None:
        raise SchemaRefused("$ref", path, f"'{ref}' does not point into this schema ('#' or '#/$defs/<name>')")
    if not strict:
        return
    if node.get("format") is not None and node["format"] not in STRICT_FORMATS:
        raise SchemaRefused("format", path, f"'{node['format']}' is not one of {', '.join(sorted(STRICT_FORMATS))}")
    if kinds == "object" or (isinstance(kinds, list) and "object" in kinds) or "properties" in node:
        if node.get("additionalProperties") is not False:
            raise SchemaRefused("additionalProperties", path, "must be false on every object in strict mode")
        missing = [k for k in node.get("properties", {}) if k not in node.get("required", [])]
        if missing:
            raise SchemaRefused("required", path, f"must list every property in strict mode; missing {missing}")


def _resolve(root: dict, ref: str):
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node = root
    for part in [p for p in ref[1:].split("/") if p]:
        node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
        if node is None:
            return None
    return node


def output_schema(schema: dict) -> dict:
    """The constraint an answer decodes under for a ``response_format`` schema: the schema itself, compact, with
    a ``maxLength`` on unbounded strings and objects that list properties closed to them (a narrower schema:
    every answer it allows is valid under the caller's), so that a small model's answer ends."""
    def narrow(node: dict) -> None:
        if "properties" in node and "additionalProperties" not in node and "patternProperties" not in node:
            node["additionalProperties"] = False
        kinds = node.get("type")
        if kinds == "string" or (isinstance(kinds, list) and "string" in kinds):
            node.setdefault("maxLength", MAX_STRING_CHARS)

    doc = copy.deepcopy(schema)
    _each_node(doc, narrow)
    doc["x-guidance"] = COMPACT
    return doc


# a token is at least one byte; a character is at most 6 bytes in a JSON string (an escape such as \u00e9)
BYTES_PER_CHAR = 6


def reply_token_bound(doc: dict) -> int | None:
    """The most tokens a compact reply valid under ``doc`` (from :func:`bounded_schema`) can take, or
    None when it is unbounded (an array without ``maxItems``, a string without ``maxLength``, a number).
    Generation limited to this many tokens is never cut mid-JSON."""
    seen: set[str] = set()

    def size(node) -> int | None:
        if not isinstance(node, dict):
            return None
        if "$ref" in node:
            if node["$ref"] in seen:  # recursive: no bound
                return None
            seen.add(node["$ref"])
            try:
                return size(_resolve(doc, node["$ref"]))
            finally:
                seen.discard(node["$ref"])
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
            if node.get("additionalProperties") is not False:
                return None
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
    """Builds one logits processor per batch that keeps every row inside one grammar: a JSON schema (dict) or
    a Lark grammar in llguidance's syntax (str, e.g. one whose rules embed ``%json {...}``). ``bridge``: the
    tokenizer already converted by :class:`ConstraintCache` (else converted here, about 2 s for 49k tokens)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int], spec: dict | str, bridge=None):
        llg = _llguidance()
        self.llg = llg
        self.tokenizer = bridge or llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
        if isinstance(spec, str):
            self.grammar = llg.LLMatcher.grammar_from_lark(spec)
        else:
            self.grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(spec))
        message = llg.LLMatcher.validate_grammar(self.grammar, self.tokenizer)
        if message:  # an error message, empty when the grammar is fine
            raise ConfigError(f"schema not usable for constrained decoding: {message}")

    def __call__(self, rows: int, prompt_len: int):
        return _MaskProcessor(self.llg, [self.llg.LLMatcher(self.tokenizer, self.grammar) for _ in range(rows)],
                              prompt_len)


class ConstraintCache:
    """The compiled constraints of one tokenizer: its llguidance form built once (the costly part: seconds), each
    schema or grammar compiled once (milliseconds) and kept by its hash, the ``size`` most recent. Thread-safe, so
    that a server compiles off its event loop."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int], size: int = 256):
        self.args = (tokenizer, vocab_size, eos_ids)
        self.size = size
        self.bridge = None
        self.compiled: OrderedDict[str, JsonConstraint] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, spec: dict | str) -> JsonConstraint:
        key = spec_key(spec)
        with self.lock:
            if key in self.compiled:
                self.compiled.move_to_end(key)
                return self.compiled[key]
            if self.bridge is None:
                tokenizer, vocab_size, eos_ids = self.args
                self.bridge = _llguidance().hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
        constraint = JsonConstraint(*self.args, spec, bridge=self.bridge)
        with self.lock:
            self.compiled[key] = constraint
            while len(self.compiled) > self.size:
                self.compiled.popitem(last=False)
        return constraint


def spec_key(spec: dict | str) -> str:
    """A schema's or grammar's hash (the schema's keys in sorted order)."""
    text = spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


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
