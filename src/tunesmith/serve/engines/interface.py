"""The inference-engine interface every room of the server calls: :class:`InferenceEngine` (the served model ids,
the tokenizer, ``run(plan)``), the :class:`Request` a submission returns (read back from the event loop as an async
stream of ``(choice index, Delta | Generation)``), and what it yields.

Two engines implement it: the builtin one (:class:`tunesmith.serve.engines.builtin.Engine`) and vLLM behind
tunesmith (:class:`tunesmith.serve.engines.vllm.engine.VllmEngine`). Both serve one base model, named LoRA
adapters, trained heads (always in-process) and aliases. ``run`` takes a request plan
(:class:`tunesmith.serve.plan.requests.RequestPlan`) and only reads it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from tunesmith.generation import BASE, GenParams, TokenLogprob

__all__ = ["BASE", "Delta", "GenParams", "Generation", "InferenceEngine", "Request", "TokenIds"]


@dataclass
class Delta:
    """Streamed text, with the logprobs entries of the tokens it carries (when asked)."""

    text: str
    logprobs: list[dict] | None = None


@dataclass
class TokenIds:
    """A generation as token ids, for a trainer (the Tinker API's ``sample``), not as text: ``tokens`` generated, the
    stop token that ended it last; ``logprobs`` each one's (before any sampling setting, as a training forward computes
    it), when asked; ``prompt`` each prompt token's after the first, its top alternatives as ids, when asked."""

    tokens: list[int]
    logprobs: list[float] | None = None
    prompt: list[TokenLogprob] | None = None


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    logprobs: list[dict] | None = None  # OpenAI's chat ``logprobs.content`` entries, when asked and served
    end: dict | None = None  # the entry of the end of sequence that ended the answer (completions list it, chat not)
    prompt_logprobs: list[dict] | None = None  # one entry per prompt token, when asked: the first's logprob None
    ids: TokenIds | None = None  # the generation as token ids, when asked (``submit(token_ids=True)``)


class Request:
    """The ``n`` generations of one API request, read from the event loop that submitted them."""

    def __init__(self, n: int, loop: asyncio.AbstractEventLoop):
        self.n, self.loop = n, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.on_cancel: list = []  # callables run once on cancel (an engine's in-flight HTTP calls)

    def push(self, index: int, item) -> None:
        """Called by the engine thread: a text delta, the final Generation, or an exception."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))
        except RuntimeError:  # the loop is gone: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        """Stop generating for this request; its rows leave the batch before the next step."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            for hook in self.on_cancel:
                hook()

    async def events(self) -> AsyncIterator[tuple[int, str | Generation]]:
        finished = 0
        while finished < self.n:
            i, item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield i, item
            finished += isinstance(item, Generation)

    async def results(self) -> list[Generation]:
        out: list[Generation | None] = [None] * self.n
        async for i, item in self.events():
            if isinstance(item, Generation):
                out[i] = item
        return out  # type: ignore[return-value]


