"""The LoRA adapters of a vLLM server, loaded and unloaded by one background thread, never on the event loop.

``add`` records an adapter and queues its load (at a job's completion, a checkpoint's first request or the
server's start); a request for it waits until its load has ended (:meth:`AdapterLoader.wait`, bounded by the
request's deadline). A load vLLM refuses (a folder gone, a rank above ``--max-lora-rank``, an unsupported
method) marks that adapter failed: its requests get a 4xx naming the reason and every other model is served as
before. After vLLM restarts, ``reload`` marks every adapter pending again and queues them one by one; the server
is ready at once for the base model, and an adapter whose reload fails is dropped from vLLM and reported (its
model's error and the log).

vLLM serves adapters on the base model's linear layers but its output layer (:func:`lora_targets`: PEFT's
``all-linear``, what tunesmith's jobs train); an adapter with LoRA weights elsewhere is refused before vLLM sees it
(:func:`untargeted`), as vLLM would serve it without them in silence.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.serve.errors import APIError

log = logging.getLogger("tunesmith.serve")
POLL_S = 0.05  # how often a request waiting for its adapter looks again
RETRY_S = 1.0  # after vLLM did not answer a load (it is restarting), the next try


class Refused(Exception):
    """vLLM answered a load or unload with an error (its message)."""


class Unreachable(Exception):
    """vLLM did not answer (it died or is restarting)."""


@dataclass(eq=False)
class Adapter:
    path: str
    done: threading.Event = field(default_factory=threading.Event)  # the last load ended, loaded or refused
    error: str | None = None  # why the last load was refused


class AdapterLoader:
    """``post(action, body)`` sends ``/v1/{action}_lora_adapter`` to vLLM and raises :class:`Refused` or
    :class:`Unreachable`; ``ready`` is set while vLLM answers."""

    def __init__(self, post: Callable[[str, dict], None], ready: threading.Event, targets: tuple[str, ...] = ()):
        self.post, self.ready, self.targets = post, ready, targets
        self.adapters: dict[str, Adapter] = {}
        self.lock = threading.Lock()
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="tunesmith-vllm-adapters", daemon=True)
        self.thread.start()

    def add(self, name: str, path: str | Path) -> None:
        with self.lock:
            adapter = self.adapters[name] = Adapter(str(Path(path).resolve()))
        self.queue.put(("load", name, adapter))

    def remove(self, name: str, timeout: float = 60.0) -> None:
        """Stop serving ``name`` (requests for it are refused at once) and wait for vLLM's unload."""
        with self.lock:
            adapter = self.adapters.pop(name, None)
        if adapter is not None:
            unloaded = threading.Event()
            self.queue.put(("unload", name, unloaded))
            unloaded.wait(timeout)

    def reload(self) -> None:
        """After a restart: every adapter pending again and queued, in the order they were added."""
        with self.lock:
            snapshot = list(self.adapters.items())
            for _, adapter in snapshot:
                adapter.done.clear()
                adapter.error = None
        log.info("vLLM restarted: loading its %d adapter(s) again", len(snapshot))
        for name, adapter in snapshot:
            self.queue.put(("load", name, adapter))

    def failed(self) -> dict[str, str]:
        """The adapters vLLM refused, with why."""
        with self.lock:
            return {n: a.error for n, a in self.adapters.items() if a.done.is_set() and a.error}

    async def wait(self, name: str, model_id: str) -> None:
        """Return once ``name`` is loaded in vLLM; raise the model's error if vLLM refused it. Names that are not
        adapters (the base model) pass at once."""
        while (adapter := self.adapters.get(name)) is not None and not adapter.done.is_set():
            await asyncio.sleep(POLL_S)
        if adapter is not None and adapter.error:
            raise APIError(422, f"The model '{model_id}' could not be loaded into the inference engine (vLLM): "
                           f"{adapter.error}", param="model", code="model_load_failed")

    def stop(self) -> None:
        self.queue.put(None)

    # --- the loading thread --------------------------------------------------------------------

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            action, name, target = item
            try:
                self._do(action, name, target)
            except Exception:  # noqa: BLE001 - the thread must live on; the adapter is reported as failed
                log.exception("vLLM adapter %s of %s failed", action, name)
                if action == "load":
                    target.error = target.error or "an unexpected error (see the server's log)"
                    target.done.set()

    def _do(self, action: str, name: str, target) -> None:
        while True:
            self.ready.wait()
            if action == "load" and (self.adapters.get(name) is not target or target.done.is_set()):
                return  # removed or replaced meanwhile, or already loaded by an earlier queue entry
            try:
                if action == "load" and (why := untargeted(target.path, self.targets)):
                    raise Refused(why)
                if action == "load":
                    self.post("load", {"lora_name": name, "lora_path": target.path})
                else:
                    self.post("unload", {"lora_name": name})
            except Unreachable:
                time.sleep(RETRY_S)  # vLLM is restarting: its reload queues this adapter again
                if action == "load" and not self.ready.is_set():
                    return
                continue
            except Refused as exc:
                if action == "load":
                    target.error = str(exc)
                    log.warning("vLLM refused adapter %s (%s): %s; requests for it get this error", name,
                                target.path, exc)
            if action == "load":
                target.done.set()
            else:
                target.set()
            return


def lora_targets(folder: str) -> tuple[str, ...]:
    """The names of the base model's linear layers but its output layer, for vLLM's ``--lora-target-modules``
    (vLLM maps them onto its fused layers, ``q_proj`` onto ``qkv_proj``). Without it vLLM wraps the output layer for
    LoRA too, and its LoRA logits then fail any step that holds a prompt being scored beside another request (vLLM
    0.32 gives a scored prompt's positions one adapter index per request, not per position: "einsum(): subscript b
    has size 7 ... 26"), which kills vLLM's engine."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    output = model.get_output_embeddings()
    return tuple(sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not output}))


def untargeted(path: str, targets: tuple[str, ...]) -> str | None:
    """Why an adapter cannot be served whole here: LoRA weights on layers outside ``targets`` (an output layer,
    embeddings); None when every LoRA weight is on a target (or no targets are set)."""
    from safetensors import safe_open

    weights = Path(path) / "adapter_model.safetensors"
    if not targets or not weights.is_file():
        return None
    with safe_open(str(weights), framework="pt") as f:
        layers = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in f.keys() if ".lora_" in key}
    outside = sorted(layers - set(targets))
    if not outside:
        return None
    return (f"its LoRA weights on {outside} are outside the layers vLLM serves adapters on here ({', '.join(targets)}); "
            "train it on the linear layers of the model's blocks (target_modules all-linear)")
