"""Checking what an eval or a run is created with, before anything runs: every problem is a 400 naming the
field (``testing_criteria.1.operation``, ``data_source.source.content.3.item``) and saying what to send."""

from __future__ import annotations

import json

from fastapi import Request

from tunesmith.graders import template
from tunesmith.graders.spec import item_fields
from tunesmith.serve.api.auth import visible_models
from tunesmith.serve.errors import APIError
from tunesmith.serve.evals.grading import checked_grader
from tunesmith.serve.store.quotas import check_metadata
from tunesmith.serve.store.values import check_seed

MAX_ROWS = 10_000  # rows in one run
MAX_CRITERIA = 64  # testing criteria of one eval: each is graded on every row of every run
CRITERION_CHARS = 100_000  # one criterion as JSON: a judge's prompt and its labels fit many times over


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
        metadata = check_metadata(config.get("metadata"), "data_source_config.metadata")
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
        if (size := len(json.dumps(criterion))) > CRITERION_CHARS:
            raise APIError(400, f"{param} is {size:,} characters of JSON; a criterion holds at most "
                           f"{CRITERION_CHARS:,}. Shorten its prompt or references", param=param,
                           code="string_above_max_length")
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
    """A ``jsonl`` or ``completions`` source. A completions source with a ``model`` (served to this key) asks it
    each row's ``input_messages`` (over stored completions, by default each one's own request); without one, the
    rows' samples (stored answers) are graded as they are, as OpenAI's types allow."""
    kind = source.get("type")
    if kind not in ("jsonl", "completions"):
        raise APIError(400, f"data_source.type {kind!r} is not supported here; use 'jsonl' (rows with items and "
                       "samples) or 'completions' (a served model answers each item)", param="data_source.type")
    inner = source.get("source")
    if not isinstance(inner, dict) or inner.get("type") not in ("file_content", "file_id", "stored_completions"):
        raise APIError(400, "data_source.source.type must be 'file_content', 'file_id' or 'stored_completions'",
                       param="data_source.source.type")
    if inner["type"] == "stored_completions":
        stored_selection(inner)
    elif inner["type"] == "file_id" and not isinstance(inner.get("id"), str):
        raise APIError(400, "data_source.source.id must be the id of a file uploaded with purpose 'evals'",
                       param="data_source.source.id")
    if kind == "completions":
        _check_completions(request, key, source, inner)
    return source


def _check_completions(request: Request, key, source: dict, inner: dict) -> None:
    """A completions source's model, input_messages and sampling_params, each a 400 naming it when wrong."""
    if source.get("model") is None:
        for unused in ("input_messages", "sampling_params"):
            if source.get(unused) is not None:
                raise APIError(400, f"data_source.{unused} is used to ask data_source.model, which is not given; "
                               "name a served model, or leave it out to grade the rows' samples as they are",
                               param=f"data_source.{unused}")
        return
    served = visible_models(request, key)
    if source.get("model") not in served:
        raise APIError(400, f"data_source.model {source.get('model')!r} is not served here; one of: "
                       f"{', '.join(served)}", param="data_source.model", code="model_not_found")
    messages = source.get("input_messages")
    if messages is None and inner["type"] == "stored_completions":
        messages = {"type": "item_reference", "item_reference": "item.input"}  # each stored request, asked again
    if not isinstance(messages, dict) or messages.get("type") not in ("template", "item_reference"):
        raise APIError(400, "data_source.input_messages: a template of messages ({{item.*}} variables) or an "
                       "item_reference is required to ask data_source.model", param="data_source.input_messages")
    template_ok = isinstance(messages.get("template", []), list) and all(
        isinstance(m, dict) for m in messages.get("template", []))
    if not template_ok or not isinstance(messages.get("item_reference", ""), str):
        raise APIError(400, "data_source.input_messages: template is a list of messages {role, content}; "
                       "item_reference a string such as 'item.messages'", param="data_source.input_messages")
    if not isinstance(source.get("sampling_params") or {}, dict):
        raise APIError(400, "data_source.sampling_params must be an object", param="data_source.sampling_params")
    check_seed((source.get("sampling_params") or {}).get("seed"), "data_source.sampling_params.seed")
    for var in template.variables(json.dumps(messages.get("template", []))):
        if not var.startswith("item."):
            raise APIError(400, f"data_source.input_messages: {{{{{var}}}}} is not an item variable",
                           param="data_source.input_messages.template")


def run_rows(request: Request, key, source: dict, config: dict) -> list[dict]:
    """The run's rows as ``{"item", "sample"}``: inline content or the lines of an uploaded file, each with
    an object item holding the schema's required fields."""
    inner = source["source"]
    if inner["type"] == "stored_completions":
        raw, where = stored_rows(request.app.state.store, key, inner, config), "data_source.source"
    elif inner["type"] == "file_content":
        raw, where = inner.get("content") or [], "data_source.source.content"
        if not isinstance(raw, list):
            raise APIError(400, f"{where}: a list of rows is required", param=where)
    else:
        raw, where = _file_rows(request, key, inner.get("id")), "data_source.source.id"
    if not raw or len(raw) > MAX_ROWS:
        got = f"more than {MAX_ROWS:,}" if len(raw) > MAX_ROWS else "none"
        raise APIError(400, f"{where}: a run has 1 to {MAX_ROWS:,} rows, got {got}", param=where)
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


def stored_selection(inner: dict) -> dict:
    """The filters of a ``stored_completions`` source, each checked (a 400 naming ``data_source.source.<field>``)."""
    from tunesmith.serve.api.stored_completions import check_selection

    return check_selection(inner, "data_source.source")


def stored_rows(store, key, inner: dict, config: dict) -> list[dict]:
    """This key's stored completions selected by the eval's metadata and the run's (``metadata``, ``model``,
    ``created_after``, ``created_before``, ``limit``; at most :data:`MAX_ROWS`, read a page at a time so that only
    the rows made of them are held, never every stored row besides) as rows: the item what was asked and answered,
    the sample the stored answer (graded as it is unless a model answers again)."""
    from tunesmith.serve.api.stored_completions import CompletionStore

    picked = stored_selection(inner)
    wanted = {**(config.get("metadata") or {}), **picked["metadata"]}
    found = CompletionStore(store).walk(key, wanted, picked["model"], limit=min(picked["limit"] or MAX_ROWS, MAX_ROWS),
                                        created_after=picked["created_after"], created_before=picked["created_before"])
    rows = []
    for row in found:
        message = row["completion"]["choices"][0]["message"]
        output = message.get("content") or json.dumps(message.get("tool_calls") or [])
        item = {"id": row["id"], "input": row["request"]["messages"], "output": output, "model": row["model"],
                "metadata": row["metadata"]}
        rows.append({"item": item, "sample": {"output_text": output}})
    return rows


def _file_rows(request: Request, key, file_id: str | None) -> list:
    """The JSON lines of the key's evals file ``file_id`` (read a line at a time, at most one past :data:`MAX_ROWS`); a
    400 on ``data_source.source.id`` naming the line that is not UTF-8, not JSON or nested too deep (a file kept before
    those were checked at upload)."""
    from tunesmith.data.formats.json_lines import NotUTF8, json_line, utf8_lines

    where = "data_source.source.id"
    f = request.app.state.store.get_file(file_id or "", key)
    if f is None:
        raise APIError(400, f"{where}: no file {file_id}", param=where)
    if f["purpose"] != "evals":
        raise APIError(400, f"{where}: {file_id} was uploaded with purpose {f['purpose']!r}; a run reads a file "
                       "uploaded with purpose 'evals'", param=where, code="invalid_file_purpose")
    rows = []
    try:
        for n, line in utf8_lines(f["storage"]):
            if line.strip():
                row, why = json_line(line)
                if why:
                    raise APIError(400, f"{where}: line {n} of {file_id} is {why}", param=where,
                                   code="invalid_file_format")
                rows.append(row)
                if len(rows) > MAX_ROWS:  # too many: run_rows says so; the rest is not read
                    break
    except NotUTF8 as bad:
        raise APIError(400, f"{where}: {file_id} {bad}", param=where, code="invalid_file_format") from None
    return rows
