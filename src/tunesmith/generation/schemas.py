"""What a caller's JSON schema may be before anything compiles it: its cost bounded, the keywords it may use.

A schema reaches the engines that every caller shares, so it is checked first, in one pass with an explicit
stack (no recursion, whatever its depth): its size, nesting depth and number of nodes, and the ``min*`` keywords
that would ask for more than any answer here can hold (:func:`check_schema_cost`). Then its keywords
(:func:`check_output_schema`): in strict mode OpenAI's subset; otherwise every keyword the decoder (llguidance)
enforces is served, a keyword that would constrain an answer but is not enforced (``not``, ``if``,
``dependencies``…) is a 400 naming it and its path, and any other keyword is an annotation and ignored, as the JSON
Schema specification says (``id``, ``x-*``, ``markdownDescription``, a misspelt ``decription``); boolean
subschemas are schemas, ``true`` at the root included (``false`` admits no answer and is refused). A ``$ref`` recursion
that no finite answer can end (a required property, or a non-empty array, on every way round) is refused too:
decoding it would never finish.

References are resolved as the specification says (:func:`local_refs`): against the base URI that ``$id`` sets
(RFC 3986), to a plain-name fragment an ``$anchor`` declares, or down a JSON pointer whose fragment is
percent-decoded. Each becomes a pointer into the document itself, so that everything after (the checks, the bounds,
the decoder) reads one resource; a reference to anything outside the schema is refused (nothing is fetched).
"""

from __future__ import annotations

import copy
import json
import re
from urllib.parse import quote, unquote

# what one schema may cost (a tenant's schema reaches state every caller shares)
MAX_SCHEMA_BYTES = 256 * 1024  # serialized, as JSON
MAX_SCHEMA_DEPTH = 64  # JSON nesting levels of the schema document
MAX_SCHEMA_NODES = 20_000  # objects and arrays in the schema document
MAX_MINIMUM = 4096  # minItems, minLength, minProperties: no answer here can hold more

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id", "$anchor",
                         "$dynamicAnchor", "deprecated", "readOnly", "writeOnly"})
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
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "additionalItems", "not", "if", "then", "else", "contains",
                  "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_MINIMUMS = ("minItems", "minLength", "minProperties")
_SURROGATE = re.compile("[\ud800-\udfff]")
BASE_URI = "tunesmith:/schema"  # the base of a schema without an $id of its own (RFC 3986 needs one)


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
            _check_text(key, path, "name")
            _check_text(value, f"{path}/{_escape(str(key))}", "value")
            if isinstance(node, dict) and key in _MINIMUMS and isinstance(value, int) and value > MAX_MINIMUM:
                raise SchemaRefused(key, path, f"is {value:,}; no answer here holds more than {MAX_MINIMUM:,} "
                                    "(items, characters or properties)")
            if isinstance(value, (dict, list)):
                stack.append((value, f"{path}/{_escape(str(key))}", depth + 1))
    size = len(json.dumps(schema, ensure_ascii=False).encode())  # after the depth check: json recurses
    if size > MAX_SCHEMA_BYTES:
        raise SchemaRefused("schema", "#", f"is {size:,} bytes; this server compiles schemas of up to "
                            f"{MAX_SCHEMA_BYTES:,} bytes")


def _check_text(value, path: str, what: str) -> None:
    """Refuse a key or string of the schema holding a lone UTF-16 surrogate (``"\\ud800"``: JSON lets it through,
    no text encoding holds it), naming where it is."""
    if isinstance(value, str) and (found := _SURROGATE.search(value)):
        raise SchemaRefused(printable(value) if what == "name" else path.rsplit("/", 1)[-1], printable(path),
                            f"holds a lone UTF-16 surrogate (\\u{ord(found.group()):04x} at character {found.start()}"
                            f" of its {what}), which is not text; send the pair it belongs to, or valid UTF-8")


