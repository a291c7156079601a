"""Running one eval run: its rows (a jsonl source), the samples (given in the rows, or answered by a model
this server serves from the run's ``input_messages`` template; a completions run over stored completions without
a model grades the stored answers as they are, and with a model and no template asks each stored request again),
every testing criterion graded over all rows in one batch, then OpenAI's counts and one output item per row.

A row passes when every criterion's reward reaches its ``pass_threshold`` (default: 1.0 for string_check
and label_model, whose rewards are 0 or 1; 0.5 for the others); it is ``errored`` when its sample could
not be produced or a grader could not grade it (a grader's error flags), else it fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tunesmith.graders import Context, grade_batch, template
from tunesmith.graders.model import ChatBackend, content_text
from tunesmith.serve.store.claims import ClaimLost

DEFAULT_PASS = {"string_check": 1.0, "label_model": 1.0}


def split_criterion(criterion: dict) -> tuple[dict, float]:
    """(the grader, its pass threshold) of a testing criterion."""
    grader = {k: v for k, v in criterion.items() if k != "pass_threshold"}
    threshold = criterion.get("pass_threshold")
    return grader, float(threshold if threshold is not None else DEFAULT_PASS.get(grader["type"], 0.5))


def sample_text(sample: dict | None) -> str | None:
    """The output text of a given sample: ``output_text``, or the last assistant message of ``output`` /
    ``choices`` (OpenAI's sample shapes); None when there is none."""
    if not isinstance(sample, dict):
        return None
    if isinstance(sample.get("output_text"), str):
        return sample["output_text"]
    for key in ("output", "choices"):
        for entry in reversed(sample.get(key) or []):
            message = entry.get("message", entry) if isinstance(entry, dict) else {}
            if isinstance(message.get("content"), str):
                return message["content"]
    return None


STORED_INPUT = {"type": "item_reference", "item_reference": "item.input"}  # a stored completion's own request


def prompt_messages(data_source: dict, item: dict) -> list[dict]:
    """The chat messages for one row: the template rendered with ``{{item.*}}``, or the item's own messages; a
    ``stored_completions`` source without ``input_messages`` asks each stored completion's own messages again."""
    spec = data_source.get("input_messages") or (
        STORED_INPUT if data_source["source"]["type"] == "stored_completions" else {})
    if spec.get("type") == "item_reference":
        ref = spec["item_reference"]
        value = template.lookup(ref if ref.startswith("item.") else f"item.{ref}", {}, item)
        return [{"role": m["role"], "content": content_text(m.get("content"))} for m in value]
    return [{"role": "system" if m.get("role") == "developer" else m.get("role", "user"),
             "content": template.render(content_text(m.get("content")), {}, item)} for m in spec.get("template", [])]




def _samples(run: dict, rows: list[dict], backend: ChatBackend) -> tuple[list[dict], list[str | None], dict]:
    """Each row's sample record (the output item's ``sample``), its text (None: errored) and the model usage."""
    source = run["data_source"]
    if source["type"] != "completions" or not source.get("model"):  # the rows' samples (stored answers) as they are
        texts = [sample_text(r.get("sample")) if r.get("sample") is not None else "" for r in rows]
        records = [_sample_record(run, [], t, None if t is not None else "the row's sample has no output_text "
                                  "(nor an assistant message in output or choices)") for t in texts]
        return records, texts, {}
    sampling = source.get("sampling_params") or {}
    conversations, errors = [], []
    for r in rows:
        try:
            conversations.append(prompt_messages(source, r["item"]))
            errors.append(None)
        except (LookupError, TypeError, ValueError, KeyError) as exc:
            conversations.append([])
            errors.append(f"input_messages: {exc}")
    asked = [k for k, e in enumerate(errors) if e is None]
    replies = backend.chat_many(run["model"], [conversations[k] for k in asked], sampling) if asked else []
    texts: list[str | None] = [None] * len(rows)
    records = [_sample_record(run, conversations[k], None, errors[k]) for k in range(len(rows))]
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "invocation_count": 0}
    for k, reply in zip(asked, replies, strict=True):
        texts[k] = reply.text
        records[k] = _sample_record(run, conversations[k], reply.text, reply.error, reply, sampling)
        usage["prompt_tokens"] += reply.prompt_tokens
        usage["completion_tokens"] += reply.completion_tokens
        usage["invocation_count"] += 1
    return records, texts, usage


