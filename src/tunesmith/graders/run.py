"""Grading rows with any grader: ``grade`` for one, ``grade_batch`` for many (one model call, one python
process, one embedding batch per batch). Each row gets its reward and OpenAI's metadata: the error flags
of ``/v1/fine_tuning/alpha/graders/run``, its execution time, the scores read and the model tokens spent.
A row that cannot be graded has reward 0 and says why in its flags; nothing here raises for a row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tunesmith.graders import formula, model, pool, spec, template, text
from tunesmith.graders.sandbox import Limits, run_python

ERROR_FLAGS = ("formula_parse_error", "invalid_variable_error", "model_grader_parse_error",
               "model_grader_refusal_error", "model_grader_server_error", "other_error",
               "python_grader_runtime_error", "python_grader_server_error", "sample_parse_error",
               "truncated_observation_error", "unresponsive_reward_error")
DETAILS = ("model_grader_server_error_details", "python_grader_runtime_error_details", "python_grader_server_error_type")


@dataclass
class Context:
    """What graders may use: a chat backend per model name (score_model / label_model) and the python limits."""

    backends: Callable[[str], model.ChatBackend] | None = None
    limits: Limits = field(default_factory=Limits)


@dataclass
class Graded:
    """One row's result: the reward, OpenAI's metadata, the rewards of a multi grader's graders, and the
    tokens each grading model spent."""

    reward: float
    metadata: dict
    sub_rewards: dict[str, float] = field(default_factory=dict)
    usage: dict[str, dict] = field(default_factory=dict)

    @property
    def errored(self) -> bool:
        return any(self.metadata["errors"][f] for f in ERROR_FLAGS)


def no_errors() -> dict:
    return {**dict.fromkeys(ERROR_FLAGS, False), **dict.fromkeys(DETAILS)}


def _graded(grader: dict, reward: float = 0.0, seconds: float = 0.0, **flags) -> Graded:
    errors = no_errors() | flags
    return Graded(reward, {"name": grader.get("name", ""), "type": grader["type"], "errors": errors,
                           "execution_time": seconds, "scores": {}, "token_usage": None, "sampled_model_name": None})


def as_sample(output: str | dict) -> dict:
    """The ``sample`` namespace from a model's output text, or from a dict that already has ``output_text``."""
    if isinstance(output, dict):
        return template.sample_namespace(str(output.get("output_text", "")), output.get("output_json"))
    return template.sample_namespace(output)


def grade(grader: dict, sample: str | dict, item: dict, context: Context | None = None) -> tuple[float, dict]:
    """(reward, metadata) of one row; ``grader`` as checked by :func:`tunesmith.graders.spec.check`."""
    [g] = grade_batch(grader, [sample], [item], context)
    return g.reward, g.metadata


def grade_batch(grader: dict, samples: Sequence[str | dict], items: Sequence[dict],
                context: Context | None = None) -> list[Graded]:
    """Every row's :class:`Graded`, in order."""
    context = context or Context()
    samples = [as_sample(s) for s in samples]
    kind = grader["type"]
    if kind == "multi":
        return _multi(grader, samples, list(items), context)
    if kind == "python":
        return _python(grader, samples, items, context)
    if kind in spec.MODEL_TYPES:
        return _model(grader, samples, items, context)
    return _reference(grader, samples, items)


def _render_pair(grader: dict, sample: dict, item: dict) -> tuple[str, str] | Graded:
    try:
        return template.render(grader["input"], sample, item), template.render(grader["reference"], sample, item)
    except template.SampleNotJSON:
        return _graded(grader, sample_parse_error=True)
    except template.MissingVariable:
        return _graded(grader, invalid_variable_error=True)


def _reference(grader: dict, samples: list[dict], items: Sequence[dict]) -> list[Graded]:
    """string_check and text_similarity: rendered input against rendered reference."""
    start = time.perf_counter()
    pairs = [_render_pair(grader, s, i) for s, i in zip(samples, items, strict=True)]
    if grader["type"] == "text_similarity":  # no metric's cost is left to the caller's input
        pairs = [_graded(grader, other_error=True) if isinstance(p, tuple) and pool.too_long(*p) else p for p in pairs]
    ok = [k for k, p in enumerate(pairs) if isinstance(p, tuple)]
    if grader["type"] == "string_check":
        scores = [text.string_check(grader["operation"], *pairs[k]) for k in ok]
    elif grader["evaluation_metric"] == "cosine":
        scores = text.cosine([pairs[k][0] for k in ok], [pairs[k][1] for k in ok]) if ok else []
    else:
        try:
            scores = pool.similarities(grader["evaluation_metric"], [pairs[k] for k in ok]) if ok else []
        except pool.PoolError:
            pairs, ok, scores = [_graded(grader, other_error=True) for _ in pairs], [], []
    seconds = (time.perf_counter() - start) / max(1, len(pairs))
    out = [p if isinstance(p, Graded) else None for p in pairs]
    for k, score in zip(ok, scores, strict=True):
        out[k] = _graded(grader, float(score), seconds)
    return out  # type: ignore[return-value]