def printable(text: str) -> str:
    """``text`` with any lone surrogate written as its escape (``\\ud800``), so that a message can quote it."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def check_output_schema(schema, strict: bool) -> list[str]:
    """Refuse (:class:`SchemaRefused`, naming the keyword and its path) a schema outside what is served: with
    ``strict`` OpenAI's strict-mode rules (the root an object, every object closed with all its properties
    required, formats from its list); without, a keyword that would constrain and is not enforced. Returns the
    keywords ignored as annotations (``keyword at path``), so that the answer can say which."""
    return served_schema(schema, strict)[1]


def served_schema(schema, strict: bool) -> tuple[dict, list[str]]:
    """The schema an answer is held to, checked (:func:`check_output_schema`'s rules): its references made local
    (:func:`local_refs`), ``true`` as ``{}`` (any value); ``false`` is refused, no answer satisfying it. Returns it
    with the keywords ignored as annotations."""
    if strict and not isinstance(schema, dict):
        raise SchemaRefused("type", "#", "must be 'object' at the root in strict mode (a schema object, not "
                            f"{json.dumps(schema)})")
    if schema is True:
        return {}, []
    if schema is False:
        raise SchemaRefused("schema", "#", "is false: no value satisfies it, so no answer can; send true (any "
                            "JSON value) or a schema an answer can satisfy")
    if not isinstance(schema, dict):
        raise SchemaRefused("schema", "#", "must be a JSON object (a JSON Schema document) or a boolean")
    check_schema_cost(schema)
    schema = local_refs(schema)
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
    return schema, ignored


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
    """The node a local ``$ref`` (``#`` or ``#/a/0/b``: a URI fragment, percent-decoded, then a JSON pointer, its
    escapes undone) points at; None otherwise."""
    keys = ref_keys(ref)
    return None if keys is None else _at(root, keys)


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _at(node, keys: list[str]):
    """The node down ``keys`` (object keys, or list indexes as digits); None when they lead nowhere. An empty key
    is a key (``""``), as a JSON pointer's grammar says."""
    for part in keys:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None
    return node


# --- references, as the specification resolves them ------------------------------------------------------

def local_refs(schema: dict) -> dict:
    """A copy of ``schema`` whose every ``$ref`` points into the document itself (``#/$defs/a%25b``: a JSON pointer
    from the root, percent-encoded as a URI fragment), resolved as JSON Schema 2020-12 says: each reference against
    its base URI (the nearest ``$id`` around it, resolved in turn against the one around that, RFC 3986), then its
    fragment as a JSON pointer (percent-decoded) from that resource's root or as a plain name an ``$anchor`` (or
    ``$dynamicAnchor``, or an older draft's ``$id: "#name"``) declares in it. ``$id`` and the anchors are then left
    out: the copy is one resource. A reference to anything outside the schema is a :class:`SchemaRefused` on
    ``$ref`` (no schema is fetched)."""
    doc = copy.deepcopy(schema)
    resources: dict[str, list[str]] = {}  # base URI -> the document path of the schema that declares it
    anchors: dict[tuple[str, str], list[str]] = {}
    refs: list[tuple[dict, str, list[str]]] = []  # (node, its base URI, its path)
    stack: list[tuple[object, str, list[str]]] = [(doc, BASE_URI, [])]
    resources[BASE_URI] = []
    while stack:
        node, base, path = stack.pop()
        if not isinstance(node, dict):
            continue
        declared = node.get("$id")
        if isinstance(declared, str) and declared.startswith("#") and declared[1:2] not in ("", "/"):
            anchors[(base, declared[1:])] = path  # draft-06/07: an $id that is only a fragment names an anchor
        elif isinstance(declared, str):
            base = _join(base, declared).split("#", 1)[0]
            resources[base] = path
        for key in ("$anchor", "$dynamicAnchor"):
            if isinstance(node.get(key), str):
                anchors[(base, node[key])] = path
        if isinstance(node.get("$ref"), str):
            refs.append((node, base, path))
        stack += [(sub, base, path + where) for sub, where in _children(node)]
    for node, base, path in refs:
        node["$ref"] = ref_to(_target(doc, node["$ref"], base, path, resources, anchors))
    for node in schema_nodes(doc):
        for key in ("$id", "$anchor", "$dynamicAnchor"):
            node.pop(key, None)
    return doc


def _children(node: dict):
    """(subschema, its path tokens) of every place ``node`` may hold one."""
    for sub, path in _subschemas(node, ""):
        yield sub, [_unescape(t) for t in path.split("/")[1:]]


def _target(doc: dict, ref: str, base: str, path: list[str], resources: dict, anchors: dict) -> list[str]:
    """The document path (tokens) ``ref`` at ``path`` (under ``base``) points at; a :class:`SchemaRefused` when it
    points nowhere in this schema."""
    where = "#" + "".join("/" + _escape(t) for t in path)
    uri, _, fragment = _join(base, ref).partition("#")
    if uri not in resources:
        raise SchemaRefused("$ref", printable(where), f"'{ref}' does not point into this schema: references are "
                            "followed within the schema itself (JSON pointers, $anchor names, embedded $id), nothing "
                            "is fetched; put the schema it names under $defs")
    root = resources[uri]
    if not fragment or fragment.startswith("/"):
        keys = [_unescape(unquote(t)) for t in fragment.split("/")[1:]]
        if _at(_at(doc, root), keys) is not None:
            return root + keys
        raise SchemaRefused("$ref", printable(where), f"'{ref}' does not point into this schema (no node at that "
                            "JSON pointer)")
    if (uri, unquote(fragment)) in anchors:
        return anchors[(uri, unquote(fragment))]
    raise SchemaRefused("$ref", printable(where), f"'{ref}' does not point into this schema (no $anchor "
                        f"'{unquote(fragment)}' in it)")


def ref_to(keys: list[str]) -> str:
    """The local ``$ref`` to the node down ``keys`` (object keys or list indexes) from the root."""
    return "#" + "".join("/" + _fragment_token(k) for k in keys)


def ref_keys(ref: str) -> list[str] | None:
    """The keys a local ``$ref`` (``#`` or ``#/...``) goes down, decoded; None for any other reference."""
    if not isinstance(ref, str) or not ref.startswith("#") or ref[1:2] not in ("", "/"):
        return None
    return [_unescape(unquote(t)) for t in ref[2:].split("/")] if ref[1:] else []


def _fragment_token(token: str) -> str:
    """A JSON pointer's token as it is written in a URI fragment: ``~`` and ``/`` escaped, then percent-encoded."""
    return quote(_escape(token), safe="!$&'()*+,;=:@~")


_URI = re.compile(r"^(?:([^:/?#]+):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?$", re.S)  # RFC 3986, B


def _join(base: str, ref: str) -> str:
    """``ref`` resolved against the absolute URI ``base``, as RFC 3986 (5.2.2) does it."""
    r_scheme, r_auth, r_path, r_query, r_frag = _URI.match(ref).groups()
    b_scheme, b_auth, b_path, b_query, _ = _URI.match(base).groups()
    if r_scheme is not None:
        scheme, auth, path, query = r_scheme, r_auth, _remove_dots(r_path), r_query
    elif r_auth is not None:
        scheme, auth, path, query = b_scheme, r_auth, _remove_dots(r_path), r_query
    elif not r_path:
        scheme, auth, path, query = b_scheme, b_auth, b_path, r_query if r_query is not None else b_query
    else:
        merged = r_path if r_path.startswith("/") else (
            "/" + r_path if b_auth is not None and not b_path else b_path[: b_path.rfind("/") + 1] + r_path)
        scheme, auth, path, query = b_scheme, b_auth, _remove_dots(merged), r_query
    return (f"{scheme}:" + (f"//{auth}" if auth is not None else "") + path + (f"?{query}" if query is not None else "")
            + (f"#{r_frag}" if r_frag is not None else ""))


def _remove_dots(path: str) -> str:
    """RFC 3986 5.2.4: a path without its ``.`` and ``..`` segments."""
    out: list[str] = []
    while path:
        if path.startswith(("../", "./")):
            path = path[path.index("/") + 1:]
        elif path.startswith("/./") or path == "/.":
            path = "/" + path[3:]
        elif path.startswith("/../") or path == "/..":
            path = "/" + path[4:]
            if out:
                out.pop()
        elif path in (".", ".."):
            path = ""
        else:
            end = path.find("/", 1)
            end = len(path) if end < 0 else end
            out.append(path[:end])
            path = path[end:]
    return "".join(out)


def _check_finite(schema: dict) -> None:
    """Refuse a ``$ref`` recursion that every answer would have to follow for ever (a required property or a
    non-empty array on each way round): the least fixpoint of "this ref has a finite instance", refs at a time."""
    refs = sorted({n["$ref"] for n in schema_nodes(schema) if isinstance(n.get("$ref"), str)})
    finite = _least_fixpoint(schema, refs)
    if not _has_instance(schema, finite):
        if _has_instance(schema, _least_fixpoint(schema, refs, false_ok=True), false_ok=True):
            raise SchemaRefused("false", _blocking_false(schema, refs), "is a false schema (it admits no value) that "
                                "every answer would have to satisfy: no answer can; make the property or branch "
                                "that leads to it optional, or send true")
        endless = next((r for r in refs if not finite[r]), "#")
        raise SchemaRefused("$ref", endless, "recurses without end: every answer would need a required property or "
                            "a non-empty array at each level; make one optional")


def _least_fixpoint(schema: dict, refs: list[str], false_ok: bool = False) -> dict[str, bool]:
    """For each ref, whether what it points at has a finite answer (``false_ok``: as if ``false`` had one)."""
    finite = {ref: False for ref in refs}
    changed = True
    while changed:
        changed = False
        for ref in refs:
            if not finite[ref] and _has_instance(resolve(schema, ref), finite, false_ok=false_ok):
                finite[ref] = changed = True
    return finite


def _blocking_false(schema: dict, refs: list[str]) -> str:
    """Where the ``false`` an answer cannot get past is, as well as can be said: a reference's target that is
    false, else one in a composition or a required property, else the root."""
    if target := next((r for r in refs if resolve(schema, r) is False), None):
        return target
    for node, path in walk(schema):
        for key in ("allOf", "anyOf", "oneOf"):
            for i, sub in enumerate(node.get(key) or [] if isinstance(node.get(key), list) else []):
                if sub is False:
                    return f"{path}/{key}/{i}"
        properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        for name in node.get("required") or []:
            if isinstance(name, str) and properties.get(name) is False:
                return f"{path}/properties/{_escape(name)}"
    return "#"


def _has_instance(node, finite: dict[str, bool], depth: int = 0, false_ok: bool = False) -> bool:
    """Whether ``node`` admits a finite answer, taking each ``$ref`` as ``finite`` says (depth-capped: the
    schema's depth is bounded by :func:`check_schema_cost`; ``false_ok``: as if ``false`` admitted one)."""
    if isinstance(node, bool) or not isinstance(node, dict):
        return node is not False or false_ok

    def sub(s) -> bool:
        return _has_instance(s, finite, depth + 1, false_ok)

    if depth > MAX_SCHEMA_DEPTH:
        return True
    if "$ref" in node and not finite.get(node["$ref"], True):
        return False
    if any(not sub(s) for s in node.get("allOf") or []):
        return False
    for combo in ("anyOf", "oneOf"):
        if node.get(combo) and not any(sub(s) for s in node[combo]):
            return False
    properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    if any(name in properties and not sub(properties[name]) for name in node.get("required") or []
           if isinstance(name, str)):
        return False
    items = node.get("items")
    return not (isinstance(items, (dict, bool)) and (node.get("minItems") or 0) > 0 and not sub(items))

