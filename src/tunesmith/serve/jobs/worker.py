"""The fine-tuning jobs worker: runs queued jobs one at a time with the same trainer as
``tunesmith train``, reporting metrics events and checkpoints to the store.

It is a separate process (``python -m tunesmith.serve.jobs.worker``), started by ``tunesmith serve``.
A job left 'running' by a crash or SIGKILL is picked up first and resumed from its newest recorded
checkpoint; events carry step-based dedup keys, so replayed steps add nothing twice. Cancel and
pause are flags in the store that the trainer checks after every step.

A job is claimed (:mod:`tunesmith.serve.store.claims`): each claim is a new generation, whose attempt trains in a
folder of its own (``runs/<job>/attempt-<generation>``), and every store write it makes (status, events, steps,
checkpoints, the result file) is fenced by that generation. A worker that loses its claim (frozen past its lease, or
cut off from the database that long) stops at its next step and writes nothing more; the job goes on from the last
checkpoint its store recorded, wherever it is claimed next. A database error never fails a job by itself, and never
ends the worker.
"""

from __future__ import annotations

import base64
import csv
import io
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

from tunesmith.errors import DataError, TunesmithError
from tunesmith.serve.engines.process import SHUTDOWN, end_worker_process, start_worker_process
from tunesmith.serve.jobs import reinforcement
from tunesmith.serve.jobs.autohyper import LR_BASE, resolve_hyperparameters, with_hyperparameters
from tunesmith.serve.jobs.events import announce_integrations, estimated_finish, mark_full_validation
from tunesmith.serve.jobs.store import JobStore
from tunesmith.serve.store import Store, worker_id
from tunesmith.serve.store.claims import Claim, ClaimLost, Fenced
from tunesmith.serve.store.database import DatabaseError, database_url, transient

log = logging.getLogger("tunesmith.worker")


CHECKPOINTS_PER_JOB = 10  # a kill loses at most a tenth of the job; saving more often costs time
EVAL_MAX_EXAMPLES = 50  # validation conversations scored after training (generation is the slow part)


def read_chat_rows(path: Path, file_id: str) -> list[dict]:
    """OpenAI chat JSONL → conversation rows, every weight-1 assistant turn a target
    (:mod:`tunesmith.data.formats.chat_rows`). Errors name the file id and line (the path is the server's business)."""
    from tunesmith.data.formats.chat_rows import read_chat_file

    return read_chat_file(path, file_id)


def trained_tokens(path: Path, kind: str, model: str, epochs: int) -> int:
    """OpenAI's count: the tokens of every example as written in the file (the cookbook's message rule:
    3 per message, role, content and name, +3 for the reply; a DPO example counts its input and both
    outputs), times the epochs. A template's default system prompt is not in the file and is not counted."""
    from tunesmith.data.formats.validate import token_counter, validate_chat, validate_dpo, validate_reinforcement

    validate = {"dpo": validate_dpo, "reinforcement": validate_reinforcement}.get(kind, validate_chat)
    v = validate(path, token_counter(model))
    return epochs * sum(v.tokens)


def count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def job_recipe(job: dict, root: Path, hyper: dict, training_path: Path, n_examples: int, has_validation: bool = False,
               attempt: int | None = None):
    """The recipe the job trains with: into ``runs/<job>/attempt-<attempt>`` (an attempt's own folder: a worker that
    lost its claim writes nowhere its successor reads), or ``runs/<job>`` without an attempt."""
    import tunesmith.kinds  # noqa: F401 - registers the task kinds the schema checks
    import tunesmith.train  # noqa: F401 - registers the training methods (their shapes and trainers)
    from tunesmith.config import UNMEASURED_LENGTH, validate_recipe

    steps = math.ceil(n_examples / hyper["batch_size"]) * hyper["n_epochs"]
    train = {"epochs": hyper["n_epochs"], "batch_size": hyper["batch_size"], "logging_steps": 1,
             "max_seq_length": UNMEASURED_LENGTH,  # a job's rows are not a recipe's examples: not measured
             "learning_rate": LR_BASE * hyper["learning_rate_multiplier"], "save_total_limit": 3,
             "save_steps": max(1, math.ceil(steps / CHECKPOINTS_PER_JOB))}
    if job["method"]["type"] == "dpo":  # TRL's DPO reads OpenAI's preference format from the uploaded file
        train |= {"method": "dpo", "dpo": {"beta": hyper["beta"], "path": str(training_path)}}
    if job["method"]["type"] == "reinforcement":  # GRPO with the job's grader as the reward
        train |= reinforcement.train_section(job["method"], hyper, has_validation)
    where = {"name": job["id"], "output_dir": str(root / "runs")} if attempt is None else \
        {"name": f"attempt-{attempt}", "output_dir": str(root / "runs" / job["id"])}
    return validate_recipe({**where, "seed": job["seed"],
                            "model": {"name": job["model"]}, "train": train})