def _python(grader: dict, samples: list[dict], items: Sequence[dict], context: Context) -> list[Graded]:
    outcomes = run_python(grader["source"], list(zip(samples, items, strict=True)), context.limits)
    out = []
    for o in outcomes:
        if o.error is None:
            out.append(_graded(grader, o.reward, o.seconds))
        else:
            out.append(_graded(grader, 0.0, o.seconds, python_grader_runtime_error=True,
                               python_grader_runtime_error_details=o.error))
    return out


def _model(grader: dict, samples: list[dict], items: Sequence[dict], context: Context) -> list[Graded]:
    start = time.perf_counter()
    out: list[Graded | None] = [None] * len(samples)
    asks: list[tuple[int, list[dict]]] = []
    for k, (s, i) in enumerate(zip(samples, items, strict=True)):
        try:
            asks.append((k, model.conversation(grader, s, i)))
        except template.SampleNotJSON:
            out[k] = _graded(grader, sample_parse_error=True)
        except template.MissingVariable:
            out[k] = _graded(grader, invalid_variable_error=True)
    if asks:
        replies = _ask(grader, [c for _, c in asks], context)
        seconds = (time.perf_counter() - start) / len(asks)
        for (k, _), reply in zip(asks, replies, strict=True):
            out[k] = _from_reply(grader, reply, seconds)
    return out  # type: ignore[return-value]


def _ask(grader: dict, conversations: list[list[dict]], context: Context) -> list[model.ModelReply]:
    if context.backends is None:
        return [model.ModelReply(None, f"no model backend is configured for '{grader['model']}'")] * len(conversations)
    try:
        backend = context.backends(grader["model"])
        return backend.chat_many(grader["model"], conversations, grader.get("sampling_params") or {})
    except Exception as exc:  # noqa: BLE001 - a backend that fails is every row's server error, never a crash
        return [model.ModelReply(None, f"{type(exc).__name__}: {exc}")] * len(conversations)


def _from_reply(grader: dict, reply: model.ModelReply, seconds: float) -> Graded:
    if reply.text is None:
        g = _graded(grader, 0.0, seconds, model_grader_server_error=True,
                    model_grader_server_error_details=reply.error)
    else:
        reward, read = model.reward_of(grader, reply.text)
        g = _graded(grader, reward or 0.0, seconds, model_grader_parse_error=reward is None)
        g.metadata["scores"] = {"result": read, "reply": reply.text}
    tokens = reply.prompt_tokens + reply.completion_tokens
    g.metadata["token_usage"], g.metadata["sampled_model_name"] = tokens, grader["model"]
    g.usage = {grader["model"]: {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                                 "total_tokens": tokens, "cached_tokens": 0, "invocation_count": 1}}
    return g


def _multi(grader: dict, samples: list[dict], items: list[dict], context: Context) -> list[Graded]:
    """Each sub-grader over the batch, then ``calculate_output`` per row over their rewards."""
    start = time.perf_counter()
    subs = spec.sub_graders(grader)
    results = {name: grade_batch(sub, samples, items, context) for name, sub in subs.items()}
    tree = formula.parse(grader["calculate_output"], set(subs))
    out = []
    for k in range(len(samples)):
        rewards = {name: rows[k].reward for name, rows in results.items()}
        errors = no_errors()
        for rows in results.values():
            errors.update({f: True for f in ERROR_FLAGS if rows[k].metadata["errors"][f]})
            errors.update({d: rows[k].metadata["errors"][d] for d in DETAILS if rows[k].metadata["errors"][d]})
        try:
            reward = formula.evaluate(tree, rewards)
        except (ArithmeticError, ValueError, TypeError, RecursionError):  # e.g. log(0), a division by zero
            reward, errors["other_error"] = 0.0, True
        g = _graded(grader, reward, 0.0, **errors)
        g.sub_rewards, g.metadata["scores"] = rewards, dict(rewards)
        for rows in results.values():
            for name, used in rows[k].usage.items():
                total = g.usage.setdefault(name, dict.fromkeys(used, 0))
                for key, n in used.items():
                    total[key] += n
        out.append(g)
    seconds = (time.perf_counter() - start) / max(1, len(out))
    for g in out:
        g.metadata["execution_time"] = seconds
    return out
