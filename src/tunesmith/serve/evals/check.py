"""Checking what an eval or a run is created with, before anything runs: every problem is a 400 naming the
field (``testing_criteria.1.operation``, ``data_source.source.content.3.item``) and saying what to send."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import Request

from tunesmith.graders import template
from tunesmith.graders.spec import item_fields
from tunesmith.serve.api.auth import visible_models
from tunesmith.serve.engines.errors import APIError
from tunesmith.serve.evals.grading import checked_grader

MAX_ROWS = 10_000  # rows in one run


# a stored completion as an eval's item: what was asked, what was answered, by which model
STORED_ITEM = {"type": "object", "properties": {"id": {"type": "string"}, "input": {"type": "array"},
                                                "output": {"type": "string"}, "model": {"type": "string"},
                                                "metadata": {"type": "object"}},
               "required": ["id", "input", "output", "model", "metadata"]}
SAMPLE = {"type": "object", "properties": {"output_text": {"type": "string"}, "output_json": {"type": "object"}}}


def data_source_schema(config: dict) -> dict:
    """The stored ``data_source_config``: for ``custom``, the JSON schema of a row (``item``, and ``sample``
    when ``include_sample_schema``), as OpenAI returns it; for ``stored_completions`` (this key's stored chat
    completions, filtered by ``metadata``), items of :data:`STORED_ITEM` and a sample."""
    kind = config.get("type")
    if kind == "stored_completions":
        metadata = config.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise APIError(400, "data_source_config.metadata: pairs of strings to select stored completions by",
                           param="data_source_config.metadata")
        return {"type": "stored_completions", "metadata": metadata, "schema": {
            "type": "object", "properties": {"item": STORED_ITEM, "sample": SAMPLE}, "required": ["item", "sample"]}}
    if kind != "custom":
        raise APIError(400, f"data_source_config.type {kind!r} is not supported here; use 'custom' with an "
                       "item_schema, or 'stored_completions' (logs live at OpenAI)", param="data_source_config.type")
    item_schema = config.get("item_schema")
    if not isinstance(item_schema, dict):
        raise APIError(400, "data_source_config.item_schema: a JSON schema object is required",
                       param="data_source_config.item_schema")
    properties, required = {"item": item_schema}, ["item"]
    if config.get("include_sample_schema"):
        properties["sample"] = SAMPLE
        required.append("sample")
    return {"type": "custom", "schema": {"type": "object", "properties": properties, "required": required}}


def _item_fields(config: dict) -> set[str] | None:
    """The item fields the schema names (None: it names none, so any may be used)."""
    schema = config.get("item_schema") or config.get("schema", {}).get("properties", {}).get("item") or {}
    props = schema.get("properties")
    return set(props) if isinstance(props, dict) and props else None


def check_criteria(request: Request, key, criteria: list[dict], config: dict) -> list[dict]:
    """Each criterion checked as a grader, its ``{{item.*}}`` fields among the schema's properties."""
    fields = _item_fields(config)
    out = []
    for i, criterion in enumerate(criteria):
        param = f"testing_criteria.{i}"
        grader = {k: v for k, v in criterion.items() if k != "pass_threshold"}
        grader = checked_grader(request, key, grader, param)
        threshold = criterion.get("pass_threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
            raise APIError(400, f"{param}.pass_threshold must be a number", param=f"{param}.pass_threshold")
        if grader.get("type") == "text_similarity" and threshold is None:
            raise APIError(400, f"{param}.pass_threshold is required for a text_similarity criterion",
                           param=f"{param}.pass_threshold")
        unknown = sorted(item_fields(grader) - fields) if fields is not None else []
        if unknown:
            raise APIError(400, f"{param}: {{{{item.{unknown[0]}}}}} is not in the item_schema's properties "
                           f"({', '.join(sorted(fields))})", param=param, code="invalid_variable")
        out.append(criterion)
    return out


def check_data_source(request: Request, key, source: dict) -> dict:
    """A ``jsonl`` or ``completions`` source; a completions source names a model served to this key."""
    kind = source.get("type")
    if kind not in ("jsonl", "completions"):
        raise APIError(400, f"data_source.type {kind!r} is not supported here; use 'jsonl' (rows with items and "
                       "samples) or 'completions' (a served model answers each item)", param="data_source.type")
    inner = source.get("source")
    if not isinstance(inner, dict) or inner.get("type") not in ("file_content", "file_id", "stored_completions"):
        raise APIError(400, "data_source.source.type must be 'file_content', 'file_id' or 'stored_completions'",
                       param="data_source.source.type")
    if kind == "completions":
        served = visible_models(request, key)
        if source.get("model") not in served:
            raise APIError(400, f"data_source.model {source.get('model')!r} is not served here; one of: "
                           f"{', '.join(served)}", param="data_source.model", code="model_not_found")
        messages = source.get("input_messages")
        if not isinstance(messages, dict) or messages.get("type") not in ("template", "item_reference"):
            raise APIError(400, "data_source.input_messages: a template of messages ({{item.*}} variables) or an "
                           "item_reference is required", param="data_source.input_messages")
        template_ok = isinstance(messages.get("template", []), list) and all(
            isinstance(m, dict) for m in messages.get("template", []))
        if not template_ok or not isinstance(messages.get("item_reference", ""), str):
            raise APIError(400, "data_source.input_messages: template is a list of messages {role, content}; "
                           "item_reference a string such as 'item.messages'", param="data_source.input_messages")
        if not isinstance(source.get("sampling_params") or {}, dict):
            raise APIError(400, "data_source.sampling_params must be an object", param="data_source.sampling_params")
        for var in template.variables(json.dumps(messages.get("template", []))):
            if not var.startswith("item."):
                raise APIError(400, f"data_source.input_messages: {{{{{var}}}}} is not an item variable",
                               param="data_source.input_messages.template")
    return source


def run_rows(request: Request, key, source: dict, config: dict) -> list[dict]:
    """The run's rows as ``{"item", "sample"}``: inline content or the lines of an uploaded file, each with
    an object item holding the schema's required fields."""
    inner = source["source"]
    if inner["type"] == "stored_completions":
        raw, where = stored_rows(request, key, inner, config), "data_source.source"
    elif inner["type"] == "file_content":
        raw, where = inner.get("content") or [], "data_source.source.content"
        if not isinstance(raw, list):
            raise APIError(400, f"{where}: a list of rows is required", param=where)
    else:
        raw, where = _file_rows(request, key, inner.get("id")), "data_source.source.id"
    if not raw or len(raw) > MAX_ROWS:
        raise APIError(400, f"{where}: a run has 1 to {MAX_ROWS} rows, got {len(raw)}", param=where)
    required = (config.get("schema", {}).get("properties", {}).get("item") or {}).get("required") or []
    rows = []
    for n, row in enumerate(raw):
        label = f"{where}.{n}" if inner["type"] == "file_content" else f"{where} line {n + 1}"
        item = row.get("item") if isinstance(row, dict) and isinstance(row.get("item"), dict) else None
        if item is None:
            raise APIError(400, f"{label}: each row is {{\"item\": {{...}}, \"sample\": {{...}}}}", param=where)
        missing = [f for f in required if f not in item]
        if missing:
            raise APIError(400, f"{label}: the item lacks {missing}, required by the eval's item_schema", param=where)
        rows.append({"item": item, "sample": row.get("sample")})
    return rows


def stored_rows(request: Request, key, inner: dict, config: dict) -> list[dict]:
    """This key's stored completions selected by the eval's metadata and the run's (``metadata``, ``model``,
    ``created_after``, ``created_before``, ``limit``) as rows: the item what was asked and answered, the sample
    the stored answer (graded as it is by a ``jsonl`` run; a ``completions`` run asks its model again)."""
    from tunesmith.serve.api.stored_completions import CompletionStore

    limit = inner.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise APIError(400, "data_source.source.limit must be a positive integer", param="data_source.source.limit")
    wanted = {**(config.get("metadata") or {}), **(inner.get("metadata") or {})}
    found = CompletionStore(request.app.state.store).select(
        key, wanted, inner.get("model"), limit=min(limit or MAX_ROWS, MAX_ROWS),
        created_after=inner.get("created_after"), created_before=inner.get("created_before"))
    rows = []
    for row in found:
        message = row["completion"]["choices"][0]["message"]
        output = message.get("content") or json.dumps(message.get("tool_calls") or [])
        item = {"id": row["id"], "input": row["request"]["messages"], "output": output, "model": row["model"],
                "metadata": row["metadata"]}
        rows.append({"item": item, "sample": {"output_text": output}})
    return rows


def _file_rows(request: Request, key, file_id: str | None) -> list:
    f = request.app.state.store.get_file(file_id or "", key)
    if f is None:
        raise APIError(400, f"data_source.source.id: no file {file_id}", param="data_source.source.id")
    rows = []
    for n, line in enumerate(Path(f["storage"]).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise APIError(400, f"data_source.source.id: line {n} of {file_id} is not JSON",
                               param="data_source.source.id") from None
    return rows
