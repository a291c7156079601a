"""A caller's schema is bounded before anything compiles it, a failing row fails alone, a constrained answer
conforms or says why not: the pieces, without a server (tests/test_serve_tenants.py drives them through one)."""

from __future__ import annotations

import json
import time

import pytest

from tunesmith.generation import ContinuousBatch, GenParams, Row
from tunesmith.generation.constrained import ConstraintBroken, ConstraintCache, reply_token_bound
from tunesmith.generation.schemas import (
    MAX_SCHEMA_DEPTH,
    SchemaRefused,
    check_output_schema,
    check_schema_cost,
    resolve,
)
from tunesmith.serve.plan.tools import call_schema


def dag(levels: int) -> dict:
    defs = {f"L{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/L{i + 1}"},
                                                       "b": {"$ref": f"#/$defs/L{i + 1}"}},
                      "additionalProperties": False} for i in range(levels)}
    defs[f"L{levels}"] = {"type": "string", "maxLength": 4}
    return {"$defs": defs, "$ref": "#/$defs/L0"}


def test_the_token_bound_of_a_dag_sizes_each_ref_once():
    """2^40 paths, one visit per definition: the bound is exact and comes at once."""
    t0 = time.perf_counter()
    bound = reply_token_bound(dag(40))
    assert time.perf_counter() - t0 < 0.5
    size = 2 + 6 * 4  # the leaf: a string of at most 4 characters, 6 bytes a character, quotes
    for _ in range(40):
        size = 2 + 2 * (len('"a"') + 2 + size)
    assert bound == size
    recursive = {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
                                 "additionalProperties": False}}, "$ref": "#/$defs/n"}
    assert reply_token_bound(recursive) is None


@pytest.mark.parametrize("schema,keyword,says", [
    ({"type": "array", "minItems": 10**9}, "minItems", "no answer here holds more"),
    ({"type": "string", "minLength": 5000}, "minLength", "no answer here holds more"),
    ({"properties": {f"p{i}": {"type": "string", "description": "d" * 100} for i in range(3000)}}, "schema", "bytes"),
])
def test_a_schema_past_the_bounds_is_refused_naming_the_keyword(schema, keyword, says):
    with pytest.raises(SchemaRefused) as exc:
        check_schema_cost(schema)
    assert exc.value.keyword == keyword and says in str(exc.value)


def test_depth_is_checked_without_recursion():
    node: dict = {"type": "string"}
    for _ in range(5000):  # deeper than Python's recursion limit: a walk that recursed would be a 500
        node = {"type": "object", "properties": {"x": node}}
    with pytest.raises(SchemaRefused) as exc:
        check_output_schema(node, strict=False)
    assert f"nests deeper than {MAX_SCHEMA_DEPTH} levels" in str(exc.value)
    assert exc.value.path.startswith("#/properties/x/properties/x")


def test_annotations_are_ignored_and_listed_unenforced_keywords_refused():
    schema = {"id": "x", "x-kind": 1, "type": "object", "markdownDescription": "m",
              "properties": {"a": True, "b": False, "t": {"type": "array", "items": [{"type": "integer"}],
                                                          "additionalItems": False}}}
    assert sorted(check_output_schema(schema, strict=False)) == ["id at #", "markdownDescription at #", "x-kind at #"]
    for keyword, node in (("not", {"not": {"type": "string"}}), ("if", {"if": {"type": "string"}}),
                          ("uniqueItems", {"type": "array", "uniqueItems": True})):
        with pytest.raises(SchemaRefused) as exc:
            check_output_schema({"type": "object", "properties": {"p": node}}, strict=False)
        assert (exc.value.keyword, exc.value.path) == (keyword, "#/properties/p")
    assert check_output_schema({"type": "array", "uniqueItems": False}, strict=False) == []


@pytest.mark.parametrize("schema,endless", [
    ({"$defs": {"A": {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "required": ["a"]}},
      "$ref": "#/$defs/A"}, True),
    ({"$defs": {"L": {"type": "array", "items": {"$ref": "#/$defs/L"}, "minItems": 1}}, "$ref": "#/$defs/L"}, True),
    ({"$defs": {"A": {"anyOf": [{"$ref": "#/$defs/B"}, {"type": "null"}]},
                "B": {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "required": ["a"]}},
      "$ref": "#/$defs/B"}, False),  # the null ends it
    ({"$defs": {"A": {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}}, "$ref": "#/$defs/A"}, False),
])
def test_a_recursion_no_answer_can_end_is_refused(schema, endless):
    if endless:
        with pytest.raises(SchemaRefused, match="recurses without end"):
            check_output_schema(schema, strict=False)
    else:
        check_output_schema(schema, strict=False)


