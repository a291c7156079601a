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
from tunesmith.generation.schemas import resolve

MAX_STRING_CHARS = 400
# numbers are bounded as strings are: at most this many digits before the point and after it (a greedy small model
# otherwise writes 1.1111111111111111211... until max_tokens)
MAX_INTEGER_DIGITS = 15  # up to 999,999,999,999,999: every such integer is exact in a double
MAX_FRACTION_DIGITS = 6
MAX_NUMBER = 10**MAX_INTEGER_DIGITS - 1
NUMBER_STEP = 10.0**-MAX_FRACTION_DIGITS  # as multipleOf: at most MAX_FRACTION_DIGITS digits after the point
ANY_VALUE = "tunesmith-any-value"  # the $defs entry of a bounded "any JSON value"


COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def bounded_schema(schema: type[BaseModel], max_items: int | None = None, max_chars: int = MAX_STRING_CHARS) -> dict:
    """The schema's JSON Schema, compact, with no extra keys, a ``maxLength`` on every string, a digit cap on every
    number (:func:`bound_number`) and (when given) a ``maxItems`` on every array that has none: a small model
    otherwise runs on until ``max_tokens``."""
    doc = bound_json_schema(schema.model_json_schema(), max_items, max_chars)
    doc["x-guidance"] = COMPACT
    return doc


def bound_json_schema(doc: dict, max_items: int | None = None, max_chars: int = MAX_STRING_CHARS) -> dict:
    """A copy of a JSON Schema document with the bounds of :func:`bounded_schema` set where it sets none."""
    from tunesmith.generation.schemas import schema_nodes

    doc = copy.deepcopy(doc)
    for node in schema_nodes(doc):
        if node.get("type") == "string":
            node.setdefault("maxLength", max_chars)
        if node.get("type") == "object":
            node.setdefault("additionalProperties", False)  # no invented keys eating the token budget
        if node.get("type") == "array" and max_items:
            node.setdefault("maxItems", max_items)
        if node.get("type") in ("number", "integer"):
            bound_number(node)
    return doc


def _kinds(node: dict) -> set[str] | None:
    """The types ``node`` allows, or None when it says nothing of type (a bare node: any type its keywords allow)."""
    kinds = node.get("type")
    if kinds is None:
        return None
    return {kinds} if isinstance(kinds, str) else {k for k in kinds if isinstance(k, str)}


def _bare(node: dict) -> bool:
    """A node without ``type`` whose value is not decided elsewhere (a reference, a combinator, an enum or const):
    it allows strings and numbers, which are then bounded at the node itself."""
    return "type" not in node and not {"$ref", "anyOf", "oneOf", "allOf", "enum", "const"} & set(node)


def bound_number(node: dict) -> None:
    """Cap the digits of the numbers ``node`` allows where its own bounds do not: a ``minimum`` and ``maximum`` of
    ±(10^15 - 1) (at most 15 digits before the point; exponents then are not written) and, where it may be a
    non-integer, a ``multipleOf`` of 10^-6 (at most 6 after it) on the numbers from 0 up. A narrower schema: every
    number it allows is valid under the caller's. A side whose bound would leave no number (a caller's minimum past
    the cap) stays the caller's, and so does a ``multipleOf`` the caller set. Negative numbers keep their fraction
    free: vLLM's llguidance (1.7) admits no negative number under any ``multipleOf``, and both engines decode under
    the same constraint."""
    def number(key: str):
        value = node.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    low = [v for v in (number("minimum"), number("exclusiveMinimum")) if v is not None]
    high = [v for v in (number("maximum"), number("exclusiveMaximum")) if v is not None]
    if not low and all(v >= -MAX_NUMBER for v in high):
        node["minimum"] = -MAX_NUMBER
        low = [-MAX_NUMBER]
    if not high and all(v <= MAX_NUMBER for v in low):
        node["maximum"] = MAX_NUMBER
        high = [MAX_NUMBER]
    kinds = _kinds(node)
    fractional = kinds is None or "number" in kinds
    if not fractional or "multipleOf" in node or (low and high and min(high) - max(low) < 2 * NUMBER_STEP):
        return
    if max(low) >= 0:
        node["multipleOf"] = NUMBER_STEP
    elif min(high) > 0 and "anyOf" not in node:
        node["anyOf"] = [{"minimum": 0, "multipleOf": NUMBER_STEP}, {"exclusiveMaximum": 0}]


