"""The Tinker API's sampling, on the server's own inference engine: a ``sample`` call becomes ``num_samples`` rows of
the engine that answers the OpenAI routes (the builtin engine's continuous batching with per-row adapters, or vLLM
with ``--engine vllm``), admitted as the key's chat requests are: a place among its requests in flight (a 429 past
its limit, which the SDK retries), its tokens charged, and its fair share of every decoding step beside every other
key's rows. A sampler checkpoint is served by its ``tinker://`` path from the adapter registry the OpenAI side uses
(:class:`tunesmith.serve.api.served_models.ServedModels`: loaded once, evicted once, the key's own only).

Each sampled token's logprob is the one a training forward computes: ``log_softmax`` of the model's raw logits,
before temperature and top-k/top-p warp them (the engine reports logprobs so). The SDK's ``stop``: None, the model's
end of sequence; strings, those strings (no end token stops it); token ids, those tokens; ``[]``, only
``max_tokens``. The token that stopped a sequence is its last. Sample ``i`` of a seeded call draws with ``seed + i``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tunesmith.generation import GenParams
from tunesmith.serve.plan.prompts import outside_vocabulary
from tunesmith.serve.tinker.losses import TrainingError
from tunesmith.serve.tinker.wire import Sequence

DEFAULT_MAX_TOKENS = 16  # the SDK's SamplingParams leaves max_tokens unset: this many


@dataclass
class Want:
    """One sample call, read and checked: ``n`` rows after ``prompt`` from ``model`` (the base's name or a sampler
    checkpoint's ``tinker://`` path), with the prompt's logprobs and top-k alternatives when asked; ``session``: the
    sampling session it records its sequences under (None: none named)."""

    prompt: list[int]
    n: int
    params: list[GenParams]
    model: str
    prompt_logprobs: bool = False
    topk_prompt: int = 0
    session: dict | None = None

    @property
    def scored(self) -> int | None:
        """The prompt logprobs asked of the engine: with this many alternatives (None: the prompt is not scored)."""
        return self.topk_prompt if self.prompt_logprobs or self.topk_prompt else None

    @property
    def cost(self) -> int:
        """The tokens the call may cost, as a chat request's are charged: every row's prompt and its most tokens."""
        return self.n * (len(self.prompt) + self.params[0].max_tokens)


def gen_params(sampling: dict, n: int) -> list[GenParams]:
    """The SDK's ``sampling_params`` as the engine's settings of each of the ``n`` rows."""
    stop = sampling.get("stop")
    strings: tuple[str, ...] = ()
    ends: tuple[int, ...] | None = None  # None: the model's end of sequence
    if isinstance(stop, str):
        strings, ends = (stop,), ()
    elif stop is not None and all(isinstance(s, int) for s in stop):
        ends = tuple(stop)
    elif stop is not None:
        strings, ends = tuple(stop), ()
    seed = sampling.get("seed")
    base = GenParams(max_tokens=int(sampling.get("max_tokens") or DEFAULT_MAX_TOKENS),
                     temperature=float(sampling.get("temperature", 1.0)), top_p=float(sampling.get("top_p", 1.0)),
                     top_k=max(0, int(sampling.get("top_k", -1))), stop=strings, stop_token_ids=ends)
    return [replace(base, seed=None if seed is None else int(seed) + i) for i in range(n)]


def read_want(tinker, owner, request: dict) -> Want:
    """A sample request read and checked against its key (in the planning lane: it reads the store): its weights (a
    checkpoint or sampling session of this key's, or the base), its prompt against the engine's vocabulary and
    context, and ``max_tokens`` against the server's bound (``--max-tokens``)."""
    engine, max_tokens = tinker.engine, tinker.max_tokens
    ckpt, session = tinker.weights_of(owner, request)
    if request.get("record_stability_info") and session is None:
        raise TrainingError("record_stability_info needs a sampling client of a session (its records belong to "
                            "that session); create one with create_sampling_client or "
                            "save_weights_and_get_sampling_client")
    prompt = prompt_tokens(request["prompt"])
    vocab = len(engine.tokenizer)
    if (bad := outside_vocabulary(prompt, vocab)) is not None:
        raise TrainingError(f"prompt token {bad} ({prompt[bad]}) is not a token id of this model (0 to {vocab - 1})")
    n = int(request.get("num_samples", 1))  # 1..bodies.SAMPLES
    params = gen_params(request["sampling_params"], n)
    wanted = params[0].max_tokens
    if not 1 <= wanted <= max_tokens or len(prompt) + wanted > engine.context_length:
        raise TrainingError(f"sampling_params.max_tokens must be 1..{max_tokens} and fit the context "
                            f"({engine.context_length} tokens) after the prompt's {len(prompt)}")
    return Want(prompt, n, params, engine.base_name if ckpt is None else ckpt["path"],
                bool(request.get("prompt_logprobs")), int(request.get("topk_prompt_logprobs") or 0), session)


def prompt_tokens(model_input: dict) -> list[int]:
    """A ``ModelInput``'s tokens (text chunks only)."""
    tokens: list[int] = []
    for i, chunk in enumerate(model_input.get("chunks") or []):
        if chunk.get("type", "encoded_text") != "encoded_text":
            raise TrainingError(f"prompt.chunks[{i}] is {chunk.get('type')!r}; this server samples text only")
        tokens.extend(int(t) for t in chunk["tokens"])
    if not tokens:
        raise TrainingError("prompt is empty")
    return tokens


def submit(engine, want: Want, tenant):
    """The call's rows queued on the engine as ``tenant``'s (from the event loop): the engine's request."""
    return engine.submit(want.model, want.prompt, want.params, logprobs=0, tenant=tenant,
                         prompt_logprobs=want.scored, token_ids=True)


def sequences(generations) -> list[Sequence]:
    """The engine's generations as the SDK's sequences: tokens (the stop token last) and each one's logprob."""
    return [Sequence(g.ids.tokens, g.ids.logprobs, g.finish_reason == "stop") for g in generations]


def prompt_scores(want: Want, generation) -> tuple[list | None, tuple | None]:
    """The prompt's logprobs (None first: nothing comes before it) when asked, and its top-k ids and logprobs per
    position (a first row of zeros and NaN) when asked, from the engine's scored prefill."""
    entries = generation.ids.prompt or []
    lists = [None, *(e.logprob for e in entries)] if want.prompt_logprobs else None
    top = None
    if k := want.topk_prompt:
        ids = np.zeros((len(entries) + 1, k), np.int32)
        values = np.full((len(entries) + 1, k), np.nan, np.float32)
        for p, e in enumerate(entries, start=1):
            ids[p, :len(e.top)] = [i for i, _ in e.top]
            values[p, :len(e.top)] = [v for _, v in e.top]
        top = (ids, values)
    return lists, top