def test_a_tools_defs_move_to_the_calls_root_with_every_ref():
    params = {"type": "object", "properties": {"home": {"$ref": "#/$defs/Address"}, "me": {"$ref": "#"},
                                               "tags": {"$ref": "#/properties/home"}},
              "required": ["home"], "$defs": {"Address": {"type": "object", "properties": {
                  "next": {"$ref": "#/$defs/Address"}, "city": {"type": "string"}}}}}
    for functions, where in (([{"name": "f", "parameters": params}], "#/properties/arguments"),
                             ([{"name": "g"}, {"name": "f", "parameters": params}], "#/anyOf/1/properties/arguments")):
        doc = call_schema(functions)
        arguments = resolve(doc, where)
        assert "$defs" not in arguments and doc["$defs"]["f.Address"]["properties"]["next"] == {"$ref": "#/$defs/f.Address"}
        assert arguments["properties"]["me"] == {"$ref": where}
        assert arguments["properties"]["tags"] == {"$ref": f"{where}/properties/home"}
        refs = [v for v in json.dumps(doc).split('"$ref": ')[1:]]
        assert all(resolve(doc, json.loads(r.split("}")[0])) is not None for r in refs)


def test_the_constraint_cache_is_bounded_by_bytes(tiny_model):
    model, tok = tiny_model
    cache = ConstraintCache(tok, model.config.vocab_size, [tok.eos_token_id], max_bytes=20_000)
    for i in range(40):
        cache.get({"type": "object", "properties": {f"k{i}_{j}": {"type": "integer"} for j in range(30)}})
    assert cache.bytes <= 20_000 and 1 <= len(cache.compiled) < 40