def job_callback(store: JobStore, job_id: str, model_name: str, claim: Claim | None = None):
    """Metrics events, checkpoint rows and the cancel/pause check after every step; with the job's ``claim``, the
    training stops (saving nothing) at the first step after the claim is lost."""
    from transformers import TrainerCallback

    from tunesmith.train.metrics import REWARD

    class _JobEvents(TrainerCallback):
        stopped_for: str | None = None
        stopped_at: int = 0
        last_metrics: dict = {}

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            data = {"step": state.global_step, "total_steps": state.max_steps}
            if "loss" in logs:
                data |= {"train_loss": logs["loss"], "train_mean_token_accuracy": logs.get("mean_token_accuracy")}
            if "eval_loss" in logs:
                data |= {"valid_loss": logs["eval_loss"], "valid_mean_token_accuracy": logs.get("eval_mean_token_accuracy")}
            data |= reinforcement.reward_metrics(logs)
            if len(data) == 2:
                return
            # a step's validation pass is logged after its training entry: its checkpoint carries both
            self.last_metrics = (self.last_metrics | data) if self.last_metrics.get("step") == data["step"] else data
            parts = [f"{k.replace('_', ' ')}={data[k]:.4f}" for k in ["train_loss", "valid_loss", *REWARD]
                     if data.get(k) is not None]
            kind = "train" if "train_loss" in data else "valid"
            store.add_event(job_id, f"Step {state.global_step}/{state.max_steps}: " + ", ".join(parts), "metrics", data,
                            dedup_key=f"metrics:{kind}:{state.global_step}")

        def on_save(self, args, state, control, **kw):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            store.add_checkpoint(job_id, state.global_step, self.last_metrics, str(path), model_name)
            store.add_event(job_id, f"Checkpoint created at step {state.global_step}", dedup_key=f"ckpt:{state.global_step}")

        def on_train_begin(self, args, state, control, **kw):
            self.clock = (time.time(), state.global_step)

        def on_step_end(self, args, state, control, **kw):
            store.update_job(job_id, estimated_finish=estimated_finish(*self.clock, state.global_step, state.max_steps))
            job = store.get_job(job_id, any_owner=True)
            reason = "shutdown" if SHUTDOWN.is_set() else job and job["control"]
            if claim is not None and (claim.lost.is_set() or not holds(claim, job)):
                reason = "lost"
            if reason in ("cancel", "pause", "shutdown", "lost"):
                self.stopped_for = reason
                self.stopped_at = state.global_step
                control.should_training_stop = True
                control.should_save = reason not in ("cancel", "lost")  # a paused or stopped job resumes from here

    return _JobEvents()


def holds(claim: Claim, job: dict | None) -> bool:
    """Whether the job's row still carries ``claim`` (its generation and holder)."""
    return job is not None and job.get("generation") == claim.generation and job.get("claimed_by") == claim.holder


def job_device(recipe) -> tuple[str, str]:
    """The device and dtype the job trains on here."""
    from tunesmith.machine.placement import pick_placement

    placement = pick_placement(recipe.model.precision, recipe.model.device)
    return placement.device, placement.dtype