def number_chars(node: dict) -> int | None:
    """The most characters a number under ``node`` takes (a sign, the digits, the point), or None when its digits
    are not bounded (no range, or a non-integer without ``multipleOf``)."""
    from decimal import Decimal, InvalidOperation

    bounds = [node.get(k) for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")]
    low = [v for v in bounds[:2] if isinstance(v, (int, float)) and not isinstance(v, bool)]
    high = [v for v in bounds[2:] if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not low or not high:
        return None
    digits = len(str(int(max(abs(max(low)), abs(min(high)), 1))))
    if _kinds(node) == {"integer"}:
        return 1 + digits
    step = node.get("multipleOf")
    try:
        exponent = Decimal(repr(step)).as_tuple().exponent if isinstance(step, (int, float)) else None
    except InvalidOperation:
        exponent = None
    if not isinstance(exponent, int):
        return None
    return 1 + digits + (1 - exponent if exponent < 0 else 0)


def output_schema(schema: dict) -> dict:
    """The constraint an answer decodes under for a ``response_format`` schema (:func:`tunesmith.generation.schemas.
    served_schema`'s: references local): the schema itself, compact, narrowed so that a small model's answer ends
    (every answer it allows is valid under the caller's). Wherever a string may be, a ``maxLength`` where none is
    set (400 characters, or the string's ``minLength`` when longer); wherever a number may be, a digit cap
    (:func:`bound_number`); objects that list properties closed to them; an object that lists none, and an array
    without ``items``, hold bounded values (strings and numbers capped as above, at every depth). An object is
    closed (or its values bounded) only where that cannot make it unsatisfiable: not one that ``allOf`` composes (a
    branch, or what a branch refers to), not one beside ``$ref`` or a combinator, not one whose ``required`` names a
    property it does not list. A ``format`` the decoder does not know is an annotation (as the specification says)
    and is left out of the constraint."""
    from tunesmith.generation.schemas import DECODER_FORMATS, composed_nodes, schema_nodes

    doc = copy.deepcopy(schema)
    composed = composed_nodes(doc)
    # a bounded "any value" where the schema leaves values open; not where $defs is no map to hold it
    any_value = {"$ref": f"#/$defs/{ANY_VALUE}"} if isinstance(doc.setdefault("$defs", {}), dict) else None
    for node in schema_nodes(doc):
        kinds, free = _kinds(node), id(node) not in composed and not {"allOf", "anyOf", "oneOf", "$ref"} & set(node)
        if ("properties" in node and isinstance(node["properties"], dict) and "additionalProperties" not in node
                and "patternProperties" not in node and free
                and set(node.get("required") or []) <= set(node["properties"])):
            node["additionalProperties"] = False
        elif ((kinds == {"object"} or (kinds is None and _bare(node))) and free and any_value
              and not {"properties", "patternProperties", "additionalProperties"} & set(node)):
            node["additionalProperties"] = any_value
        if ((kinds == {"array"} or (kinds is None and _bare(node))) and free and any_value
                and not {"items", "prefixItems", "additionalItems"} & set(node)):
            node["items"] = any_value
        if (kinds is None and _bare(node)) or (kinds is not None and "string" in kinds):
            minimum = node.get("minLength") if isinstance(node.get("minLength"), int) else 0
            node.setdefault("maxLength", max(MAX_STRING_CHARS, minimum))  # a longer minLength is the caller's
        if (kinds is None and _bare(node)) or (kinds is not None and {"number", "integer"} & kinds):
            bound_number(node)
        if isinstance(node.get("format"), str) and node["format"] not in DECODER_FORMATS:
            del node["format"]
    if any_value and any_value in _uses(doc):
        bounded = {"maxLength": MAX_STRING_CHARS, "items": any_value, "additionalProperties": any_value}
        bound_number(bounded)
        doc["$defs"][ANY_VALUE] = bounded
    if doc.get("$defs") == {}:
        del doc["$defs"]
    doc["x-guidance"] = COMPACT
    return doc


def _uses(doc: dict) -> list:
    """The ``items`` and ``additionalProperties`` of every subschema of ``doc``."""
    from tunesmith.generation.schemas import schema_nodes

    return [node.get(key) for node in schema_nodes(doc) for key in ("items", "additionalProperties")]


class Grammar(str):
    """A Lark grammar (llguidance's syntax, as both engines take it) that knows the most tokens an answer under it
    takes (``token_bound``; None: unbounded), as :func:`reply_token_bound` knows a schema's."""

    token_bound: int | None

    def __new__(cls, text: str, token_bound: int | None = None):
        grammar = super().__new__(cls, text)
        grammar.token_bound = token_bound
        return grammar


# a token is at least one byte; a character is at most 6 bytes in a JSON string (an escape such as \u00e9)
BYTES_PER_CHAR = 6


class _Unbounded(Exception):
    """Raised inside :func:`reply_token_bound` as soon as any part of the reply has no bound."""


def reply_token_bound(doc: dict) -> int | None:
    """The most tokens a compact reply valid under ``doc`` (from :func:`bounded_schema`) can take, or
    None when it is unbounded (an array without ``maxItems``, a string without ``maxLength``, a number without a
    range, a recursive ``$ref``). Generation limited to this many tokens is never cut mid-JSON. Each ``$ref`` is sized
    once (a schema whose ``$defs`` form a DAG costs its size, not its number of paths)."""
    sized: dict[str, int] = {}
    open_refs: set[str] = set()

    def size(node) -> int:
        if not isinstance(node, dict):
            raise _Unbounded
        if "$ref" in node:
            ref = node["$ref"]
            if ref in sized:
                return sized[ref]
            if ref in open_refs:  # recursive: no bound
                raise _Unbounded
            open_refs.add(ref)
            sized[ref] = size(resolve(doc, ref))
            open_refs.discard(ref)
            return sized[ref]
        if "enum" in node or "const" in node:
            values = node.get("enum", [node.get("const")])
            return max(len(json.dumps(v, ensure_ascii=False).encode()) for v in values)
        kind = node.get("type")
        if kind == "string" and "maxLength" in node:
            return 2 + BYTES_PER_CHAR * node["maxLength"]
        if kind in ("number", "integer") and (chars := number_chars(node)) is not None:
            return chars
        if kind == "boolean":
            return 5
        if kind == "null":
            return 4
        if kind == "array" and "maxItems" in node:
            return 2 + node["maxItems"] * (size(node.get("items", {})) + 1)
        if kind == "object":
            if node.get("additionalProperties") is not False:
                raise _Unbounded
            return 2 + sum(len(json.dumps(key).encode()) + 2 + size(sub)
                           for key, sub in node.get("properties", {}).items())
        for combo in ("anyOf", "oneOf"):
            if combo in node:
                return max(size(s) for s in node[combo])
        raise _Unbounded

    try:
        return size(doc)
    except _Unbounded:
        return None


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


class ConstraintBroken(RuntimeError):
    """A row's matcher failed part-way through its answer: the row cannot go on under its constraint."""


class JsonConstraint:
    """Builds one logits processor per batch that keeps every row inside one grammar: a JSON schema (dict) or
    a Lark grammar in llguidance's syntax (str, e.g. one whose rules embed ``%json {...}``). ``bridge``: the
    tokenizer already converted by :class:`ConstraintCache` (else converted here, about 2 s for 49k tokens).

    A grammar llguidance refuses, one with keywords it knows and does not enforce ("Unimplemented keys"), or one
    whose matcher fails at its first step is a :class:`ConfigError` here, before any row decodes under it. With
    ``fail_rows`` a matcher that fails later ends its row (:class:`ConstraintBroken`) instead of leaving it
    unconstrained (what synthesis wants: the reply fails validation and is asked again)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int], spec: dict | str, bridge=None,
                 fail_rows: bool = False):
        llg = _llguidance()
        self.llg, self.fail_rows, self.vocab_size = llg, fail_rows, vocab_size
        self.tokenizer = bridge or llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
        if isinstance(spec, str):
            self.grammar = llg.LLMatcher.grammar_from_lark(spec)
        else:
            self.grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(spec))
        message = llg.LLMatcher.validate_grammar(self.grammar, self.tokenizer)
        if message:  # an error message, empty when the grammar is fine
            raise ConfigError(f"schema not usable for constrained decoding: {message}")
        notes = llg.LLMatcher.validate_grammar_with_warnings(self.grammar, self.tokenizer)[1]
        unenforced = [n for n in notes if n.startswith("Unimplemented keys")]
        if unenforced:
            raise ConfigError(f"schema not usable for constrained decoding: {unenforced[0]} (they would constrain "
                              "the answer and are not enforced)")
        self._check_first_step()

    @property
    def size(self) -> int:
        """What this constraint keeps in memory, roughly: its compiled grammar's text."""
        return len(self.grammar)

    def _check_first_step(self) -> None:
        matcher = self.llg.LLMatcher(self.tokenizer, self.grammar)
        mask = self.llg.torch.allocate_token_bitmask(1, self.vocab_size)
        self.llg.torch.fill_next_token_bitmask(matcher, mask, 0)
        if matcher.is_error():
            raise ConfigError(f"schema not usable for constrained decoding: {matcher.get_error()[:500]}")

    def __call__(self, rows: int, prompt_len: int):
        return _MaskProcessor(self.llg, [self.llg.LLMatcher(self.tokenizer, self.grammar) for _ in range(rows)],
                              prompt_len, self.fail_rows)

    def conforms(self, token_ids: list[int]) -> str | None:
        """None when ``token_ids`` are a whole answer under this constraint, else why not."""
        matcher = self.llg.LLMatcher(self.tokenizer, self.grammar)
        matcher.consume_tokens(token_ids)
        if matcher.is_error():
            return matcher.get_error()[:500]
        return None if matcher.is_accepting() else "the answer ends before the schema allows it to"


MAX_CACHE_BYTES = 64 * 1024 * 1024


class ConstraintCache:
    """The compiled constraints of one tokenizer: its llguidance form built once (the costly part: seconds), each
    schema or grammar compiled once (milliseconds) and kept by its hash, the most recent up to ``max_bytes`` of
    compiled grammars (a client sending large schemas cannot pin the server's memory). Thread-safe, so that a
    server compiles off its event loop. ``fail_rows``: see :class:`JsonConstraint`."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int], max_bytes: int = MAX_CACHE_BYTES,
                 fail_rows: bool = False):
        self.args = (tokenizer, vocab_size, eos_ids)
        self.max_bytes, self.fail_rows = max_bytes, fail_rows
        self.bridge = None
        self.compiled: OrderedDict[str, JsonConstraint] = OrderedDict()
        self.lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return sum(c.size for c in self.compiled.values())

    def prepare(self, background: bool = False) -> None:
        """Convert the tokenizer for llguidance now (about 1.3 s for 49k tokens, holding the GIL), not in the first
        request that asks for a schema: on a server that request would stall every tenant's decoding while it
        runs. ``background``: in a thread of its own (a request that needs it meanwhile waits for it)."""
        if background:
            threading.Thread(target=self.prepare, name="tunesmith-constraints", daemon=True).start()
            return
        with self.lock:
            self._bridge()

    def _bridge(self):
        """The tokenizer in llguidance's form, built once (called under :attr:`lock`)."""
        if self.bridge is None:
            tokenizer, vocab_size, eos_ids = self.args
            self.bridge = _llguidance().hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
        return self.bridge

    def get(self, spec: dict | str) -> JsonConstraint:
        key = spec_key(spec)
        with self.lock:
            if key in self.compiled:
                self.compiled.move_to_end(key)
                return self.compiled[key]
            self._bridge()
        constraint = JsonConstraint(*self.args, spec, bridge=self.bridge, fail_rows=self.fail_rows)
        with self.lock:
            self.compiled[key] = constraint
            total = self.bytes
            while total > self.max_bytes and len(self.compiled) > 1:
                total -= self.compiled.popitem(last=False)[1].size
        return constraint


def spec_key(spec: dict | str) -> str:
    """A schema's or grammar's hash (the schema's keys in sorted order)."""
    text = spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class _MaskProcessor:
    """A transformers logits processor: feed each row's last token to its matcher, then mask."""

    def __init__(self, llg, matchers, prompt_len: int, fail_rows: bool = False):
        self.llg, self.matchers, self.prompt_len, self.fail_rows = llg, matchers, prompt_len, fail_rows
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
            if m.is_error() and self.fail_rows:
                raise ConstraintBroken(f"The answer could not go on under its schema: {m.get_error()[:500]}")
            if m.is_error():  # leave the row free (the reply fails validation and is asked again) rather than mask
                self.mask[i] = -1  # every token (NaN when sampling)
            else:
                torch_mod.fill_next_token_bitmask(m, self.mask, i)
        torch_mod.apply_token_bitmask_inplace(scores, self.mask.to(scores.device))
        return scores
