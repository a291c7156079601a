"""Generation engine for the server: one base model, any number of named LoRA adapters, and
a background thread that batches requests arriving together.

Requests that can share a forward pass (greedy, or sampled with the same temperature/top_p
and no seed) are generated in one left-padded batch, even across adapters: PEFT routes each
row through its own adapter (``adapter_names``). A request with a seed, or a streamed one,
runs alone so that its result does not depend on its neighbours.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.generation import cut_at_stop, stop_ids

BASE = "__base__"


@dataclass(frozen=True)
class GenParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self) -> tuple | None:
        """Requests with equal keys may share a batch; None means 'run alone'."""
        if self.seed is not None:
            return None
        return ("greedy", self.stop) if self.greedy else ("sample", self.temperature, self.top_p, self.stop)


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass
class _Job:
    adapter: str
    prompt_ids: list[int]
    params: GenParams
    future: Future = field(default_factory=Future)
    stream: _Tagged | None = None


class _Tagged:
    """A job's stream that puts ``(index, item)`` on a queue shared by the choices of one request."""

    def __init__(self, merged: queue.Queue, index: int):
        self.merged, self.index = merged, index

    def put(self, item) -> None:
        self.merged.put((self.index, item))


class Engine:
    def __init__(self, base: str, adapters: dict[str, str | Path] | None = None, max_batch: int = 16,
                 wait_ms: float = 15.0, precision: str = "auto"):
        from tunesmith.machine.placement import pick_placement
        from tunesmith.models.loading import load_model, load_tokenizer

        self.base_name = base
        self.tokenizer = load_tokenizer(base)
        self.model = load_model(base, pick_placement(precision))
        self.adapters: dict[str, str] = {}
        self.max_batch, self.wait_s = max_batch, wait_ms / 1000
        self.lock = threading.Lock()
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.eos_ids = stop_ids(self.tokenizer, self.model)
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)
        self.worker = threading.Thread(target=self._loop, name="tunesmith-engine", daemon=True)
        self.worker.start()

    # --- models ---------------------------------------------------------------------------

    def model_ids(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Load a LoRA adapter under ``name`` (the model id clients ask for)."""
        from peft import PeftModel

        with self.lock:
            if name in self.adapters:
                return
            if not self.adapters:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            else:
                self.model.load_adapter(str(path), adapter_name=name)
            self.model.eval()
            self.adapters[name] = str(path)

    # --- requests -------------------------------------------------------------------------

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def submit(self, model_id: str, prompt_ids: list[int], params: GenParams) -> Future:
        job = _Job(BASE if model_id == self.base_name else model_id, prompt_ids, params)
        self.queue.put(job)
        return job.future

    def stream(self, model_id: str, prompt_ids: list[int], params: list[GenParams]) -> Iterator[tuple[int, str | Generation]]:
        """One streamed generation per ``params`` entry: yields ``(index, text delta)`` and, last for each
        index, ``(index, Generation)``; choices are generated one after another."""
        merged: queue.Queue = queue.Queue()
        adapter = BASE if model_id == self.base_name else model_id
        for i, p in enumerate(params):
            self.queue.put(_Job(adapter, prompt_ids, p, stream=_Tagged(merged, i)))
        finished = 0
        while finished < len(params):
            i, item = merged.get()
            if isinstance(item, BaseException):
                raise item
            yield i, item
            finished += isinstance(item, Generation)

    def close(self) -> None:
        self.queue.put(None)

    # --- the batching loop --------------------------------------------------------------------

    def _loop(self) -> None:
        held: list[_Job] = []
        while True:
            job = held.pop(0) if held else self.queue.get()
            if job is None:
                return
            batch = [job]
            key = job.params.batch_key()
            if key is not None and job.stream is None:
                deadline = time.monotonic() + self.wait_s
                while len(batch) < self.max_batch:
                    try:
                        nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if nxt is None:
                        self.queue.put(None)
                        break
                    if nxt.stream is None and nxt.params.batch_key() == key:
                        batch.append(nxt)
                    else:
                        held.append(nxt)
            try:
                if job.stream is not None:
                    self._run_stream(job)
                else:
                    for j, gen in zip(batch, self._run_batch(batch), strict=True):
                        j.future.set_result(gen)
            except BaseException as exc:  # noqa: BLE001 - every waiting request must hear about it
                for j in batch:
                    if j.stream is not None:
                        j.stream.put(exc)
                    elif not j.future.done():
                        j.future.set_exception(exc)

    def _generate_kwargs(self, params: GenParams, adapters: list[str], prompt_len: int) -> dict:
        kw = {"do_sample": not params.greedy, "eos_token_id": self.eos_ids, "pad_token_id": self.tokenizer.pad_token_id}
        if not params.greedy:
            kw |= {"temperature": params.temperature, "top_p": params.top_p, "top_k": None}
        if params.stop:  # stop generating as soon as a stop string appears (the text is cut in _finish)
            from transformers import StoppingCriteriaList

            kw["stopping_criteria"] = StoppingCriteriaList([_StopOnText(self.tokenizer, params.stop, prompt_len)])
        if self.adapters:
            kw["adapter_names"] = adapters
        return kw

    def _run_batch(self, batch: list[_Job]) -> list[Generation]:
        import torch

        tok = self.tokenizer
        tok.padding_side = "left"
        enc = tok.pad({"input_ids": [j.prompt_ids for j in batch]}, return_tensors="pt").to(self.model.device)
        params = batch[0].params
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with self.lock, torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=max(j.params.max_tokens for j in batch),
                **self._generate_kwargs(params, [j.adapter for j in batch], enc["input_ids"].shape[1]),
            )
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        return [self._finish(j, ids) for j, ids in zip(batch, new, strict=True)]

    def _finish(self, job: _Job, ids: list[int]) -> Generation:
        """Cut at EOS, the request's own max_tokens and its stop strings."""
        finish = "length"
        kept = []
        for t in ids[: job.params.max_tokens]:
            if t in self.eos_ids:
                finish = "stop"
                break
            kept.append(t)
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        cut = cut_at_stop(text, job.params.stop)
        if len(cut) < len(text):
            text, finish = cut, "stop"
        return Generation(text, len(job.prompt_ids), len(kept), finish)

    def _run_stream(self, job: _Job) -> None:
        import torch
        from transformers import TextIteratorStreamer

        tok = self.tokenizer
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        ids = torch.tensor([job.prompt_ids], device=self.model.device)
        if job.params.seed is not None:
            torch.manual_seed(job.params.seed)
        result: dict = {}

        def work():
            with self.lock, torch.inference_mode():
                result["out"] = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=job.params.max_tokens,
                    streamer=streamer, **self._generate_kwargs(job.params, [job.adapter], ids.shape[1]),
                )

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        sent = ""
        for piece in streamer:
            candidate = sent + piece
            cut = cut_at_stop(candidate, job.params.stop)
            if len(cut) < len(candidate):
                if len(cut) > len(sent):
                    job.stream.put(cut[len(sent):])
                break
            job.stream.put(piece)
            sent = candidate
        thread.join()
        job.stream.put(self._finish(job, result["out"][0, ids.shape[1]:].tolist()))


class _StopOnText:
    """Per-row stopping criterion: a row is done once its generated text contains a stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)