def within_gpu_share(recipe, gpu_budget_gb: float | None):
    """On a GPU shared with vLLM: the job planned and held to the jobs' share, refused (with the numbers) when
    even its smallest micro-batch does not fit there."""
    from tunesmith.serve.engines.gpu_split import check_job_fits, hold_job_to

    device, dtype = job_device(recipe)
    if gpu_budget_gb is None or device != "cuda":
        return recipe
    check_job_fits(recipe, gpu_budget_gb, device, dtype)
    return hold_job_to(recipe, gpu_budget_gb)


def run_job(store: JobStore, job: dict, gpu_budget_gb: float | None = None, claim: Claim | None = None) -> None:
    """The job trained and its result recorded through ``store`` (with a ``claim``: the store fenced by it, and the
    attempt in the claim's generation's folder)."""
    from rich.console import Console

    from tunesmith.progress import task_bar

    root = store.root
    files = {k: store.get_file(job[k], job["owner"]) for k in ("training_file", "validation_file") if job[k]}
    for key, f in files.items():
        if f is None:
            raise DataError(f"{key.replace('_', ' ')} {job[key]} no longer exists (it was deleted after the job was "
                            "created); upload it again and create a new job")
    training_path = Path(files["training_file"]["storage"])
    kind = job["method"]["type"]

    def read(param: str) -> list[dict]:
        path = Path(files[param]["storage"])
        return reinforcement.read_rows(path) if kind == "reinforcement" else read_chat_rows(path, job[param])

    rows = [] if kind == "dpo" else read("training_file")
    val_rows = read("validation_file") if "validation_file" in files and kind != "dpo" else []
    n_examples = count_lines(training_path)
    hyper = resolve_hyperparameters(job["method"], n_examples)
    store.update_job(job["id"], method=with_hyperparameters(job["method"], hyper))
    attempt = claim.generation if claim is not None else None
    recipe = within_gpu_share(job_recipe(job, root, hyper, training_path, n_examples, bool(val_rows), attempt),
                              gpu_budget_gb)
    name = job["fine_tuned_model"] or f"ft:{job['model']}:{job['suffix'] or 'tunesmith'}:{job['id']}"
    start = continued_from(store, job)
    resume = announce_start(store, job, recipe.run_dir / "train" / "checkpoints")
    announce_integrations(store, job)
    store.update_job(job["id"], status="running", run_dir=str(recipe.run_dir), fine_tuned_model=None)
    callback = job_callback(store, job["id"], name, claim)
    console = Console(file=io.StringIO())
    train_job(recipe, rows, val_rows, callback, resume, lambda d, t: task_bar(console, d, t), start)
    if callback.stopped_for == "lost":
        raise ClaimLost(f"job {job['id']}: claim lost at step {callback.stopped_at}")
    if callback.stopped_for == "cancel":
        store.update_job(job["id"], status="cancelled", control=None, finished_at=int(time.time()))
        store.add_event(job["id"], "Job cancelled", dedup_key="cancelled")
        return
    if callback.stopped_for == "pause":
        store.update_job(job["id"], status="paused", control=None)
        store.add_event(job["id"], "Job paused", dedup_key=f"paused:{time.time():.0f}")
        return
    if callback.stopped_for == "shutdown":  # stays 'running': the next worker resumes it first
        store.add_event(job["id"], f"The server stopped; the job was saved at step {callback.stopped_at} and resumes "
                        "from there when the server starts again", dedup_key=f"shutdown:{time.time():.0f}")
        return
    if val_rows and kind != "reinforcement":  # a reinforcement job's validation rewards are in its metrics
        mark_full_validation(store, job["id"], callback.last_metrics)
        evaluate_job(store, job["id"], recipe, val_rows)
    from tunesmith.train.metrics import read_metrics_csv

    metrics = read_metrics_csv(recipe.run_dir / "train" / "metrics.csv")
    result = store.add_file(job["owner"], "step_metrics.csv", "fine-tune-results", results_file(metrics))
    tokens = trained_tokens(training_path, job["method"]["type"], job["model"], hyper["n_epochs"])
    store.update_job(job["id"], status="succeeded", fine_tuned_model=name, finished_at=int(time.time()),
                     trained_tokens=tokens, result_files=[result["id"]], control=None)
    store.add_event(job["id"], f"New fine-tuned model created: {name}", dedup_key="model")
    store.add_event(job["id"], "The job has successfully completed", dedup_key="succeeded")


