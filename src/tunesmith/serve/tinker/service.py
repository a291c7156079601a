"""The Tinker API's state on one replica (``app.state.tinker``): the trainer with its resident base, the futures,
the sampling sessions, and the training runs this replica holds (each by a claim of its ``tinker_runs`` row, renewed
by the store's heartbeat; a run whose claim is lost is dropped here, and its client loads its last saved state).

Each operation runs in a lane thread (:mod:`tunesmith.serve.tinker.futures`) and returns what its future answers:
a dict (JSON) or bytes (protobuf, for forward_backward and sample)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tunesmith.serve.errors import APIError
from tunesmith.serve.lanes import all_cores
from tunesmith.serve.store import new_id
from tunesmith.serve.store.claims import Claim
from tunesmith.serve.store.objects import worker_id
from tunesmith.serve.tinker import wire
from tunesmith.serve.tinker.checkpoints import AUTOSAVE, Checkpoints
from tunesmith.serve.tinker.commands import Commands
from tunesmith.serve.tinker.futures import Fusing, Futures, Shared
from tunesmith.serve.tinker.losses import TrainingError, attach_sampler_logprobs, check_loss
from tunesmith.serve.tinker.pace import Pace
from tunesmith.serve.tinker.store import SESSION_ID, TinkerStore, checkpoint_path, run_name, run_session
from tunesmith.serve.tinker.trainer import PASS_TOKENS, Call, Trainer

log = logging.getLogger("tunesmith.serve")
IDLE_S = 3600.0  # a run with no call for this long is let go (its client loads its last saved state)
CALL_TOKENS = 65_536  # the tokens of one forward_backward call, over its datums
SESSIONS_PER_KEY = 1_000  # sampling sessions a key keeps; past it, its oldest is forgotten
CLIENT_SESSIONS_PER_KEY = 10_000  # client sessions a key keeps; past it, its oldest is forgotten (it takes no new run)
RECORDS_KEPT_S = 86_400.0  # a sample recorded for stable_reinforce is kept a day after its last use (the SDK's terms)
RECORDS_PER_KEY = 20_000  # sample requests a key keeps recorded; past it, its least recently used are forgotten


def every_core(fn, *args):
    """``fn(*args)`` with this thread's torch work on every core (the Tinker lane's thread, beside vLLM: no other team
    of torch threads in this process to slow)."""
    all_cores()
    return fn(*args)


def fb_tokens(args: tuple) -> int:
    """A forward_backward call's tokens (its ``(owner, body, backward, run_id)``), what decides whether it joins another key's
    step; a body that cannot be read counts as too large to join (it runs alone, and fails alone with its reason)."""
    try:
        return 0 if args[1] is None else wire.token_count(args[1])
    except wire.WireError:
        return 1 << 62


def targets_of(lora: dict) -> tuple[bool, bool, bool]:
    """A lora_config's (train_attn, train_mlp, train_unembed), the SDK's defaults where unset."""
    return (bool(lora.get("train_attn", True)), bool(lora.get("train_mlp", True)),
            bool(lora.get("train_unembed", True)))


class Tinker(Checkpoints):
    """The Tinker API's state and operations on one replica (its checkpoints': :class:`Checkpoints`)."""

    def __init__(self, app):
        settings = app.state.settings
        self.base = settings.model
        self.root = Path(settings.data_dir) / "tinker"
        self.store = TinkerStore(app.state.store)
        self.engine = app.state.engine  # where its sampler checkpoints are served
        self.trainer = Trainer(self.base, getattr(self.engine, "resident_base", None))  # the engine's base, shared
        fused = settings.tinker_fused_steps
        self.worker = worker_id()
        shared = None  # one SQLite server answers its own futures from memory
        if app.state.store.db.kind == "postgresql":  # replicas: futures written to the store for all of them
            shared = Shared(self.store, app.state.lanes.store, self.root, self.worker)
        fuse = {"forward_backward": Fusing(self.forward_backward_many, fb_tokens, PASS_TOKENS)} if fused else {}
        # a call's turn runs on the built-in engine's thread, on its OpenMP team and every core, the engine's rows
        # stepped at the call's turn points; beside vLLM (its own processes), on the lane's thread with every core
        run_beside = getattr(self.engine, "run_beside", None)
        self.futures = Futures(app.state.lanes.tinker, fuse=fuse, shared=shared,
                               runner=run_beside or every_core)
        step_between = getattr(self.engine, "step_between", lambda: False)
        # at a long call's turn points: the engine's rows stepped, and other keys' calls run
        self.between = lambda: step_between() | self.futures.others_turn()
        self.claims: dict[str, Claim] = {}  # run id -> this replica's claim of it
        self.owners: dict[str, str | None] = {}  # run id held here -> its key
        self.used: dict[str, float] = {}  # run id held here -> when it was last called (time.monotonic())
        self.quotas = settings.quotas
        self.max_tokens = settings.max_tokens
        self.call_seconds = float(settings.request_timeout_s)
        self.pace = Pace()
        # with replicas: every run's calls go through the store's command log to the run's holder
        self.commands = None if shared is None else Commands(self, shared)
        self.autosave_s = float(settings.tinker_autosave_s)
        self.saved: dict[str, float] = {}  # run id held here -> when its state was last saved on its own
        self.resume: dict[str, str] = {}  # run id taken over here -> what its calls are told until a state is loaded

    def start(self) -> None:
        """On the event loop, at the room's start: the command log's loop (with replicas)."""
        if self.commands is not None:
            self.commands.start()

    def close(self) -> None:
        """Every run held here let go (its row free again: another replica takes it over at its next call)."""
        if self.commands is not None:
            self.commands.close()
        for run_id, claim in list(self.claims.items()):
            self.store.base.claims.let_go(claim)
            self.claims.pop(run_id, None)

    # --- client sessions -----------------------------------------------------------------------------------

    def create_session(self, owner) -> dict:
        """A client session, made here and kept as the key's (its runs and sampling sessions are made in it)."""
        sid = new_id("session")
        self.store.add_session(sid, owner, CLIENT_SESSIONS_PER_KEY)
        return {"type": "create_session", "session_id": sid}

    def own_session(self, owner, session_id: str, live: bool = True) -> dict:
        """The client session ``session_id`` of ``owner``'s: a 404 for an unknown id or another key's (the same
        answer), a 410 when ``live`` and it was finished."""
        row = self.store.session(session_id, owner) if SESSION_ID.fullmatch(session_id) else None
        if row is None:
            raise APIError(404, f"No session {session_id[:64]!r} for this key (sessions are made by create_session).",
                           param="session_id", code="not_found")
        if live and row["finished_at"] is not None:
            raise APIError(410, f"Session {session_id} was finished; create a new ServiceClient.",
                           param="session_id", code="session_finished")
        return row

    # --- runs --------------------------------------------------------------------------------------------------

    def create_model(self, owner, session_id: str, seq: int, base_model: str, lora: dict | None,
                     metadata: dict | None) -> dict:
        self.own_session(owner, session_id)
        self.check_base(base_model)
        lora = lora or {"rank": 32}
        if targets_of(lora)[2] and not self.engine.adapts_output_layer:
            raise TrainingError("lora_config.train_unembed: this server samples on vLLM, which serves LoRA on the "
                                "layers other than the output layer; create the training client with "
                                "train_unembed=False")
        run_id = run_name(session_id, seq)
        if self.store.get_run(run_id, owner) is not None:  # the SDK's retry of a call that was answered (anywhere)
            return {"model_id": run_id, "type": "create_model"}
        self.let_go_idle()
        held = sum(1 for o in self.owners.values() if o == owner)
        if self.quotas.tinker_runs is not None and held >= self.quotas.tinker_runs:
            raise TrainingError(f"this key holds {held} training runs here (at most {self.quotas.tinker_runs}, "
                                "--quota tinker_runs); close a ServiceClient whose runs are done (its runs are let go) "
                                f"or wait for one to be idle {IDLE_S / 60:.0f} minutes")
        self.check_run_memory(owner, lora)
        self._adapter(run_id, lora)
        try:  # the adapter first (a wrong lora_config writes no row), then its row, claimed
            _, claim = self.store.add_run(run_id, owner, self.worker, base_model, lora, metadata)
        except BaseException:
            self.trainer.drop(run_id)
            raise
        self._hold(run_id, owner, claim)
        self.autosave(owner, run_id, force=True)
        return {"model_id": run_id, "type": "create_model"}

    def _adapter(self, run_id: str, lora: dict) -> None:
        """The run's LoRA made on the trainer's base, as its ``lora_config`` says."""
        self.trainer.create(run_id, int(lora["rank"]), lora.get("seed"), *targets_of(lora))

    def _hold(self, run_id: str, owner, claim: Claim) -> None:
        """The run held here, ``owner``'s, by ``claim`` (dropped here when the claim is lost)."""
        self.owners[run_id], self.used[run_id] = owner, time.monotonic()
        self.claims[run_id] = claim
        claim.on_lost(lambda reason: self._lost(run_id))

    def _lost(self, run_id: str) -> None:
        self.claims.pop(run_id, None)
        self.owners.pop(run_id, None)
        self.used.pop(run_id, None)
        self.saved.pop(run_id, None)
        self.resume.pop(run_id, None)
        self.trainer.drop(run_id)

    def let_go(self, run_id: str) -> None:
        """A run no longer held here: its adapter and optimizer freed, its row's claim released."""
        claim = self.claims.get(run_id)
        if claim is not None:
            self.store.base.claims.let_go(claim)
        self._lost(run_id)

    def let_go_idle(self) -> list[str]:
        """The runs with no call for :data:`IDLE_S`, let go."""
        now = time.monotonic()
        idle = [r for r, at in list(self.used.items()) if now - at > IDLE_S]
        for run_id in idle:
            log.info("Tinker run %s idle for %.0f minutes: let go", run_id, IDLE_S / 60)
            self.let_go(run_id)
        return idle

    def check_run_memory(self, owner, lora: dict) -> None:
        """A TrainingError when a new run of ``lora`` would take the key's runs past its memory quota (each run's
        adapter, gradients and two AdamW moments, in float32)."""
        limit = self.quotas.tinker_memory_bytes
        if limit is None:
            return
        new = self.trainer.state_bytes(int(lora["rank"]), *targets_of(lora))
        held = sum(self.trainer.run_bytes(r) for r, o in list(self.owners.items()) if o == owner)
        if held + new > limit:
            raise TrainingError(f"lora_config.rank: a run of rank {lora['rank']} takes {new / 2**30:.2f} GiB (adapter, "
                                f"gradients and AdamW moments) beside this key's {held / 2**30:.2f} GiB of runs held; "
                                f"at most {limit / 2**30:.2f} GiB a key (--quota tinker_memory_bytes). Use a smaller "
                                "rank, or close a ServiceClient whose runs are done")

    def finish_session(self, owner, session_id: str) -> int:
        """A client closed its session: the session finished (it takes no new run) and the runs it made here let go;
        how many."""
        self.own_session(owner, session_id, live=False)
        self.store.finish_session(session_id, owner)
        mine = [r for r, o in list(self.owners.items()) if o == owner and run_session(r) == session_id]
        for run_id in mine:
            self.let_go(run_id)
        return len(mine)

    def context_length(self) -> int:
        """The base's context, in tokens (read from its config once loaded; its tokenizer's limit before)."""
        return self.trainer.context_length()

    def check_base(self, base_model: str) -> None:
        if base_model != self.base:
            raise TrainingError(f"base_model {base_model!r} is not served here; this server trains and samples "
                                f"{self.base!r}")

    def run(self, owner, run_id: str) -> dict:
        """The run ``run_id`` of ``owner``'s, wherever it is held; a 404 when the key has none of that id."""
        run = self.store.get_run(run_id, owner)
        if run is None:
            raise APIError(404, f"No training run {run_id!r} for this key.", code="not_found")
        return run

    def callable_run(self, owner, run_id: str) -> None:
        """A run a call may be sent to: the key's (a 404 otherwise), in a client session not finished (a 410)."""
        self.run(owner, run_id)
        self.own_session(owner, run_session(run_id))

    def run_of(self, owner, run_id: str, loads: bool = False) -> dict:
        """The run ``run_id`` of ``owner``, held here; a TrainingError saying why not, or, for a run taken over here,
        where to resume from until a call that ``loads`` a state."""
        run = self.run(owner, run_id)
        if run_id not in self.claims or run_id not in self.trainer.runs:
            raise TrainingError(f"training run {run_id!r} is not held by this replica (the replica that held it "
                                "stopped, it was idle an hour, or its session was closed); create a training client "
                                "from its last saved state")
        if run_id in self.resume and not loads:
            raise TrainingError(self.resume[run_id])
        self.used[run_id] = time.monotonic()
        return run

    # --- the command log (replicas) ------------------------------------------------------------------------

    def call_of(self, kind: str, owner, run_id: str, args: list, body: bytes | None) -> tuple:
        """What a run's call of ``kind`` runs, and its arguments (a forward_backward's: its body)."""
        if kind == "forward_backward":
            return self.forward_backward, (owner, body, True, run_id)
        fn = {"optim_step": self.optim_step, "save_weights": self.save_weights,
              "save_weights_for_sampler": self.save_for_sampler, "load_weights": self.load}[kind]
        return fn, (owner, run_id, *args)

    def autosave(self, owner, run_id: str, force: bool = False) -> None:
        """With replicas: the run's state saved as its ``autosave`` checkpoint when ``force`` or when the last such
        save is ``--tinker-autosave`` seconds old (what another replica resumes from should this one stop). A save
        that fails is said in the log; the call that asked goes on."""
        now = time.monotonic()
        if self.commands is None or (not force and now - self.saved.get(run_id, -1e18) < self.autosave_s):
            return
        try:
            self.save(owner, run_id, AUTOSAVE, "weights", True, {"step": str(self.trainer.runs[run_id].steps)},
                      own=True)
            self.saved[run_id] = now
        except (TrainingError, APIError, OSError) as exc:
            log.warning("Tinker run %s: its state was not saved on its own: %s", run_id, exc)

    def take_over(self, run_id: str, owner) -> bool:
        """A run nobody holds with calls waiting: its claim taken, its ``autosave`` state loaded, and its calls told
        to resume from that step until one loads a state; False when another replica took it first."""
        run = self.store.get_run(run_id, owner)
        if run is None or run_id in self.claims:
            return False
        claim = self.store.base.claims.acquire("tinker_runs", run_id, self.worker)
        if claim is None:
            return False
        path = checkpoint_path(run_id, "weights", AUTOSAVE)
        try:
            lora = run["lora"]
            self.check_run_memory(owner, lora)
            self._adapter(run_id, lora)
            saved = self.store.checkpoint(path, owner)
            if saved is not None and Path(saved["folder"]).is_dir():
                self.trainer.load_state(run_id, Path(saved["folder"]), True)
            else:
                path = None
        except BaseException:
            self.trainer.drop(run_id)
            self.store.base.claims.let_go(claim)
            raise
        step = self.trainer.runs[run_id].steps
        self.saved[run_id] = time.monotonic()  # the state it holds is its save
        self._hold(run_id, owner, claim)
        where = (f"its state saved after step {step} ({path})" if path else
                 "a new LoRA, as nothing of it was saved (the key's checkpoint quota was full)")
        load = (f"create a training client from that state (create_training_client_from_state_with_optimizer("
                f"{path!r}), or load it on this one) and go on from step {step}" if path else
                "create a training client from a state you saved, or load one on this client")
        self.resume[run_id] = (f"training run {run_id}: the replica that held it stopped or let it go, and another "
                               f"took it over from {where}; this call and any after that state were not applied: "
                               f"{load}")
        log.warning("Tinker run %s taken over here at step %d", run_id, step)
        return True

    def info(self, owner, run_id: str) -> dict:
        run = self.run(owner, run_id)
        from tunesmith.models.names import resolve

        return {"type": "get_info", "model_id": run_id, "is_lora": True, "lora_rank": run["lora"]["rank"],
                "model_name": run["base_model"],
                "model_data": {"arch": "causal_lm", "model_name": run["base_model"], "tokenizer_id": resolve(self.base)}}

    # --- training ----------------------------------------------------------------------------------------------

    def forward_backward(self, owner, body: bytes | None, backward: bool, run_id: str) -> bytes:
        answer = self.forward_backward_many([(owner, body, backward, run_id)])[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def forward_backward_many(self, items: list[tuple]) -> list[bytes | BaseException]:
        """Several keys' forward_backward calls (``(owner, body, backward, run_id)`` each) in one step on the base:
        each checked alone first (a wrong call fails alone, with its reason), the rest run together
        (:meth:`Trainer.forward_backward_many`). Each call's answer, or the exception it ends with, in order."""
        answers: list = [None] * len(items)
        calls, where = [], []
        for i, (owner, body, backward, run_id) in enumerate(items):
            try:
                calls.append(self._call(owner, body, backward, run_id))
                where.append(i)
            except (TrainingError, wire.WireError, APIError) as exc:
                answers[i] = exc
        if calls:
            try:
                started = time.monotonic()
                answered = self.trainer.forward_backward_many(calls, between=self.between)
                for i, (outputs, metrics) in zip(where, answered, strict=True):
                    answers[i] = wire.forward_backward_output(outputs, metrics)
                self.pace.record("forward_backward", time.monotonic() - started,
                                 sum(len(d.tokens) for c in calls for d in c.data))
            except Exception as exc:  # noqa: BLE001 - every call of the step ends with it
                for i in where:
                    answers[i] = exc
        return answers

    def _call(self, owner, body: bytes | None, backward: bool, run_id: str) -> Call:
        """One forward_backward request read and checked (its run held here, its size, its loss and inputs); a run
        taken over here says where to resume from first, its body read or not."""
        self.run_of(owner, run_id)
        if body is None:
            raise TrainingError("this forward_backward's data was lost before the replica holding its run read it "
                                "(its data folder is not shared?); send it again")
        request = wire.read_forward_backward(body)  # its model_id is run_id (the route read it from this body)
        tokens = sum(len(d.tokens) for d in request.data)
        if tokens > CALL_TOKENS:
            raise TrainingError(f"this call holds {tokens} tokens (at most {CALL_TOKENS} a call); split its data over "
                                "several forward_backward calls (gradients add up until optim_step)")
        self.pace.check("forward_backward", tokens, self.call_seconds, "data")
        longest = max((len(d.tokens) for d in request.data), default=0)
        if longest > self.context_length():
            raise TrainingError(f"a datum of {longest} tokens is longer than the model's context "
                                f"({self.context_length()})")
        check_loss(request.loss_fn, request.config, request.data, self.trainer.vocab_size())
        limit = self.quotas.tinker_memory_bytes
        if limit is not None and (need := self.trainer.call_bytes(request.model_id, request.data)) > limit:
            raise TrainingError(f"data: this call's passes over the base need about {need / 2**30:.2f} GiB of "
                                f"activations (its longest datum: {longest} tokens); at most {limit / 2**30:.2f} GiB a "
                                "key (--quota tinker_memory_bytes). Send shorter datums")
        if request.loss_fn == "stable_reinforce":
            recorded = self.store.samples(sorted({s.sequence_id.rpartition(":")[0] for d in request.data
                                                  for s in (*(d.input_spans or ()), *(d.target_spans or ()))}), owner,
                                       RECORDS_KEPT_S)
            session = run_session(request.model_id)
            for i, datum in enumerate(request.data):
                attach_sampler_logprobs(datum, recorded, session, f"data[{i}]")
        return Call(request.model_id, request.data, request.loss_fn, request.config,
                    backward and not request.forward_only)

    def optim_step(self, owner, run_id: str, adam: dict) -> dict:
        self.run_of(owner, run_id)
        metrics = self.trainer.optim_step(run_id, adam)
        self.autosave(owner, run_id)
        return {"type": "optim_step", "metrics": metrics}

    def save_weights(self, owner, run_id: str, name: str | None, overwrite: bool, metadata,
                     ttl_s: int | None) -> dict:
        """A training state the client saves (``save_state``)."""
        return self.save(owner, run_id, name, "weights", overwrite, metadata, ttl_s)

    def save_for_sampler(self, owner, run_id: str, name: str | None, metadata, ttl_s: int | None) -> dict:
        """Sampler weights the client saves; without a name (``save_weights_and_get_sampling_client``), with a
        sampling session of them."""
        answer = self.save(owner, run_id, name, "sampler_weights", False, metadata, ttl_s)
        if name is None:
            session = self.sampling_session(owner, run_session(run_id), None, answer["path"])
            answer |= {"sampling_session_id": session["sampling_session_id"]}
        return answer | {"type": "save_weights_for_sampler"}

    # --- sampling ----------------------------------------------------------------------------------------------

    def sampling_session(self, owner, session_id: str, base_model: str | None, model_path: str | None) -> dict:
        """A sampling session of the client session ``session_id`` (in the store: any replica samples from it)."""
        self.own_session(owner, session_id)
        if model_path is not None:
            self.sampler_checkpoint(owner, model_path)
        else:
            self.check_base(base_model or "")
        sid = new_id("sampler")
        self.store.add_sampling_session(sid, owner, session_id, model_path, SESSIONS_PER_KEY)
        return {"type": "create_sampling_session", "sampling_session_id": sid}

    def session_of(self, owner, sid: str) -> dict:
        """A sampling session of ``owner``'s; a 404 otherwise."""
        session = self.store.sampling_session(sid, owner)
        if session is None:
            raise APIError(404, f"No sampling session {sid!r} for this key (a key keeps its {SESSIONS_PER_KEY} newest).",
                           code="not_found")
        return session

    def weights_of(self, owner, request: dict) -> tuple[dict | None, dict | None]:
        """A sample request's weights: (its checkpoint's row, None: the base; its sampling session's row, None: none
        named), each the key's (a 404 otherwise)."""
        path, session = request.get("model_path"), None
        if (sid := request.get("sampling_session_id")) is not None:
            session = self.session_of(owner, sid)
            path = session["model_path"]
        elif path is None:
            self.check_base(request.get("base_model") or "")
        return (None if path is None else self.sampler_checkpoint(owner, path)), session

    def record_samples(self, owner, request: dict, sequences_id: str, want, sequences) -> None:
        """A sampled call's prompt and sequences recorded under ``sequences_id`` (sequence ``i`` is
        ``<sequences_id>:<i>``) for stable_reinforce, when it asks (``record_stability_info``)."""
        if request.get("record_stability_info"):
            self.store.add_samples(sequences_id, owner, want.session["session_id"], want.prompt,
                                   [{"tokens": q.tokens, "logprobs": q.logprobs} for q in sequences], RECORDS_KEPT_S,
                                   RECORDS_PER_KEY)