class InferenceEngine:
    """What the routes call: the served model ids (base, adapters, heads, aliases), prompt tokenization with
    the base model's tokenizer, and ``submit``. Subclasses load and unload adapters and generate."""

    base_name: str
    tokenizer: object
    context_length: int
    adapts_output_layer: bool = True  # serves a LoRA of the output layer (lm_head): the Tinker SDK's train_unembed

    def __init__(self, base: str):
        from tunesmith.models.loading import load_tokenizer

        self.base_name = base
        self.tokenizer = load_tokenizer(base)
        # The served names are read from any thread without a lock (the event loop lists them while a worker thread
        # loads or deletes a fine-tune), so each mapping is copy on write: replaced whole under ``models_lock``,
        # never changed in place, and a reader iterates a dict that no thread changes.
        self.models_lock = threading.RLock()
        self.adapters: dict[str, str] = {}
        self.heads: dict[str, object] = {}  # model id -> HeadPredictor (classifier, regression, span heads)
        self.aliases: dict[str, str] = {}  # a name scripts use (gpt-4o-mini-2024-07-18) -> a served model id

    def resident_base(self):
        """The base's module tree holding this engine's own weights in this process, for the Tinker trainer (one base
        in memory), with its placement; None where the weights live in another process (vLLM)."""
        return None

    # --- models ---------------------------------------------------------------------------

    def model_ids(self) -> list[str]:
        adapters, heads, aliases = self.adapters, self.heads, self.aliases  # each a snapshot no thread changes
        return [self.base_name, *adapters, *heads, *aliases]

    def add_alias(self, name: str, target: str) -> None:
        """Answer requests for ``name`` with the served model ``target`` (the base or an adapter)."""
        from tunesmith.errors import ConfigError

        with self.models_lock:
            if target not in (self.base_name, *self.adapters):
                raise ConfigError(f"--model-alias {name}={target}: {target} is not served here; name the base model "
                                  f"({self.base_name}) or an --adapter name")
            self.aliases = {**self.aliases, name: target}

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Serve a LoRA adapter under ``name`` (the model id clients ask for); a trained head folder is
        loaded beside the base model and answers through :mod:`tunesmith.serve.engines.heads`. Threads adding
        the same fine-tune at once load it once."""
        from tunesmith.serve.engines.heads import is_head_folder, load_head

        with self.models_lock:
            if is_head_folder(path):
                if name not in self.heads:
                    self.heads = {**self.heads, name: load_head(path, self.base_name)}
                return
            if name not in self.adapters:
                self._load_adapter(name, str(path))
                self.adapters = {**self.adapters, name: str(path)}

    def remove_adapter(self, name: str) -> bool:
        """Stop serving a fine-tune (a deleted model); False when it was not loaded."""
        with self.models_lock:
            if name in self.heads:
                self.heads = {k: v for k, v in self.heads.items() if k != name}
                return True
            if name not in self.adapters:
                return False
            self._unload_adapter(name)
            self.adapters = {k: v for k, v in self.adapters.items() if k != name}
            return True

    def served_name(self, model_id: str) -> str:
        """The base or adapter a request for ``model_id`` (maybe an alias) is answered by."""
        return self.aliases.get(model_id, model_id)

    # --- requests -------------------------------------------------------------------------

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def _load_adapter(self, name: str, path: str) -> None:
        raise NotImplementedError

    def _unload_adapter(self, name: str) -> None:
        raise NotImplementedError

    def json_constraint(self, spec: dict | str):
        """What ``submit(constraint=...)`` takes to decode every choice under ``spec``: a JSON schema, or a Lark
        grammar in llguidance's syntax (both engines decode with llguidance). Called off the event loop."""
        raise NotImplementedError

    def run(self, plan, tenant: str | None = None, background: bool = False) -> list[Request]:
        """One request per prompt of the plan, each with the plan's ``n`` choices, constraint and logprobs;
        ``tenant``: the caller (its API key) whose rows share the engine fairly with other callers';
        ``background``: a batch's line, decoded in its tenant's share after interactive rows."""
        return [self.submit(plan.model, ids, plan.params, stream=plan.stream, constraint=plan.constraint,
                            logprobs=plan.logprobs, tenant=tenant, background=background,
                            prompt_logprobs=plan.prompt_logprobs) for ids in plan.prompts]

    def submit(self, model_id: str, prompt_ids: list[int], params: list[GenParams], stream: bool = False,
               constraint=None, logprobs: int | None = None, tenant: str | None = None,
               background: bool = False, prompt_logprobs: int | None = None, token_ids: bool = False) -> Request:
        """Queue one generation per ``params`` entry (the request's ``n`` choices); call from the event loop.
        ``logprobs``: the top alternatives to report per generated token (0: the chosen token's only), where
        the engine reports them; ``prompt_logprobs``: the same for every prompt token (the prompt scored, in the
        prefill's own pass; a choice of ``max_tokens`` 0 generates nothing). Each ``tenant`` decodes its fair share of every step
        (:mod:`tunesmith.serve.engines.shares`), not first come first served: a caller with hundreds of rows
        waiting does not queue another caller's row behind them, nor make its steps slow; ``background`` rows (a
        batch's lines) come after every interactive row, in their tenant's share. ``token_ids``: each Generation's
        ``ids`` too (:class:`TokenIds`: its tokens, and the logprobs asked, as ids and floats)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError
