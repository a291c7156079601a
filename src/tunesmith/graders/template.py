"""The ``{{sample.*}}`` / ``{{item.*}}`` templates of OpenAI's graders: checking and rendering.

``sample`` holds the graded model output: ``output_text`` (the text) and ``output_json`` (the text parsed
as JSON, when it is JSON); ``item`` is the dataset row. A path goes down dicts by key and lists by index
(``{{item.answers.0}}``). Strings render as they are; other values as compact JSON.
"""

from __future__ import annotations

import json
import re

VARIABLE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
SAMPLE_FIELDS = ("output_text", "output_json", "output_tools", "choices")


class MissingVariable(LookupError):
    """A template names a path the sample or item does not have."""


class SampleNotJSON(ValueError):
    """A template reads ``sample.output_json`` but the output is not JSON."""


def variables(template: str) -> list[str]:
    return VARIABLE.findall(template)


def bad_variable(template: str) -> str | None:
    """Why a template's variable can never be filled (unknown namespace or sample field); None when all can."""
    for var in variables(template):
        parts = var.split(".")
        if parts[0] not in ("sample", "item") or len(parts) < 2 or not all(parts):
            return f"'{{{{{var}}}}}' is not a grader variable; use {{{{sample.output_text}}}}, " \
                   "{{sample.output_json.<path>}} or {{item.<field>}}"
        if parts[0] == "sample" and parts[1] not in SAMPLE_FIELDS:
            return f"'{{{{{var}}}}}': the sample namespace has {', '.join(SAMPLE_FIELDS)}"
    return None


def sample_namespace(output_text: str, output_json: object = None) -> dict:
    """The ``sample`` namespace for one output; ``output_json`` is parsed from the text when not given."""
    if output_json is None:
        try:
            output_json = json.loads(output_text)
        except (TypeError, ValueError):
            output_json = None
    return {"output_text": output_text, "output_json": output_json, "output_tools": [], "choices": []}


def lookup(var: str, sample: dict, item: dict) -> object:
    """The value at ``var`` (``sample.x.y`` or ``item.x``)."""
    parts = var.split(".")
    value: object = {"sample": sample, "item": item}
    for depth, part in enumerate(parts):
        if part == "output_json" and depth == 1 and parts[0] == "sample" and value.get("output_json") is None:
            raise SampleNotJSON("the sample is not valid JSON, so {{sample.output_json}} is empty")
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            raise MissingVariable(f"{{{{{var}}}}}: no '{part}' in {'.'.join(parts[:depth]) or 'the namespaces'}")
    return value


def as_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(template: str, sample: dict, item: dict) -> str:
    """The template with every variable replaced; raises MissingVariable or SampleNotJSON."""
    return VARIABLE.sub(lambda m: as_text(lookup(m.group(1), sample, item)), template)
