"""Every field the official client's request types declare, per endpoint, and what this server does with it.

A field is honoured (it changes the answer as at OpenAI), accepted (an identifier or a hint that changes no
answer, such as ``user`` or ``prompt_cache_key``), or served only at some values: any other value is a 400 whose
``param`` names the field. A field in no table is refused as OpenAI refuses it ("Unrecognized request argument
supplied: …"). ``tests/test_request_fields.py`` walks the client's own request types, so a field the client adds
later fails that test until it is decided here; docs/serve.md shows these tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tunesmith.serve.errors import APIError


@dataclass(frozen=True)
class Rule:
    """``doc``: what the server does (the table's builtin column; ``vllm`` where that engine differs);
    ``serves``: which values are served (None: all that validate); ``why``: the 400's reason otherwise."""

    doc: str
    serves: Callable[[object], bool] | None = None
    why: str = ""
    vllm: str | None = None


def honoured(doc: str, vllm: str | None = None) -> Rule:
    return Rule(doc, vllm=vllm)


def accepted(doc: str) -> Rule:
    return Rule(f"accepted: {doc}")


def unset_only(why: str, also=()) -> Rule:
    """Served only when absent (or null, or one of ``also``: the values that ask for nothing)."""
    return Rule(f"400 unless {' or '.join(['null', *map(repr, also)])}: {why}",
                lambda v: v is None or v in also or (isinstance(v, (list, dict)) and not v), why)


SAMPLING = {
    "model": honoured("the base model, a fine-tune, a checkpoint or an alias"),
    "n": honoured("1 to 8 choices (seeds seed, seed+1, …)"),
    "seed": honoured("the same seed, the same sampled answer"),
    "stop": honoured("up to 4 stop strings"),
    "temperature": honoured("0 (greedy) to 2"),
    "top_p": honoured("nucleus sampling"),
    "frequency_penalty": honoured("OpenAI's formula, over the generated tokens"),
    "presence_penalty": honoured("OpenAI's formula, over the generated tokens"),
    "logit_bias": honoured("token id → bias from -100 to 100 (the served model's token ids)"),
    "stream": honoured("server-sent events"),
    "stream_options": honoured("include_usage (a last chunk with the usage); include_obfuscation"),
    "user": accepted("an end-user id; nothing is logged with it"),
}
CACHE_HINTS = {
    "prompt_cache_key": accepted("a caching hint; answers are the same without it"),
    "prompt_cache_retention": accepted("a caching hint; answers are the same without it"),
    "prompt_cache_options": accepted("a caching hint; answers are the same without it"),
    "safety_identifier": accepted("an end-user id; nothing is logged with it"),
    "service_tier": unset_only("one tier serves every request here", also=("auto", "default")),
}

CHAT: dict[str, Rule] = SAMPLING | CACHE_HINTS | {
    "messages": honoured("system, developer, user, assistant (with tool_calls) and tool messages; text parts"),
    "max_tokens": honoured("capped by the server's --max-tokens and the context left"),
    "max_completion_tokens": honoured("as max_tokens"),
    "logprobs": honoured("each generated token's log-probability (the model's, before sampling settings)"),
    "top_logprobs": honoured("0 to 20 alternatives per token"),
    "response_format": honoured("text; json_object; json_schema (strict: OpenAI's subset, else any schema the "
                                "decoder enforces): decoding is constrained to it", vllm="the same, through "
                                "vLLM's structured outputs"),
    "tools": honoured("function tools, in the prompt as the model was trained"),
    "tool_choice": honoured("none, auto, required or a named function (the last two decode under the schema)"),
    "parallel_tool_calls": honoured("false answers the first call only"),
    "metadata": honoured("up to 16 pairs, kept with a stored completion (filter chat.completions.list by them)"),
    "store": honoured("true: the request and its answer are kept for this key (chat.completions.list, retrieve, "
                      "update, delete, messages; Evals' stored_completions; a fine-tuning file)"),
    "audio": unset_only("the models here answer in text"),
    "modalities": unset_only("the models here answer in text", also=(["text"],)),
    "functions": unset_only("deprecated; send 'tools'"),
    "function_call": unset_only("deprecated; send 'tool_choice'"),
    "prediction": unset_only("predicted outputs are not served"),
    "reasoning_effort": unset_only("the models here do not reason before answering"),
    "verbosity": unset_only("the answer's length follows max_tokens", also=("medium",)),
    "web_search_options": unset_only("no web search here"),
    "moderation": unset_only("no moderation model runs here"),
}

COMPLETIONS: dict[str, Rule] = SAMPLING | {
    "prompt": honoured("a string, up to 32 strings, an array of token ids or up to 32 arrays of them (the served "
                       "model's ids, checked against its vocabulary); each prompt with n choices"),
    "max_tokens": honoured("default 16, capped by the server's --max-tokens and the context left; 0 with echo: the "
                           "prompt alone"),
    "logprobs": honoured("0 to 5 alternatives per token and the chosen one: tokens, token_logprobs, top_logprobs, "
                         "text_offset; the end of sequence that ended the answer listed last"),
    "echo": honoured("the prompt before the completion; with logprobs the prompt scored too (each token's logprob, "
                     "the first null; in the prefill's pass; not streamed)", vllm="the same, through vLLM's prompt "
                     "logprobs"),
    "best_of": Rule("400 unless equal to n: one generation per choice"),  # checked with n by the plan
    "suffix": unset_only("insertion is not served"),
}

RESPONSES: dict[str, Rule] = {k: SAMPLING[k] for k in ("model", "temperature", "top_p", "stream", "user")} | CACHE_HINTS | {
    "stream_options": honoured("include_obfuscation"),
    "input": honoured("a string or messages (text parts), function_call and function_call_output items"),
    "instructions": honoured("the system message (not carried over by previous_response_id, as at OpenAI)"),
    "max_output_tokens": honoured("capped by the server's --max-tokens and the context left"),
    "metadata": honoured("up to 16 pairs, returned and stored with the response"),
    "store": honoured("true (default): kept for previous_response_id; false: not kept"),
    "previous_response_id": honoured("continues a stored response of the same key"),
    "text": honoured("format text, json_object or json_schema (constrained as chat's response_format); "
                     "verbosity null or medium", vllm="the same, through vLLM's structured outputs"),
    "tools": honoured("function tools; other tool types are a 400"),
    "tool_choice": honoured("none, auto, required or a named function"),
    "parallel_tool_calls": honoured("false answers the first call only"),
    "max_tool_calls": honoured("the calls after this many are dropped"),
    "include": Rule("only message.output_text.logprobs (each output token's logprob)",
                    lambda v: v is None or set(v) <= {"message.output_text.logprobs"},
                    "only 'message.output_text.logprobs' can be included here"),
    "top_logprobs": honoured("0 to 20 alternatives per token, with include message.output_text.logprobs"),
    "truncation": unset_only("an input longer than the context is a 400, not truncated", also=("disabled",)),
    "background": unset_only("responses are answered in the request", also=(False,)),
    "background_options": unset_only("responses are answered in the request"),
    "conversation": unset_only("conversations are not stored here; use previous_response_id"),
    "context_management": unset_only("no context compaction here"),
    "prompt": unset_only("stored prompt templates are not served"),
    "reasoning": unset_only("the models here do not reason before answering"),
    "access_programs": unset_only("no access programs here"),
    "image": unset_only("no image generation here"),
    "moderation": unset_only("no moderation model runs here"),
}

EMBEDDINGS: dict[str, Rule] = {
    "model": honoured("a shipped encoder (all-MiniLM-L6-v2, multilingual-e5-small) or an alias"),
    "input": honoured("a string or up to 2048 strings"),
    "encoding_format": honoured("float or base64"),
    "dimensions": Rule("400 unless the encoder's own size: it cannot shorten its vectors"),  # checked in the route
    "user": accepted("an end-user id; nothing is logged with it"),
}

TABLES = {"chat.completions": CHAT, "completions": COMPLETIONS, "responses": RESPONSES, "embeddings": EMBEDDINGS}


def check_fields(table: dict[str, Rule], body) -> None:
    """400 on the first field of ``body`` (a pydantic request body) not in ``table``, or at a value not served."""
    sent = {k: getattr(body, k) for k in body.model_fields_set} | dict(body.model_extra or {})
    for name, value in sent.items():
        rule = table.get(name)
        if rule is None:
            raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name,
                           code="unrecognized_argument")
        if rule.serves is not None and not rule.serves(value):
            raise APIError(400, f"'{name}' is not supported here: {rule.why}.", param=name,
                           code="unsupported_parameter")


def markdown_tables() -> str:
    """The tables of docs/serve.md (between its request-fields markers): parameter, builtin, vLLM."""
    out = []
    for endpoint, table in TABLES.items():
        out += [f"**/v1/{endpoint.replace('.', '/')}**", "", "| parameter | builtin | vLLM |", "|---|---|---|"]
        for name in sorted(table):
            rule = table[name]
            out.append(f"| `{name}` | {rule.doc} | {rule.vllm or 'the same'} |".replace("\n", " "))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def refuse_unknown(doc: dict, known: set[str], param: str) -> None:
    """400 on the first key of an object-valued field (``response_format``, ``stream_options``…) not in ``known``."""
    for key in doc:
        if key not in known:
            raise APIError(400, f"Unrecognized argument supplied in {param}: {key}", param=f"{param}.{key}",
                           code="unrecognized_argument")
