"""What a caller's JSON schema may be before anything compiles it: its cost bounded, the keywords it may use.

A schema reaches the engines that every caller shares, so it is checked first, in one pass with an explicit
stack (no recursion, whatever its depth): its size, nesting depth and number of nodes, and the ``min*`` keywords
that would ask for more than any answer here can hold (:func:`check_schema_cost`). Then its keywords
(:func:`check_output_schema`): in strict mode OpenAI's subset; otherwise every keyword the decoder (llguidance)
enforces is served, a keyword that would constrain an answer but is not enforced (``not``, ``if``,
``dependencies``…) is a 400 naming it and its path, and any other keyword is an annotation and ignored, as the JSON
Schema specification says (``id``, ``x-*``, ``markdownDescription``, a misspelt ``decription``); boolean
subschemas are schemas. A ``$ref`` recursion that no finite answer can end (a required property, or a non-empty
array, on every way round) is refused too: decoding it would never finish.
"""

from __future__ import annotations

import json

# what one schema may cost (a tenant's schema reaches state every caller shares)
MAX_SCHEMA_BYTES = 256 * 1024  # serialized, as JSON
MAX_SCHEMA_DEPTH = 64  # JSON nesting levels of the schema document
MAX_SCHEMA_NODES = 20_000  # objects and arrays in the schema document
MAX_MINIMUM = 4096  # minItems, minLength, minProperties: no answer here can hold more

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id", "deprecated",
                         "readOnly", "writeOnly"})
# OpenAI's structured outputs in strict mode: objects (every property required, additionalProperties false), arrays,
# enums and consts, anyOf, $defs/$ref (recursion included), string/number/integer/boolean/null and type lists
STRICT_KEYWORDS = ANNOTATIONS | {"type", "properties", "required", "additionalProperties", "items", "enum", "const",
                                 "anyOf", "$ref", "$defs", "definitions", "pattern", "format", "multipleOf", "maximum",
                                 "exclusiveMaximum", "minimum", "exclusiveMinimum", "minItems", "maxItems"}
# keywords that would constrain an answer and that the decoder does not enforce: refused, never ignored
UNENFORCED = frozenset({"not", "if", "then", "else", "dependencies", "dependentRequired", "dependentSchemas",
                        "contains", "minContains", "maxContains", "unevaluatedProperties", "unevaluatedItems",
                        "propertyNames", "$dynamicRef", "$recursiveRef"})
SERVED_ONLY_AT = {"uniqueItems": False}  # served at this value only (it then asks nothing)
STRICT_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"})
DECODER_FORMATS = STRICT_FORMATS | {"uri"}  # the formats llguidance enforces; any other is an annotation
TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "additionalItems")
_MINIMUMS = ("minItems", "minLength", "minProperties")


class SchemaRefused(ValueError):
    """A schema an answer cannot be constrained to: ``keyword`` at ``path`` (a JSON pointer into the schema)."""

    def __init__(self, keyword: str, path: str, why: str):
        super().__init__(f"'{keyword}' at '{path}' {why}")
        self.keyword, self.path = keyword, path


def check_schema_cost(schema) -> None:
    """Refuse a schema whose size, depth or node count passes this server's bounds, or whose ``min*`` keyword
    asks for more than any answer can hold, naming the keyword and its path. One pass, no recursion."""
    stack, nodes = [(schema, "#", 1)], 0
    while stack:
        node, path, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise SchemaRefused("schema", "#", f"has more than {MAX_SCHEMA_NODES:,} objects and arrays; this server "
                                "compiles smaller schemas")
        if depth > MAX_SCHEMA_DEPTH:
            raise SchemaRefused(path.rsplit("/", 1)[-1], path, f"nests deeper than {MAX_SCHEMA_DEPTH} levels, "
                                "this server's bound")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(node, dict) and key in _MINIMUMS and isinstance(value, int) and value > MAX_MINIMUM:
                raise SchemaRefused(key, path, f"is {value:,}; no answer here holds more than {MAX_MINIMUM:,} "
                                    "(items, characters or properties)")
            if isinstance(value, (dict, list)):
                stack.append((value, f"{path}/{_escape(str(key))}", depth + 1))
    size = len(json.dumps(schema, ensure_ascii=False).encode())  # after the depth check: json recurses
    if size > MAX_SCHEMA_BYTES:
        raise SchemaRefused("schema", "#", f"is {size:,} bytes; this server compiles schemas of up to "
                            f"{MAX_SCHEMA_BYTES:,} bytes")


