"""The Tinker API's training: one resident copy of the served base model, each training run a LoRA adapter on it
(peft's named adapters), each with its own AdamW state. (Sampling runs on the server's inference engine:
:mod:`tunesmith.serve.tinker.sampling`.) With the builtin engine the base is the engine's own weights, frozen and
shared: the trainer wraps a second module tree over the same tensors (:meth:`Trainer.load`).

Every run of every key shares the base's weights in memory; their calls take turns on it, one at a time (a
``forward_backward`` of one run, then another's), a call's datums padded into shared passes; several runs' calls can
run as one step (:meth:`Trainer.forward_backward_many`, each row through its own run's adapter: one pass over the
base for all of them, :mod:`tunesmith.serve.tinker.stacked`). A long pass gives
other keys' calls their turn between two of its decoder layers, forward and backward (:meth:`Trainer._turns`), so a
key's small call waits about one layer of another key's largest datum, not its whole pass. Gradients of a run
accumulate over its ``forward_backward`` calls until its ``optim_step``. Losses: :mod:`tunesmith.serve.tinker.losses`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunesmith.serve.tinker.layers import head_apart, layer_names, layer_widths, lora_targets, turn_points
from tunesmith.serve.tinker.losses import TrainingError, check_loss, token_loss
from tunesmith.serve.tinker.stacked import Adapters, clipped, spans_of
from tunesmith.serve.tinker.wire import Datum

ADAM_DEFAULTS = {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0,
                 "grad_clip_norm": 0.0}


PASS_TOKENS = 1024  # padded tokens of one pass over the base (its logits: this many x the vocabulary, in float32)
HEAD_SLICE = 128  # positions of one slice of the output layer and its softmax in a pass that takes turns


@dataclass
class Call:
    """One forward_backward (or forward) call of a run: its datums, loss and whether its gradients are kept."""

    name: str
    data: list[Datum]
    loss_fn: str
    config: dict
    backward: bool


def chosen_logprobs(logits, targets):
    """Each position's logprob of its target: ``log_softmax`` of its logits in float32, read at the target."""
    import torch

    return torch.log_softmax(logits.float(), -1).gather(1, targets[:, None])[:, 0]


def passes(rows: list[tuple[int, int, Datum]], budget: int = PASS_TOKENS) -> list[list[tuple[int, int, Datum]]]:
    """``rows`` grouped into passes of at most ``budget`` padded tokens (a row longer than it goes alone), longest
    first so that rows of like length share a pass and little is padding."""
    out: list[list] = []
    for row in sorted(rows, key=lambda r: -len(r[2].tokens)):
        if out and (len(out[-1]) + 1) * len(out[-1][0][2].tokens) <= budget:
            out[-1].append(row)
        else:
            out.append([row])
    return out


@dataclass
class Run:
    name: str
    rank: int
    targets: list[str]
    optimizer: object
    steps: int = 0
    pending: int = 0  # forward_backward calls whose gradients wait for an optim_step
    extra: dict = field(default_factory=dict)