def announce_start(store: JobStore, job: dict, checkpoints: Path) -> bool | Path:
    """Say how the job starts and supersede step events a restart will report again; returns the checkpoint to resume
    from (False: from the start). It is the newest checkpoint the store recorded whose folder is complete (another
    attempt's: each attempt trains in its own folder), else the newest complete one in ``checkpoints`` (a job an
    earlier version left running)."""
    from tunesmith.train.resume import complete_checkpoint

    recorded = [Path(c["path"]) for c in store.checkpoints(job["id"]) if (Path(c["path"]) / "trainer_state.json").is_file()]
    found = recorded[0] if recorded else complete_checkpoint(checkpoints) if checkpoints.is_dir() else None
    resume_step = int(found.name.split("-")[1]) if found is not None else 0
    store.supersede_steps(job["id"], after=resume_step)
    if resume_step:
        store.add_event(job["id"], f"Fine-tuning job resumed from its checkpoint at step {resume_step}",
                        dedup_key=f"resumed:{job.get('generation') or time.time():.0f}")
    elif job["status"] == "running":  # picked up after a crash or a stop before its first checkpoint
        store.add_event(job["id"], "Fine-tuning job restarted from step 0: the server stopped before the first "
                        "checkpoint", level="warn", dedup_key=f"restarted:{job.get('generation') or time.time():.0f}")
    else:
        store.add_event(job["id"], "Fine-tuning job started", dedup_key="started")
    return found if resume_step else False


def evaluate_job(store: JobStore, job_id: str, recipe, val_rows: list[dict]) -> None:
    """Base vs fine-tuned on the validation conversations → ``eval/report.html``, announced by an event.

    The trained model is the job's result: an evaluation failure is reported as a warning event,
    and the job still succeeds.
    """
    from rich.console import Console

    from tunesmith.eval.runner import evaluate_conversations

    n = min(len(val_rows), EVAL_MAX_EXAMPLES)
    store.add_event(job_id, f"Evaluating the base and fine-tuned models on {n} validation conversations",
                    dedup_key="eval-started")
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"max_examples": n})})
    from tunesmith.data.formats.chat_rows import last_turn_pair

    try:
        run = evaluate_conversations(recipe, [last_turn_pair(r) for r in val_rows], Console(file=io.StringIO()))
    except Exception as exc:  # noqa: BLE001 - the model is trained; a failed report must not fail the job
        store.add_event(job_id, f"Evaluation failed: {type(exc).__name__}: {exc}"[:500], level="warn", dedup_key="eval-failed")
        return
    metrics = {r.name: {k: r.metrics.get(k) for k in ("chrf", "rouge_l", "exact", "mean_loss")} for r in run.results}
    summary = ", ".join(f"{name} chrF {m['chrf']:.1f} (exact {m['exact']:.0%})" for name, m in metrics.items()
                        if m.get("chrf") is not None)
    store.add_event(job_id, f"Evaluation report written: {summary}", "message",
                    {"report": f"/v1/fine_tuning/jobs/{job_id}/report", "metrics": metrics}, dedup_key="eval-report")