def check_output_schema(schema, strict: bool) -> list[str]:
    """Refuse (:class:`SchemaRefused`, naming the keyword and its path) a schema outside what is served: with
    ``strict`` OpenAI's strict-mode rules (the root an object, every object closed with all its properties
    required, formats from its list); without, a keyword that would constrain and is not enforced. Returns the
    keywords ignored as annotations (``keyword at path``), so that the answer can say which."""
    if not isinstance(schema, dict):
        raise SchemaRefused("schema", "#", "must be a JSON object (a JSON Schema document)")
    check_schema_cost(schema)
    if strict and (schema.get("type") != "object" or "anyOf" in schema):
        raise SchemaRefused("type", "#", "must be 'object' at the root in strict mode (not anyOf)")
    ignored: list[str] = []
    stack = [(schema, "#")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, bool) and not strict:
            continue  # true: any value; false: none
        if isinstance(node, bool) and path.endswith(("/items", "/additionalProperties")):
            continue
        if not isinstance(node, dict):
            raise SchemaRefused(path.rsplit("/", 1)[-1], path, "must be a schema (a JSON object)")
        ignored += _check_keywords(node, path, strict)
        _check_node(node, path, strict, schema)
        stack += reversed(list(_subschemas(node, path)))
    if not strict:
        _check_finite(schema)
    return ignored


def _check_keywords(node: dict, path: str, strict: bool) -> list[str]:
    ignored = []
    for key, value in node.items():
        if strict and key not in STRICT_KEYWORDS:
            raise SchemaRefused(key, path, "is not supported in strict mode")
        if key in UNENFORCED:
            raise SchemaRefused(key, path, "would constrain the answer and is not enforced by constrained "
                                "decoding here; remove it or enforce it after the answer")
        if key in SERVED_ONLY_AT and value != SERVED_ONLY_AT[key]:
            raise SchemaRefused(key, path, f"is served only as {json.dumps(SERVED_ONLY_AT[key])} here (it would "
                                "constrain the answer and is not enforced)")
        if not strict and key not in ENFORCED and key not in ANNOTATIONS:
            ignored.append(f"{key} at {path}")
        if not strict and key == "format" and isinstance(value, str) and value not in DECODER_FORMATS:
            ignored.append(f"format '{value}' at {path}")
    return ignored


# keywords the decoder enforces without strict mode (the rest that are not refused are annotations)
ENFORCED = STRICT_KEYWORDS | {"minLength", "maxLength", "prefixItems", "oneOf", "allOf", "minProperties",
                              "maxProperties", "patternProperties", "additionalItems", "discriminator",
                              "uniqueItems"} - ANNOTATIONS


def _subschemas(node: dict, path: str):
    """(subschema, its path) for every place a schema may hold one (lists, maps and single subschemas)."""
    for key in _SUBSCHEMA_MAPS:
        for name, sub in (node.get(key) or {}).items() if isinstance(node.get(key), dict) else ():
            yield sub, f"{path}/{key}/{_escape(name)}"
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(node.get(key) or []):
            yield sub, f"{path}/{key}/{i}"
    for key in _SUBSCHEMA_ONE:
        if key in node:
            value = node[key]
            if isinstance(value, list):  # draft-04 tuple items
                yield from ((sub, f"{path}/{key}/{i}") for i, sub in enumerate(value))
            else:
                yield value, f"{path}/{key}"


def located(schema: dict, message: str) -> SchemaRefused:
    """The decoder's refusal of ``schema`` (llguidance's message) as a :class:`SchemaRefused` naming the keyword
    and its path where the message says which; else the schema as a whole."""
    import re

    def first(test) -> str | None:
        return next((path for node, path in walk(schema) if test(node)), None)

    if "oneOf" in message and (where := first(lambda n: "oneOf" in n)):
        return SchemaRefused("oneOf", where, "has branches an answer might match more than one of: the decoder can "
                             "hold an answer to at least one (send anyOf) but cannot promise exactly one")
    if (m := re.search(r"required property '([^']+)'", message)) and (
            where := first(lambda n: m.group(1) in (n.get("required") or []))):
        return SchemaRefused("required", where, f"names '{m.group(1)}', which no answer can hold here ({message})")
    if m := re.search(r"circular references with sibling keys[^#]*(#[^\s.]*)", message):
        return SchemaRefused("$ref", m.group(1), "is in a circle of references and has sibling keywords, which the "
                             "decoder cannot follow; move the siblings beside it into an allOf with the $ref alone")
    if (m := re.search(r'Unimplemented keys: \["([^"]+)"', message)) and (where := first(lambda n: m.group(1) in n)):
        return SchemaRefused(m.group(1), where, "would constrain the answer and is not enforced by constrained "
                             "decoding here")
    return SchemaRefused("schema", "#", f"cannot constrain decoding: {message}")