class Trainer:
    """The resident base and every run's adapter on it; each call holds :attr:`lock` (one at a time)."""

    def __init__(self, base: str, resident=None):
        self.base = base
        self.resident = resident  # () -> (module tree, placement) of the engine's base in this process, or None
        self.shares_base = False  # the base is the engine's weights (no copy of its own)
        self.lock = threading.RLock()  # re-entered by another key's call run between two passes (``between``)
        self.model = None  # the peft model once a run exists; the plain base before
        self.plain = None
        self.tokenizer = None
        self.head_apart = False  # the output layer runs apart from the decoder with the same logits (head_apart)
        self.runs: dict[str, Run] = {}
        self.adapters = Adapters()  # which runs' adapters the pass running now reads (peft's forward replaced)

    # --- the base ------------------------------------------------------------------------------------------

    def load(self) -> None:
        """The base, once (the first run), in the precision training takes on this machine (float32 on a CPU, bf16 on
        a GPU that has it): the serving engine's own weights when it holds them in this process in that precision, so
        one base sits in memory; else a copy of its own (an engine in another process, or one serving in another
        precision). The LoRA weights and their AdamW moments are float32 either way (peft's default)."""
        if self.plain is not None:
            return
        from tunesmith.machine.placement import pick_placement
        from tunesmith.models.loading import load_model, load_tokenizer

        placement = pick_placement()
        tree, served = (self.resident() if self.resident is not None else None) or (None, None)
        self.shares_base = tree is not None and (served.device, served.dtype) == (placement.device, placement.dtype)
        self.plain = tree if self.shares_base else load_model(self.base, placement)
        self.plain.eval()
        self.kinds = layer_names(self.plain)
        self.widths = layer_widths(self.plain)
        self.tokenizer = load_tokenizer(self.base)
        self.head_apart = head_apart(self.plain)

    def vocab_size(self) -> int:
        """The token ids the base's embeddings take (0 to this, exclusive)."""
        with self.lock:
            self.load()
        return self.plain.get_input_embeddings().num_embeddings

    def context_length(self) -> int:
        with self.lock:
            self.load()
        return int(getattr(self.plain.config, "max_position_embeddings", None) or self.tokenizer.model_max_length)

    def _add_adapter(self, name: str, config) -> None:
        from peft import get_peft_model

        if self.model is None:
            self.model = get_peft_model(self.plain, config, adapter_name=name)
            self.model.eval()
        else:
            self.model.add_adapter(name, config)
            self._active_exists()
        self.adapters.install(self.model)

    # --- memory -------------------------------------------------------------------------------------------

    def lora_params(self, rank: int, train_attn=True, train_mlp=True, train_unembed=True) -> int:
        """The parameters of a LoRA of ``rank`` on the layers these choices adapt: rank x (inputs + outputs) of each."""
        with self.lock:
            self.load()
            names = set(lora_targets(self.kinds, train_attn, train_mlp, train_unembed))
        return rank * sum(width for name, width in self.widths.items() if name in names)

    def state_bytes(self, rank: int, train_attn=True, train_mlp=True, train_unembed=True) -> int:
        """A run's memory in float32: its adapter, gradients and two AdamW moments."""
        return 16 * self.lora_params(rank, train_attn, train_mlp, train_unembed)

    def _numel(self, name: str) -> int:
        """The run's adapter parameters (0: no such run here)."""
        return sum(p.numel() for p in self._params(name)) if name in self.runs else 0

    def run_bytes(self, name: str) -> int:
        return 16 * self._numel(name)

    def checkpoint_bytes(self, name: str, with_optimizer: bool) -> int:
        """A checkpoint's size on disk, about: the adapter in float32, and its two AdamW moments with the optimizer."""
        return (12 if with_optimizer else 4) * self._numel(name) + 64 * 1024

    def token_bytes(self, rank: int) -> int:
        """Memory one token of a pass keeps for its backward: every layer's activations
        (:func:`tunesmith.machine.estimate.activation_floats`, measured on this architecture), the logits, their
        log-softmax and its gradient in float32; a fifth more for what the estimate leaves out."""
        from types import SimpleNamespace

        from tunesmith.machine.estimate import activation_floats

        with self.lock:
            self.load()
            config = self.plain.config
        hidden = config.hidden_size
        heads = getattr(config, "num_attention_heads", 1) or 1
        shape = SimpleNamespace(hidden=hidden, intermediate=getattr(config, "intermediate_size", 4 * hidden),
                                kv_dim=hidden // heads * (getattr(config, "num_key_value_heads", None) or heads))
        per_layer = activation_floats(shape, SimpleNamespace(adapter="lora", lora=SimpleNamespace(r=rank, dropout=0.0)))
        floats = config.num_hidden_layers * per_layer + 3 * self.plain.get_input_embeddings().num_embeddings
        return int(4 * floats * 1.2)

    def call_bytes(self, name: str, data: list[Datum]) -> int:
        """The activations of a call's largest pass (:func:`passes`: up to :data:`PASS_TOKENS` padded tokens, or one
        datum longer than that alone)."""
        lengths = [len(d.tokens) for d in data]
        run = self.runs.get(name)
        widest = max(min(sum(lengths), PASS_TOKENS), max(lengths, default=0))
        return widest * self.token_bytes(run.rank if run else 1)

    # --- runs -----------------------------------------------------------------------------------------------

    def create(self, name: str, rank: int, seed: int | None, train_attn=True, train_mlp=True,
               train_unembed=True) -> Run:
        """A new adapter ``name`` (LoRA of ``rank``, B at zero so the run starts at the base) and its optimizer."""
        import torch
        from peft import LoraConfig

        if not 1 <= rank <= 512:
            raise TrainingError(f"lora_config.rank must be 1..512, got {rank}")
        with self.lock:
            self.load()
            if name in self.runs:
                raise TrainingError(f"training run {name!r} exists; create a training client in a new session")
            targets = lora_targets(self.kinds, train_attn, train_mlp, train_unembed)
            if seed is not None:
                torch.manual_seed(seed)
            self._add_adapter(name, LoraConfig(r=rank, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
            params = [p for n, p in self.model.named_parameters() if f".{name}." in n]
            for p in params:
                p.requires_grad_(True)
            run = Run(name, rank, targets, torch.optim.AdamW(params, lr=ADAM_DEFAULTS["learning_rate"]))
            self.runs[name] = run
            return run

    def drop(self, name: str) -> None:
        with self.lock:
            if self.runs.pop(name, None) is not None and self.model is not None:
                self.model.delete_adapter(name)
                self._active_exists()

    def _active_exists(self) -> None:
        """peft leaves a deleted adapter active when it was the last one, and then fails on it (KeyError) in every
        later save: the active adapter is always one that exists (or, with none left, the next one added)."""
        left = list(self.model.peft_config)
        if left and self.model.active_adapter not in left:
            self.model.set_adapter(left[0])

    def _params(self, name: str) -> list:
        return [p for group in self.runs[name].optimizer.param_groups for p in group["params"]]

    # --- forward and backward -------------------------------------------------------------------------------

    def forward_backward(self, name: str, data: list[Datum], loss_fn: str, config: dict,
                         backward: bool) -> tuple[dict[str, list[np.ndarray]], dict[str, float]]:
        """Each datum's token logprobs and loss, their sum as ``loss:sum``; with ``backward``, the loss's gradients
        added to the run's (kept until :meth:`optim_step`)."""
        check_loss(loss_fn, config, data, self.vocab_size())
        return self.forward_backward_many([Call(name, data, loss_fn, config, backward)])[0]

    def forward_backward_many(self, calls: list[Call], between=None
                              ) -> list[tuple[dict[str, list[np.ndarray]], dict[str, float]]]:
        """Several runs' calls in one step: their datums padded into shared passes over the base, each row through its
        own run's adapter (:mod:`~tunesmith.serve.tinker.stacked`), one backward per pass; each run's gradients come
        from its own rows only. Answers in the order of ``calls``, each checked by the caller (:func:`check_loss`: the
        service checks each call alone, so that a wrong one fails alone). ``between()``, when given, runs after each
        pass but the last and between two decoder layers of each pass (other keys' calls take their turn there,
        :meth:`_turns`; it says whether any did)."""
        rows = [(i, k, datum) for i, call in enumerate(calls) for k, datum in enumerate(call.data)]
        logprobs: list[list] = [[None] * len(c.data) for c in calls]
        losses: list[list] = [[None] * len(c.data) for c in calls]
        with self.lock:
            for name in {c.name for c in calls}:
                if name not in self.runs:
                    raise TrainingError(f"training run {name!r} is not held here")
            chunks = passes(rows)
            for n, chunk in enumerate(chunks):
                with self._turns(calls, chunk, between) if between is not None else nullcontext() as turn:
                    self._pass(calls, chunk, logprobs, losses, turn)
                if between is not None and n + 1 < len(chunks):
                    between()
            for call in calls:
                if call.backward:
                    self.runs[call.name].pending += 1
        return [({"logprobs": logprobs[i], "elementwise_loss": losses[i]},
                 {"loss:sum": float(sum(float(x.sum()) for x in losses[i]))}) for i in range(len(calls))]

    def _pass(self, calls: list[Call], chunk: list[tuple[int, int, Datum]], logprobs, losses, turn=None) -> None:
        """One padded pass over ``chunk``'s rows (grouped by call, each group read through its run's adapter), their
        losses summed, one backward for the rows whose call asks it; ``turn``: other keys' turn (:meth:`_turns`)."""
        import torch

        chunk = sorted(chunk, key=lambda row: row[0])  # a call's rows together: one span of its run's (stable)
        width = max(len(d.tokens) for _, _, d in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (_, _, d) in enumerate(chunk):
            ids[r, :len(d.tokens)] = torch.tensor(d.tokens, dtype=torch.long)
            mask[r, :len(d.tokens)] = 1
        device = self.plain.get_input_embeddings().weight.device  # the base's (a GPU's when there is one)
        ids, mask = ids.to(device), mask.to(device)
        runs = [(calls[i].name, calls[i].backward) for i, _, _ in chunk]
        grad = any(learns for _, learns in runs)
        with torch.set_grad_enabled(grad):
            self._activate(calls, chunk)
            targets = [torch.tensor(np.asarray(d.inputs["target_tokens"], dtype=np.int64), device=device).reshape(-1)
                       for _, _, d in chunk]
            chosen = self._target_logprobs(ids, mask, runs, targets, turn)
            total = None
            for r, (i, k, d) in enumerate(chunk):
                logp = chosen[r]
                elementwise = token_loss(calls[i].loss_fn, logp, d.inputs, calls[i].config)
                if calls[i].backward:
                    total = elementwise.sum() if total is None else total + elementwise.sum()
                logprobs[i][k] = logp.detach().cpu().numpy()
                losses[i][k] = elementwise.detach().cpu().numpy()
            if grad and total is not None:
                if turn is not None:
                    turn()  # between the last slice's forward and the first backward
                total.backward()

    def _target_logprobs(self, ids, mask, runs: list[tuple[str, bool]], targets: list, turn) -> list:
        """Each row's logprob of each of its targets (row ``r`` through run ``runs[r]``'s adapter), read from the
        pass's real positions only (its padding never reaches the output layer) in one log-softmax and one gather, not
        one per row: a row's own slice of the logits costs its backward a zero-filled gradient of the whole pass's
        logits, rows x the logits in all. The output layer and its softmax run :data:`HEAD_SLICE` positions at a time
        with ``turn`` (a turn before each slice's forward and after its backward: over a long datum they are a pass's
        longest stretch without a decoder layer), else :data:`PASS_TOKENS` at a time (what bounds their memory)."""
        import torch

        real = mask.bool()
        lengths = [len(t) for t in targets]
        wanted = torch.cat(targets)
        rows = spans_of(runs, [1] * len(runs))
        if not self.head_apart:
            with self.adapters.reading(rows):
                logits = self.model(input_ids=ids, attention_mask=mask).logits
            return list(chosen_logprobs(logits[real], wanted).split(lengths))
        base = self.model.get_base_model()
        with self.adapters.reading(rows):
            hidden = base.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[real]
        positions = spans_of(runs, lengths)
        head = base.get_output_embeddings()
        size = HEAD_SLICE if turn is not None else PASS_TOKENS
        parts, stacked = [], {}  # the runs' output-layer adapters stacked once for the pass's slices
        for start in range(0, len(wanted), size):
            h = hidden[start:start + size]
            if turn is not None:
                turn()
                if h.requires_grad:
                    h.register_hook(turn)
            with self.adapters.reading(clipped(positions, start, start + size), stacked):
                parts.append(chosen_logprobs(head(h), wanted[start:start + size]))
        return list(torch.cat(parts).split(lengths))

    def _activate(self, calls: list[Call], chunk) -> None:
        """The adapters of the rows that learn trainable (peft freezes every adapter but its active one when a run is
        added: a call run in a turn may have made one)."""
        for name in {calls[i].name for i, _, _ in chunk if calls[i].backward}:
            for p in self._params(name):
                p.requires_grad_(True)

    @contextmanager
    def _turns(self, calls: list[Call], chunk, between):
        """During a pass: before the forward of each of the decoder layers' large parts (:func:`turn_points`), and
        after their backward (a hook on the gradient of their input), ``between()`` lets other keys' calls run on this
        thread, nested in the pass (the autograd engine runs a backward inside a backward, as reentrant checkpointing
        does; a call run so reads its own adapters' spans and pops them when it ends); when any did, the pass's
        learning adapters are made trainable again before it goes on. The layers of a call run in a turn give none.
        Not from another thread: a GPU's backward runs on the autograd engine's device thread, which must not take the
        trainer's lock."""
        thread, inside = threading.current_thread(), []  # inside: a turn runs (its calls' own layers give none)

        def turn(*_):
            if inside or threading.current_thread() is not thread:
                return
            inside.append(True)
            try:
                ran = between()
            finally:
                inside.clear()
            if ran:
                self._activate(calls, chunk)

        def before(module, args, kwargs):
            if inside:
                return
            turn()
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is not None and hidden.requires_grad:
                hidden.register_hook(turn)  # returns None: the gradient as it is

        handles = [point.register_forward_pre_hook(before, with_kwargs=True) for point in turn_points(self.model)]
        try:
            yield turn
        finally:
            for handle in handles:
                handle.remove()

    def optim_step(self, name: str, adam: dict) -> dict[str, float]:
        """One AdamW step of the run's accumulated gradients with the SDK's parameters, then the gradients cleared."""
        import torch

        params = {**ADAM_DEFAULTS, **adam}
        with self.lock:
            run = self.runs[name]
            trainable = self._params(name)
            grads = [p.grad for p in trainable if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
            if not np.isfinite(norm):  # never trained in: the gradients are dropped, the weights stay as they were
                run.optimizer.zero_grad(set_to_none=True)
                run.pending = 0
                raise TrainingError(f"the accumulated gradients are not finite (norm {norm}); they were dropped and "
                                    "the weights left as they were. Check the data of the forward_backward calls "
                                    "since the last optim_step (their losses are in their metrics)")
            if params["grad_clip_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(trainable, params["grad_clip_norm"])
            for group in run.optimizer.param_groups:
                group.update(lr=params["learning_rate"], betas=(params["beta1"], params["beta2"]), eps=params["eps"],
                             weight_decay=params["weight_decay"])
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.steps += 1
            run.pending = 0
        return {"grad_norm:mean": norm}

    # --- weights ----------------------------------------------------------------------------------------------

    def save_adapter(self, name: str, folder: Path) -> None:
        """The run's adapter as a peft folder: what both engines and ``tunesmith export`` load."""
        with self.lock:
            self.model.save_pretrained(str(folder), selected_adapters=[name], save_embedding_layers=False)
        nested = folder / name  # peft nests a non-default adapter's files under its name
        if nested.is_dir():
            for f in nested.iterdir():
                f.replace(folder / f.name)
            nested.rmdir()

    def save_state(self, name: str, folder: Path) -> None:
        """The adapter and its optimizer's state (for ``load_state_with_optimizer``)."""
        import torch

        self.save_adapter(name, folder)
        with self.lock:
            run = self.runs[name]
            torch.save({"optimizer": run.optimizer.state_dict(), "steps": run.steps}, folder / "optimizer.pt")

    def load_state(self, name: str, folder: Path, optimizer: bool) -> None:
        """The run's adapter weights (and its optimizer's state, when asked and saved) from a saved state."""
        import torch
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(folder / "adapter_model.safetensors"))
        with self.lock:
            set_peft_model_state_dict(self.model, weights, adapter_name=name)
            run = self.runs[name]
            if optimizer:
                if not (folder / "optimizer.pt").is_file():
                    raise TrainingError("this checkpoint holds no optimizer state; load it without the optimizer")
                state = torch.load(folder / "optimizer.pt", weights_only=True)
                run.optimizer.load_state_dict(state["optimizer"])
                run.steps = state["steps"]

