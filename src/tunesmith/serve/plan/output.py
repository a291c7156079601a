"""What an answer must be: free text, or JSON under a schema (chat's ``response_format``, Responses'
``text.format``). A schema outside what the decoder enforces is a 400 naming the keyword and its path."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.serve.errors import APIError
from tunesmith.serve.plan.fields import refuse_unknown
from tunesmith.serve.plan.messages import check_text


@dataclass
class OutputFormat:
    """What the answer is: free text, or JSON under ``schema`` (the caller's; ``constraint`` is the bounded copy
    decoding runs under). ``param``: the request field it came from, named by its errors."""

    json: bool = False
    schema: dict | bool | None = None
    constraint: dict | None = None
    param: str = "response_format"
    ignored: list[str] = field(default_factory=list)  # annotations and unknown keywords: "keyword at path"


def output_format(doc, param: str) -> OutputFormat:
    """``response_format`` (chat) or ``text.format`` (Responses) as an output format: ``text``, ``json_object``
    (any object; with a ``schema`` member, as vLLM and instructor send it, that schema), or ``json_schema``
    (strict: OpenAI's subset; otherwise any schema the decoder enforces, ``true`` included: any JSON value). A
    schema outside is a 400 naming the keyword and its path in the schema (``false``: no answer can satisfy it)."""
    from tunesmith.generation.constrained import output_schema
    from tunesmith.generation.schemas import SchemaRefused, served_schema

    if doc is None:
        return OutputFormat(param=param)
    check_text(doc, param)
    if not isinstance(doc, dict) or doc.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(400, f"{param}: type must be 'text', 'json_object' or 'json_schema'", param=param,
                       code="invalid_value")
    kind = doc["type"]
    nested = doc.get("json_schema") if param == "response_format" and kind == "json_schema" else doc
    known = {"text": {"type"}, "json_object": {"type", "schema"}}.get(kind, {"type", "json_schema"})
    if param != "response_format" and kind == "json_schema":
        known = {"type", "name", "schema", "strict", "description"}
    refuse_unknown(doc, known, param)
    if kind == "text":
        return OutputFormat(param=param)
    if kind == "json_object" and "schema" not in doc:
        return OutputFormat(True, {"type": "object"}, output_schema({"type": "object"}), param)
    if kind == "json_schema":
        if not isinstance(nested, dict) or not isinstance(nested.get("schema", {}), (dict, bool)):
            raise APIError(400, f"{param}: give json_schema with name and schema (a JSON Schema object, or true)",
                           param=param, code="invalid_value")
        if nested is not doc:
            refuse_unknown(nested, {"name", "schema", "strict", "description"}, f"{param}.json_schema")
    schema, strict = nested.get("schema", {"type": "object"}), bool(nested.get("strict")) and kind == "json_schema"
    try:
        served, ignored = served_schema(schema, strict)
    except SchemaRefused as exc:
        name = nested.get("name", "")
        raise APIError(400, f"Invalid schema for {param} '{name}': {exc}.", param=param,
                       code="invalid_json_schema") from None
    return OutputFormat(True, schema, output_schema(served), param, ignored)