def walk(doc):
    """``(subschema, its path)`` for every subschema of ``doc`` that is an object (the root included), in document
    order, found where a schema may hold one (not inside ``enum``, ``const``, ``default`` or ``examples`` values),
    each once, without recursion."""
    stack, seen = [(doc, "#")], set()
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen.add(id(node))
        yield node, path
        stack += reversed(list(_subschemas(node, path)))


def schema_nodes(doc) -> list[dict]:
    """Every subschema of ``doc`` that is an object (:func:`walk`'s, without their paths)."""
    return [node for node, _ in walk(doc)]


def composed_nodes(doc: dict) -> set[int]:
    """The ids of the subschemas an ``allOf`` composes: its branches and what they refer to (``$ref`` chains
    followed); closing one of these to its own properties would refuse what another branch adds."""
    marked: set[int] = set()
    for node in schema_nodes(doc):
        stack = list(node.get("allOf") or []) if isinstance(node.get("allOf"), list) else []
        while stack:
            branch = stack.pop()
            if not isinstance(branch, dict) or id(branch) in marked:
                continue
            marked.add(id(branch))
            if isinstance(branch.get("$ref"), str):
                stack.append(resolve(doc, branch["$ref"]))
    return marked


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _check_node(node: dict, path: str, strict: bool, root: dict) -> None:
    kinds = node.get("type", [])
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if kind not in TYPES:
            raise SchemaRefused("type", path, f"names '{kind}'; use one of {', '.join(sorted(TYPES))}")
    ref = node.get("$ref")
    if ref is not None and resolve(root, ref) is None:
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


def resolve(root: dict, ref: str):
    """The node a local ``$ref`` (``#`` or ``#/a/0/b``, JSON-pointer escapes undone) points at; None otherwise."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None
    return node


def _check_finite(schema: dict) -> None:
    """Refuse a ``$ref`` recursion that every answer would have to follow for ever (a required property or a
    non-empty array on each way round): the least fixpoint of "this ref has a finite instance", refs at a time."""
    refs = sorted({n["$ref"] for n in _dict_nodes(schema) if isinstance(n.get("$ref"), str)})
    finite = {ref: False for ref in refs}
    changed = True
    while changed:
        changed = False
        for ref in refs:
            if not finite[ref] and _has_instance(resolve(schema, ref), finite):
                finite[ref] = changed = True
    if not _has_instance(schema, finite):
        endless = next((r for r in refs if not finite[r]), "#")
        raise SchemaRefused("$ref", endless, "recurses without end: every answer would need a required property or "
                            "a non-empty array at each level; make one optional")


def _has_instance(node, finite: dict[str, bool], depth: int = 0) -> bool:
    """Whether ``node`` admits a finite answer, taking each ``$ref`` as ``finite`` says (depth-capped: the
    schema's depth is bounded by :func:`check_schema_cost`)."""
    if isinstance(node, bool) or not isinstance(node, dict):
        return node is not False
    if depth > MAX_SCHEMA_DEPTH:
        return True
    if "$ref" in node and not finite.get(node["$ref"], True):
        return False
    if any(not _has_instance(s, finite, depth + 1) for s in node.get("allOf") or []):
        return False
    for combo in ("anyOf", "oneOf"):
        if node.get(combo) and not any(_has_instance(s, finite, depth + 1) for s in node[combo]):
            return False
    properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    if any(name in properties and not _has_instance(properties[name], finite, depth + 1)
           for name in node.get("required") or [] if isinstance(name, str)):
        return False
    items = node.get("items")
    return not (isinstance(items, (dict, bool)) and (node.get("minItems") or 0) > 0
                and not _has_instance(items, finite, depth + 1))


def _dict_nodes(doc):
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack += node.values()
        elif isinstance(node, list):
            stack += node