def continued_from(store: JobStore, job: dict) -> tuple[Path, bool] | None:
    """For a job created from one of its key's fine-tunes: the folder of that fine-tune's adapter and whether it is
    merged into the base first (DPO: its reference model must be the fine-tune it continues, not the bare base),
    said in the job's events; None for a job from the base model."""
    parent = job.get("parent_model")
    if not parent:
        return None
    found = store.fine_tune(parent, job["owner"])
    if found is None:
        raise DataError(f"the model this job continues, {parent}, no longer exists (deleted after the job was "
                        "created); create the job from another model")
    merged = job["method"]["type"] == "dpo"
    how = ("its adapter merged into the base model first (DPO's reference is the model it continues), then a new "
           "adapter trains") if merged else "its LoRA adapter trains on from where it ended"
    store.add_event(job["id"], f"Continuing from {parent}: {how}", dedup_key="continued")
    return found[1], merged


def train_job(recipe, rows, val_rows, callback, resume, bar, start: tuple[Path, bool] | None = None):
    """The job's training through the one dispatcher (chat rows as uploaded, or DPO pairs), from the base model or
    from the fine-tune it continues (``start``: its adapter folder and whether it is merged first)."""
    from rich.console import Console

    from tunesmith.train.jobs import TrainData, train

    init, merged = start if start else (None, False)
    return train(recipe, TrainData(rows=rows, val_rows=val_rows), Console(file=io.StringIO()), bar,
                 resume=resume, callbacks=[callback], init_adapter=init, init_merged=merged)


def results_file(rows: list[dict]) -> bytes:
    """The step metrics CSV, base64-encoded as OpenAI returns a job's result file."""
    from tunesmith.train.metrics import COLUMNS, REWARD

    fields = COLUMNS + [c for c in REWARD if any(r.get(c) is not None for r in rows)]  # reinforcement: the rewards
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: "" if r.get(c) is None else (int(r[c]) if c == "step" else r[c]) for c in fields})
    return base64.b64encode(buf.getvalue().encode())


def job_error(exc: Exception, store: JobStore, job: dict) -> dict:
    """The error a client sees: our own errors with file ids in place of server paths; anything else
    is a server_error whose detail stays in the worker's log."""
    if isinstance(exc, TunesmithError):
        message = str(exc)
        for key in ("training_file", "validation_file"):
            f = job[key] and store.get_file(job[key], job["owner"])
            if f:
                message = message.replace(f["storage"], job[key])
        message = message.replace(str(store.root.resolve()), "").replace(str(store.root), "")
        return {"code": "invalid_training_file" if isinstance(exc, DataError) else "training_failed",
                "message": message[:2000], "param": "training_file" if isinstance(exc, DataError) else None}
    log.error("job %s failed", job["id"], exc_info=exc)
    return {"code": "server_error", "message": "The job failed because of an error on the server; its log has "
            "the details.", "param": None}


@contextmanager
def engine_of(vllm_endpoint: Path | None, jobs_engine: str = "auto"):
    """Where a job's generation goes when the server runs vLLM: there (``vllm``), in the job's process
    (``builtin``), or for each use the engine measured faster on this device (``auto``: the server's vLLM offered,
    :func:`tunesmith.generation.remote.offering`)."""
    from tunesmith.generation import remote

    if vllm_endpoint is None or jobs_engine == "builtin":
        yield
        return
    server = remote.CompletionsServer.from_file(vllm_endpoint)
    with remote.using(server) if jobs_engine == "vllm" else remote.offering(server):
        yield


READS = frozenset({"get_job", "get_file", "fine_tune", "checkpoints", "events"})  # a job's reads, never fenced


def run_or_fail(store: JobStore, job: dict, gpu_budget_gb: float | None = None, claim: Claim | None = None) -> None:
    """Run one job; a failure is reported on the job (status, error, event) and goes no further. With its ``claim``
    every write is fenced by it; a claim lost on the way ends the attempt, saying so, and fails nothing."""
    fenced = Fenced(store, claim, READS) if claim is not None else store
    try:
        try:
            run_job(fenced, job, gpu_budget_gb, claim)
        except ClaimLost:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed job is reported on the job, the worker goes on
            error = job_error(exc, fenced, job)
            fenced.update_job(job["id"], status="failed", finished_at=int(time.time()), control=None, error=error)
            fenced.add_event(job["id"], f"Fine-tuning job failed: {error['message'][:500]}", level="error",
                             dedup_key="failed")
    except ClaimLost as lost:
        said_lost(store, job, claim, lost)


