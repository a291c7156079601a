"""Graders on the server: checking a caller's grader (400 naming the field) and the grading context, whose
score_model / label_model graders ask a model this server serves, through its engine."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from fastapi import Request

from tunesmith.graders import Context, GraderError, ModelReply, check
from tunesmith.graders.spec import model_names
from tunesmith.serve.api.auth import visible_models
from tunesmith.serve.engines.interface import GenParams
from tunesmith.serve.errors import APIError

MAX_GRADER_TOKENS = 256  # a grading model's reply: a score or a label


def checked_grader(request: Request, key: str | None, grader: object, param: str = "grader") -> dict:
    """The grader, checked: a bad field, a python grader on a server that refuses them, or a grading model
    that is not served to this key is a 400 naming the field."""
    settings = request.app.state.settings
    try:
        grader = check(grader, param, allow_python=settings.python_graders_on)
    except GraderError as exc:
        raise APIError(400, str(exc), param=exc.param, code="invalid_grader") from None
    served = visible_models(request, key)
    for name in sorted(model_names(grader)):
        if name not in served:
            raise APIError(400, f"{param}: model '{name}' is not served here; a model grader asks one of: "
                           f"{', '.join(served)}", param=f"{param}.model", code="model_not_found")
    return grader


class ServedBackend:
    """Chat replies from the server's engine, asked from a worker thread (grading runs off the event loop)."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, timeout_s: float = 600.0, resolve=None):
        self.engine, self.loop, self.timeout_s = engine, loop, timeout_s
        self.resolve = resolve  # model -> whether it is served (a fine-tune loaded on first use), or None

    def chat_many(self, model: str, conversations: Sequence[list[dict]], sampling: dict) -> list[ModelReply]:
        if self.resolve is not None and not self.resolve(model):
            return [ModelReply(None, f"the model {model!r} is no longer served (deleted)")] * len(conversations)
        limit = sampling.get("max_completions_tokens") or sampling.get("max_completion_tokens") or MAX_GRADER_TOKENS
        params = GenParams(min(int(limit), self.engine.context_length), float(sampling.get("temperature") or 0.0),
                           float(sampling.get("top_p") or 1.0), (), sampling.get("seed"))

        async def ask_all():
            jobs = [self.engine.submit(model, self.engine.chat_prompt_ids(c), [params]) for c in conversations]
            return await asyncio.gather(*(j.results() for j in jobs), return_exceptions=True)

        answers = asyncio.run_coroutine_threadsafe(ask_all(), self.loop).result(self.timeout_s)
        return [ModelReply(None, f"{type(a).__name__}: {a}") if isinstance(a, BaseException)
                else ModelReply(a[0].text, None, a[0].prompt_tokens, a[0].completion_tokens) for a in answers]


def grading_context(request: Request, key: str | None) -> Context:
    """Model graders answered by the models served to ``key``; python graders under the server's limits."""
    return context_for(request.app, key, asyncio.get_running_loop())


def context_for(app, key: str | None, loop: asyncio.AbstractEventLoop) -> Context:
    """:func:`grading_context` of the server ``app`` for ``key``'s work (a request's, or a run taken over)."""
    models = app.state.models
    backend = ServedBackend(app.state.engine, loop, resolve=lambda model: models.resolve(model, key))
    return Context(backends=lambda model: backend, limits=app.state.settings.grader_limits)