class _BreaksAt:
    """A row's logits processor that fails at its ``n``-th step (a matcher that could not go on)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.n:
            raise ConstraintBroken("The answer could not go on under its schema: limit reached")
        return scores


def test_a_failing_row_fails_alone_and_the_others_finish(tiny_model):
    model, tok = tiny_model
    batch = ContinuousBatch(model, tok, max_rows=4, isolate_rows=True)
    ids = tok("hello there", add_special_tokens=False)["input_ids"]
    rows = [Row(ids, GenParams(max_tokens=8)), Row(ids, GenParams(max_tokens=8), processors=(_BreaksAt(3),)),
            Row(ids, GenParams(max_tokens=8, temperature=0.8, seed=2**64))]  # a seed torch refuses
    for r in rows:
        batch.add(r)
    done = []
    while batch.busy:
        done += batch.step()
    assert [r.finish_reason for r in rows] == ["length", "error", "error"]
    assert isinstance(rows[1].error, ConstraintBroken) and len(rows[1].generated) == 2
    assert isinstance(rows[2].error, (RuntimeError, ValueError)) and len(rows[0].generated) == 8
    lone = ContinuousBatch(model, tok, max_rows=4)  # one caller's batch: the failure ends the step
    lone.add(Row(ids, GenParams(max_tokens=8), processors=(_BreaksAt(2),)))
    with pytest.raises(ConstraintBroken):
        while lone.busy:
            lone.step()


def test_vllms_finished_answer_is_checked_against_its_constraint(tiny_model):
    """vLLM ends a row whose matcher failed with its end of sequence: such an answer is an error, not text."""
    from tunesmith.serve.engines.interface import Generation
    from tunesmith.serve.engines.vllm.engine import VllmConstraint, VllmEngine
    from tunesmith.serve.errors import APIError

    model, tok = tiny_model
    engine = VllmEngine.__new__(VllmEngine)
    engine.tokenizer = tok
    engine._cache = engine._new_constraints()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    constraint = VllmConstraint({"json": schema}, engine._cache.get(schema))
    whole = Generation('{"a":12}', 5, 4, "stop")
    assert engine._conforming(whole, constraint, GenParams()) is whole
    with pytest.raises(APIError) as exc:
        engine._conforming(Generation('{"a":', 5, 2, "stop"), constraint, GenParams())
    assert exc.value.status == 400 and exc.value.body["code"] == "constraint_failed"
    cut = Generation('{"a":', 5, 2, "length")  # cut by max_tokens: not whole, and said so
    assert engine._conforming(cut, constraint, GenParams()) is cut


def test_objects_are_closed_only_where_that_keeps_them_satisfiable():
    from tunesmith.generation.constrained import output_schema

    base = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}
    doc = output_schema({"definitions": {"base": base}, "allOf": [{"$ref": "#/definitions/base"}],
                         "properties": {"extra": {"type": "string", "format": "path"}},
                         "anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}]})
    assert "additionalProperties" not in doc["definitions"]["base"]  # an allOf branch refers to it
    assert "additionalProperties" not in doc  # beside allOf and anyOf
    assert doc["anyOf"][0]["additionalProperties"] is False  # a plain object: closed
    assert "format" not in doc["properties"]["extra"]  # an unknown format is an annotation
    open_required = output_schema({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]})
    assert "additionalProperties" not in open_required  # "b" may only come as an extra property
    enum_value = output_schema({"enum": [{"type": "string", "format": "path"}]})
    assert enum_value["enum"] == [{"type": "string", "format": "path"}]  # values are not schemas


@pytest.mark.parametrize("message,keyword,path", [
    ("oneOf constraints are not supported. Enable 'coerce_one_of'", "oneOf", "#/properties/v"),
    ("Unsatisfiable schema: required property 'b' is unsatisfiable", "required", "#/properties/w"),
    ("circular references with sibling keys are not supported: https://x/s.json#/definitions/h. more", "$ref",
     "#/definitions/h"),
    ("something else entirely", "schema", "#"),
])
def test_a_decoder_refusal_names_the_keyword_and_its_path(message, keyword, path):
    from tunesmith.generation.schemas import located

    schema = {"type": "object", "properties": {"v": {"oneOf": [{"type": "string"}]},
                                               "w": {"type": "object", "required": ["b"]}}}
    refused = located(schema, message)
    assert (refused.keyword, refused.path) == (keyword, path)


def test_the_tokenizer_is_converted_for_llguidance_at_the_start_not_in_a_request(tiny_model):
    """The conversion holds the GIL for about a second on a 49k vocabulary: done in the first request with a schema,
    every tenant's decoding stalls behind it (the cost flood's first seconds); prepared in the background at the
    start, a request that needs it meanwhile waits for it, and compiles against it."""
    from tunesmith.generation.constrained import ConstraintCache

    model, tok = tiny_model
    cache = ConstraintCache(tok, model.config.vocab_size, [tok.eos_token_id])
    assert cache.bridge is None
    cache.prepare(background=True)
    compiled = cache.get({"type": "object"})  # waits for the conversion under the cache's lock, if it still runs
    assert cache.bridge is not None and compiled.tokenizer is cache.bridge
    before = cache.bridge
    cache.prepare()
    assert cache.bridge is before  # once


def _refs(doc) -> list[str]:
    from tunesmith.generation.schemas import schema_nodes

    return sorted(n["$ref"] for n in schema_nodes(doc) if "$ref" in n)


@pytest.mark.parametrize("schema,refs", [
    ({"$ref": "#foo", "$defs": {"A": {"$anchor": "foo", "type": "integer"}}}, ["#/$defs/A"]),
    ({"$id": "http://example.com/root.json", "$ref": "nested.json#foo",  # an anchor in an embedded resource
      "$defs": {"A": {"$id": "nested.json", "$defs": {"B": {"$anchor": "foo", "type": "integer"}}}}}, ["#/$defs/A/$defs/B"]),
    ({"$defs": {"tilde~field": {"type": "integer"}, "slash/field": {"type": "integer"}, "percent%field": {"type": "integer"}},
      "properties": {"t": {"$ref": "#/$defs/tilde~0field"}, "s": {"$ref": "#/$defs/slash~1field"},
                     "p": {"$ref": "#/$defs/percent%25field"}}},
     ["#/$defs/percent%25field", "#/$defs/slash~1field", "#/$defs/tilde~0field"]),
    ({"$ref": "urn:uuid:dead", "$defs": {"foo": {"$id": "urn:uuid:dead", "$defs": {"bar": {"type": "string"}},
                                                 "$ref": "#/$defs/bar"}}},  # '#' inside a resource is its own root
     ["#/$defs/foo", "#/$defs/foo/$defs/bar"]),
    ({"$id": "http://example.com/ref/absref.json", "$ref": "/absref/foobar.json",
      "$defs": {"a": {"$id": "http://example.com/ref/absref/foobar.json", "type": "number"},
                "b": {"$id": "http://example.com/absref/foobar.json", "type": "string"}}}, ["#/$defs/b"]),
    ({"$id": "https://example.com/a/b.json", "$ref": "../c/./d.json",
      "$defs": {"d": {"$id": "https://example.com/c/d.json", "type": "null"}}}, ["#/$defs/d"]),
])
def test_references_resolve_as_the_specification_says(schema, refs):
    """The JSON Schema Test Suite's cases: anchors, embedded $id (RFC 3986 against the nearest base), percent- and
    tilde-escaped pointers, each made a pointer into the one document, $id and $anchor then left out."""
    from tunesmith.generation.schemas import local_refs, schema_nodes

    doc = local_refs(schema)
    assert _refs(doc) == refs
    assert all(resolve(doc, r) is not None for r in refs)
    assert not any({"$id", "$anchor"} & set(n) for n in schema_nodes(doc))


@pytest.mark.parametrize("schema,keyword,path,says", [
    ({"$ref": "https://json-schema.org/draft/2020-12/schema"}, "$ref", "#", "does not point into this schema"),
    ({"properties": {"a": {"$ref": "#nowhere"}}}, "$ref", "#/properties/a", "no $anchor 'nowhere'"),
    (False, "schema", "#", "is false"),
    ({"$ref": "#/$defs/no", "$defs": {"no": False}}, "false", "#/$defs/no", "admits no value"),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "false", "#/properties/a", "admits no value"),
    ({"type": "object", "properties": {"\ud800x": {"type": "string"}}}, "\\ud800x", "#/properties", "lone UTF-16"),
])
def test_a_schema_no_answer_can_follow_is_refused_saying_why(schema, keyword, path, says):
    from tunesmith.generation.schemas import served_schema

    with pytest.raises(SchemaRefused) as exc:
        served_schema(schema, strict=False)
    assert (exc.value.keyword, exc.value.path) == (keyword, path) and says in str(exc.value), str(exc.value)


def test_true_and_false_where_they_stay_satisfiable_are_served():
    from tunesmith.generation.schemas import served_schema

    assert served_schema(True, strict=False) == ({}, [])
    served_schema({"type": "object", "properties": {"a": False, "b": True}, "additionalProperties": False}, strict=False)
    with pytest.raises(SchemaRefused, match="strict mode"):
        served_schema(True, strict=True)


def test_numbers_are_capped_in_digits_where_the_schema_leaves_them_open(tiny_model):
    """15 digits before the point and 6 after (from 0 up), compiled: a greedy run of ones cannot go on."""
    from tunesmith.generation.constrained import MAX_NUMBER, output_schema

    model, tok = tiny_model
    cache = ConstraintCache(tok, model.config.vocab_size, [tok.eos_token_id])

    def conforms(schema, text) -> bool:
        return cache.get(output_schema(schema)).conforms(tok(text, add_special_tokens=False)["input_ids"]) is None

    for schema in ({"type": "number"}, {"minimum": 1.1}, {"type": ["number", "null"]}):
        assert conforms(schema, "1.111111") and not conforms(schema, "1.1111111")
        assert not conforms(schema, "1" * 16) and not conforms(schema, "1e5")
    assert conforms({"type": "number"}, "-2.5") and conforms({"minimum": 1.1}, '"text"')
    assert conforms({"type": "integer"}, "-" + "9" * 15) and not conforms({"type": "integer"}, "1" * 16)
    assert conforms({"type": "object"}, '{"a":[1.5,{"b":"x"}]}') and not conforms({"type": "object"}, '{"a":[0.1234567]}')
    kept = output_schema({"type": "number", "minimum": 1e20, "multipleOf": 0.25})  # the caller's bounds stay
    assert "maximum" not in kept and kept["multipleOf"] == 0.25
    assert output_schema({"type": "integer", "minimum": 5})["maximum"] == MAX_NUMBER
    negative = output_schema({"type": "number", "maximum": -1})  # a negative number's fraction stays free
    assert negative["minimum"] == -MAX_NUMBER and "multipleOf" not in negative and "anyOf" not in negative
    person = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    assert reply_token_bound(output_schema(person)) == 2 + len('"age"') + 2 + 16  # bounded now, numbers too