def said_lost(store: JobStore, job: dict, claim: Claim | None, lost: ClaimLost) -> None:
    """A lost claim said in the log and, when the database answers, in the job's events (the one event a holder that
    lost its claim writes: it changes nothing of the work)."""
    generation = claim.generation if claim is not None else 0
    reason = claim.reason if claim is not None and claim.reason else str(lost)
    log.warning("job %s: attempt %d stopped: %s", job["id"], generation, reason)
    try:
        store.add_event(job["id"], f"Attempt {generation} of this job stopped: {reason}. The job goes on from its last "
                        "recorded checkpoint in its next attempt.", level="warn", dedup_key=f"lost:{generation}")
    except Exception:  # noqa: BLE001 - the database still unreachable: the log has said it
        log.info("job %s: the lost claim could not be written to its events", job["id"])


def work(root: Path, poll_s: float = 0.5, once: bool = False, jobs_per_key: int = 1,
         gpu_budget_gb: float | None = None, vllm_endpoint: Path | None = None, jobs_engine: str = "auto") -> None:
    """Run jobs until SIGTERM (or until the queue is empty with ``once``). Each job is claimed in the store and its
    claim renewed while it runs, so that on PostgreSQL every replica's worker takes jobs from one queue and a dead
    worker's job resumes on another; on SQLite one worker per data folder (a second waits for the first's lock).
    Queued jobs start in the store's fair order, never more than ``jobs_per_key`` of one key at a time.
    ``gpu_budget_gb``: the jobs' share of a GPU that vLLM serves on; ``vllm_endpoint``: that vLLM's endpoint
    file; ``jobs_engine``: whether jobs generate there (evaluations, reinforcement rollouts, model graders):
    :func:`engine_of`. A failing database is waited out (the worker retries every few seconds), never its end."""
    import fcntl

    store = open_store(root)
    if store is None:
        return
    sole = store.db.kind == "sqlite"
    if sole:
        lock = open(store.root / "worker.lock", "w")  # noqa: SIM115 - held for the worker's lifetime
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second worker waits here until the first has gone
    me, failing = worker_id(), 0
    while not SHUTDOWN.is_set():
        try:
            claimed = store.claim_job(me, jobs_per_key, sole=sole)
            failing = 0
        except Exception as exc:  # noqa: BLE001 - the store unreachable (or a bug): looked at again, never the end
            failing += 1
            (log.warning if transient(exc) else log.exception)("jobs worker: claiming a job failed (%s)", exc)
            SHUTDOWN.wait(min(10.0, poll_s * 2 ** failing))
            continue
        if claimed is None:
            if once:
                return
            SHUTDOWN.wait(poll_s)
            continue
        job, claim = claimed
        with engine_of(vllm_endpoint, jobs_engine), store.claims.holding(claim):
            run_or_fail(store, job, gpu_budget_gb, claim)
        if once and store.next_job(jobs_per_key) is None:
            return


def open_store(root: Path) -> JobStore | None:
    """The store (as the jobs room sees it), opened once its database answers (tried again every few seconds until
    SIGTERM: None)."""
    while True:
        try:
            return JobStore(Store(root, database_url()))
        except Exception as exc:  # noqa: BLE001 - e.g. PostgreSQL restarting while the server starts its worker
            if not transient(exc) and not isinstance(exc, DatabaseError):
                raise
            log.warning("jobs worker: the store cannot be opened yet (%s); trying again", exc)
            if SHUTDOWN.wait(5.0):
                return None


def main() -> None:
    args, _ = start_worker_process("tunesmith fine-tuning jobs worker: one job at a time in this process")
    work(args.data_dir, once=args.once, jobs_per_key=args.jobs_per_key, gpu_budget_gb=args.gpu_budget_gb,
         vllm_endpoint=args.vllm_endpoint, jobs_engine=args.jobs_engine)
    end_worker_process()


if __name__ == "__main__":
    main()