def _sample_record(run: dict, messages: list[dict], text: str | None, error: str | None, reply=None,
                   sampling: dict | None = None) -> dict:
    """OpenAI's output item ``sample``."""
    sampling = sampling or {}
    prompt, completion = (reply.prompt_tokens, reply.completion_tokens) if reply else (0, 0)
    return {"input": messages, "output": [] if text is None else [{"role": "assistant", "content": text}],
            "finish_reason": "stop" if text is not None else "", "model": run["model"],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                      "cached_tokens": 0},
            "error": {"code": "sample_error", "message": error} if error else {"code": "", "message": ""},
            "temperature": float(sampling.get("temperature") or 0.0), "top_p": float(sampling.get("top_p") or 1.0),
            "seed": int(sampling.get("seed") or 0),
            "max_completion_tokens": int(sampling.get("max_completion_tokens") or 0)}


def execute(store, eval_: dict, run: dict, rows: list[dict], context: Context,
            cancelled: Callable[[], bool] = lambda: False) -> None:
    """Grade the run and record its items and counts; any failure marks the run failed with the reason. A run
    cancelled while it waited for its turn stays cancelled, and so does one cancelled while it runs: every change
    of status is made only from the status it expects (``EvalStore.move_run``), never over ``canceled``."""
    if cancelled():
        return
    try:
        if store.move_run(run["id"], ("queued",), status="in_progress"):
            _execute(store, eval_, run, rows, context, cancelled)
    except ClaimLost:
        raise  # another replica runs it now: nothing of this one's is written
    except Exception as exc:  # noqa: BLE001 - the run fails with the reason; the server goes on
        logging.getLogger("tunesmith.serve").exception("eval run %s failed", run["id"])
        store.move_run(run["id"], ("queued", "in_progress"), status="failed",
                       error={"code": "run_failed", "message": f"{type(exc).__name__}: {exc}"})


def _execute(store, eval_: dict, run: dict, rows: list[dict], context: Context, cancelled) -> None:
    records, texts, usage = _samples(run, rows, context.backends(run["model"]) if context.backends else None)
    if cancelled():
        return
    ok = [k for k, t in enumerate(texts) if t is not None]
    per_criterion, results = [], [[] for _ in rows]
    errored = {k for k, t in enumerate(texts) if t is None}
    for criterion in eval_["testing_criteria"]:
        grader, threshold = split_criterion(criterion)
        graded = grade_batch(grader, [texts[k] for k in ok], [rows[k]["item"] for k in ok], context) if ok else []
        passed = failed = 0
        for k, g in zip(ok, graded, strict=True):
            good = g.reward >= threshold and not g.errored
            errored |= {k} if g.errored else set()
            passed, failed = passed + good, failed + (not good and not g.errored)
            results[k].append({"name": grader["name"], "type": grader["type"], "score": g.reward, "passed": good,
                               "sample": None, "metadata": g.metadata, "sub_rewards": g.sub_rewards})
        per_criterion.append({"testing_criteria": grader["name"], "passed": passed, "failed": failed})
    items = []
    for k, row in enumerate(rows):
        status = "error" if k in errored else ("pass" if results[k] and all(r["passed"] for r in results[k]) else "fail")
        items.append({"item_index": k, "status": status, "datasource_item": row["item"], "results": results[k],
                      "sample": records[k]})
    store.add_output_items(run["id"], eval_["id"], items)
    counts = {"total": len(rows), "errored": len(errored), "passed": sum(i["status"] == "pass" for i in items),
              "failed": sum(i["status"] == "fail" for i in items)}
    model_usage = [] if not usage else [{"model_name": run["model"], "cached_tokens": 0,
                                         "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"], **usage}]
    store.move_run(run["id"], ("in_progress",), status="completed", result_counts=counts,
                   per_testing_criteria_results=per_criterion, per_model_usage=model_usage)
