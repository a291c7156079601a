"""Faults under two replicas of `tunesmith serve` on one PostgreSQL of the test's own, while fine-tuning jobs,
batches, eval runs, uploads in parts and chat traffic on two keys run: every server connection terminated,
PostgreSQL stopped for 20 s and started again, a replica frozen (SIGSTOP) past its lease and resumed, and the two
replicas' clocks 60 s ahead and 60 s behind throughout (libfaketime). Each fault is a phase that starts work of its
own (an upload, a batch, an eval run) and makes sure a job is training, then injects the fault mid-work; the work
goes on through the next phases and is checked once every phase has run.

Checked: every job succeeded with each step reported once, in order, one fine-tuned model (answering on both
replicas) and one results file; every batch line once in its output; every eval row graded once; every upload whole.
Throughout: every answer a 200, a 429 with a retry-after or a 503, none later than the request timeout (a frozen
replica aside), no 500 in the replicas' logs; during the stop ``/ready`` is 503 on both replicas, and within 30 s of
each fault every replica answers a chat and ``/ready`` again. At the end each key has its whole limit of requests in
flight on every replica, and each replica's jobs worker is alive. Every finding is collected and printed with a
timeline; the test fails with all of them."""

from __future__ import annotations

import math
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tunesmith.serve.jobs.store import JobStore
from tunesmith.serve.store import Store

from . import faults
from .conftest import banking_rows, chat_lines
from .pg import missing, postgres_control

KEYS = ("fault-key-a", "fault-key-b")
CLOCKS = ("+60s", "-60s")  # replica one's clock a minute ahead, replica two's a minute behind
LEASE_ENV = {"TUNESMITH_LEASE_S": "10"}  # every replica and jobs worker honours it (30 s where it is not read)
REQUESTS_PER_KEY = 4
REQUEST_TIMEOUT_S = 15  # --request-timeout
ANSWER_S = REQUEST_TIMEOUT_S + 5  # no answer later than this (a frozen replica's aside)
STOP_S = 20  # PostgreSQL stopped this long
RECOVER_S = 30  # every replica answers within this after a fault
BATCH_LINES, EVAL_ROWS, TRAINING_ROWS = 40, 60, 48
JOB_SPAN_S = 45  # a job trains about this long at the step rate seen so far: through a fault or two
PHASES = ("skew", "terminate", "pg-stop", "freeze")
FINAL = {"job": ("succeeded", "failed", "cancelled"), "batch": ("completed", "failed", "expired", "cancelled"),
         "run": ("completed", "failed", "canceled")}

pytestmark = [pytest.mark.replicas,  # several servers on one PostgreSQL: make test-replicas runs them
              pytest.mark.skipif(bool(missing()) or faults.libfaketime() is None,
                                 reason=missing() or "libfaketime is not installed (apt-get install faketime)")]


@pytest.fixture(scope="module")
def own_postgres():
    """A PostgreSQL of this module's own (the test stops it)."""
    with postgres_control(("faults",)) as server:
        yield server


@dataclass
class Piece:
    """A job, a batch or an eval run, started in ``phase`` for ``key``."""

    phase: str
    kind: str
    key: str
    id: str
    eval_id: str | None = None
    steps: int = 0  # a job's planned steps

    def status(self, client: openai.OpenAI) -> str:
        if self.kind == "job":
            return client.fine_tuning.jobs.retrieve(self.id).status
        if self.kind == "batch":
            return client.batches.retrieve(self.id).status
        return client.evals.runs.retrieve(self.id, eval_id=self.eval_id).status


class FaultRun:
    """The two replicas, the store, the work every phase started, the faults and the checks."""

    def __init__(self, reps, store: Store, pg, model: str, eos: int, lease: float, timeline: faults.Timeline,
                 traffic: faults.Traffic):
        self.reps, self.store, self.pg, self.model, self.eos = reps, store, pg, model, eos
        self.lease, self.tl, self.traffic = lease, timeline, traffic
        self.steps_per_s = 8.0  # until a job has been seen training
        self.training: dict[str, str] = {}
        self.evals: dict[str, str] = {}
        self.pieces: list[Piece] = []
        self.quiet_since = 0.0  # when the traffic stopped

    def setup(self) -> None:
        training = chat_lines(banking_rows(("card_arrival", "lost_or_stolen_card"), TRAINING_ROWS // 2))
        for key in KEYS:
            client = self.reps[0].clients[key]
            self.training[key] = faults.patient(lambda c=client: c.files.create(file=("t.jsonl", training),
                                                                                purpose="fine-tune"), 120, "upload").id
            self.evals[key] = faults.patient(lambda c=client: c.evals.create(name="faults", **faults.EVAL_CONFIG), 120,
                                             "creating the eval").id

    def client(self, key: str, replica: faults.Replica | None = None) -> openai.OpenAI:
        """``key``'s client on ``replica``, or on the first replica not frozen."""
        return (replica or next(r for r in self.reps if not r.is_frozen)).clients[key]

    def db(self, read, what: str):
        """A read of the store from the test, again while the database is coming back."""
        deadline = time.time() + 60
        while True:
            try:
                return read()
            except Exception as exc:  # noqa: BLE001 - psycopg's errors while the database comes back
                if time.time() > deadline:
                    raise AssertionError(f"{what}: {exc}") from exc
                time.sleep(0.5)

    def steps(self, job_id: str) -> int:
        return max((e["data"]["step"] for e in self.db(lambda: self.store.events(job_id), "events")
                    if e["type"] == "metrics"), default=0)

    def holder(self, job_id: str) -> faults.Replica | None:
        with suppress(Exception):
            row = self.store.db.execute("SELECT claimed_by FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return faults.holder_replica(self.reps, row[0])
        return None

    def workers(self) -> list[int]:
        """The replicas' jobs workers alive."""
        return [pid for r in self.reps for pid in r.workers()]

    def wait(self, predicate, timeout: float, what: str) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with suppress(openai.APIError, AssertionError):
                if predicate():
                    return True
            time.sleep(0.3)
        self.tl.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        return False

    # --- work ----------------------------------------------------------------------------------------------------

    def training_job(self, left_s: float) -> Piece | None:
        """A job training now with about ``left_s`` seconds of steps left: one that runs, else a new one of a key
        with none unfinished (None when no jobs worker is alive to run it)."""
        jobs = [p for p in self.pieces if p.kind == "job"]
        for job in reversed(jobs):
            with suppress(openai.APIError):
                if job.status(self.client(job.key)) == "running":
                    before, t0 = self.steps(job.id), time.time()
                    time.sleep(2)
                    done = self.steps(job.id)
                    if done > before:
                        self.steps_per_s = (done - before) / (time.time() - t0)
                    if done and job.steps - done >= self.steps_per_s * left_s:
                        return job
        free = lambda k: all(p.status(self.client(k)) in FINAL["job"] for p in jobs if p.key == k)  # noqa: E731
        if not self.wait(lambda: any(free(k) for k in KEYS) or not self.workers(), 180, "a key with no job unfinished"):
            return None
        if not self.workers():
            self.tl.fail("no jobs worker is alive to train a job")
            return None
        key = next(k for k in KEYS if free(k))
        epochs = max(3, min(50, math.ceil(self.steps_per_s * JOB_SPAN_S / TRAINING_ROWS)))  # OpenAI allows 50
        client = self.client(key)
        job = Piece(self.tl.phase, "job", key, faults.patient(lambda: client.fine_tuning.jobs.create(
            model=self.model, training_file=self.training[key], method={"type": "supervised", "supervised": {
                "hyperparameters": {"n_epochs": epochs, "batch_size": 1}}}), 60, "creating a job").id,
            steps=epochs * TRAINING_ROWS)
        self.pieces.append(job)
        self.tl.mark(f"job {job.id} ({key}) of {job.steps} steps created")
        self.wait(lambda: self.steps(job.id) >= 1 or not self.workers(), 180, f"job {job.id}'s first step")
        return job

    def phase(self, index: int, name: str, fault) -> None:
        """Work started for the phase's key (a job made sure to be training, an upload's first part, a batch and,
        once the batch answers, an eval run, through the replica that holds the job), ``fault`` injected, and the
        upload finished through the other replica and checked."""
        tl, key = self.tl, KEYS[index % 2]
        tl.phase = name
        job = self.training_job(left_s=30)
        home = (job and self.holder(job.id)) or self.reps[0]  # the batch and the run start where the job runs
        away = next(r for r in self.reps if r is not home)
        client = home.clients[key]
        content = chat_lines(banking_rows(("card_arrival",), 8))
        upload = faults.patient(lambda: client.uploads.create(filename="u.jsonl", purpose="fine-tune", bytes=len(content),
                                                              mime_type="text/jsonl"), 60, "creating an upload")
        part = faults.patient(lambda: client.uploads.parts.create(upload.id, data=content[:len(content) // 2]), 60,
                              "the upload's first part")
        lines = faults.patient(lambda: client.files.create(file=("b.jsonl", faults.batch_lines(self.model, BATCH_LINES)),
                                                           purpose="batch"), 60, "the batch's file")
        batch = Piece(name, "batch", key, faults.patient(lambda: client.batches.create(
            input_file_id=lines.id, endpoint="/v1/chat/completions", completion_window="24h"), 60, "a batch").id)
        self.pieces.append(batch)
        self.wait(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 1, 120,
                  f"batch {batch.id}'s first line")
        # the run last: it is claimed at once by the replica that creates it, and 60 rows go fast
        run = Piece(name, "run", key, faults.patient(lambda: client.evals.runs.create(
            self.evals[key], data_source=faults.eval_source(self.model, EVAL_ROWS)), 60, "an eval run").id, self.evals[key])
        self.pieces.append(run)
        self.traffic.work = {"key": key, "batch": batch.id, "eval": run.eval_id, "run": run.id} | (
            {"job": job.id} if job and job.key == key else {})
        counts = client.batches.retrieve(batch.id).request_counts
        training = f"job {job.id} at step {self.steps(job.id)}/{job.steps}" if job else "no job training"
        tl.mark(f"phase {name} ({key}): on {home.name} before the fault: {training}, batch {batch.id} "
                f"{counts.completed}/{counts.total}, run {run.id} {run.status(client)}")
        tl.phase = f"{name}:fault"
        try:
            fault(home)
        finally:
            tl.phase = name
        second = faults.patient(lambda: away.clients[key].uploads.parts.create(upload.id, data=content[len(content) // 2:]),
                                60, "the upload's second part")
        done = faults.patient(lambda: client.uploads.complete(upload.id, part_ids=[part.id, second.id]), 60,
                              "completing the upload")
        tl.check(done.status == "completed" and faults.patient(lambda: away.clients[key].files.content(
            done.file.id).read(), 60, "the upload's bytes") == content, f"upload {upload.id}: {done.status}, bytes differ")

    def finish(self, bound: float) -> None:
        """Until every piece of work has ended (a job: or no jobs worker is alive), at most ``bound`` seconds; then
        each checked, its findings under the phase that started it."""
        tl, since = self.tl, time.time()
        tl.phase = "end"
        left = list(self.pieces)
        while left and time.time() - since < bound:
            for piece in list(left):
                with suppress(openai.APIError):
                    if piece.status(self.client(piece.key)) in FINAL[piece.kind] or (
                            piece.kind == "job" and not self.workers()):
                        left.remove(piece)
                        tl.mark(f"{piece.kind} {piece.id} of phase {piece.phase} ended")
            time.sleep(0.5)
        for piece in self.pieces:
            client = self.client(piece.key)
            if piece in left:
                tl.fail(f"{piece.kind} {piece.id} had not ended {bound:.0f} s after the last fault", piece.phase)
            elif piece.kind == "job":
                for problem in faults.job_problems(client, self.db(lambda p=piece: self.store.events(p.id), "events"),
                                                   piece.id):
                    tl.fail(problem, piece.phase)
            elif piece.kind == "batch":
                for problem in faults.batch_problems(client, piece.id, BATCH_LINES):
                    tl.fail(problem, piece.phase)
            else:
                for problem in faults.run_problems(client, piece.eval_id, piece.id, EVAL_ROWS):
                    tl.fail(problem, piece.phase)

    # --- the faults ----------------------------------------------------------------------------------------------

    def answers_again(self, since: float, reps=None) -> None:
        """Every replica (of ``reps``) answers a chat, and ``/ready`` with a 200, within RECOVER_S of ``since``."""
        took = {}

        def probe(r):
            took[r.name] = faults.first_answer(r, KEYS[0], self.model, since, RECOVER_S + 60)
            while faults.ready_status(r, ANSWER_S)[0] != 200 and time.time() - since < RECOVER_S + 60:
                time.sleep(0.5)
            ready = time.time() - since
            self.tl.check(ready <= RECOVER_S, f"{r.name}: /ready 200 only {ready:.0f} s after the fault")

        threads = [threading.Thread(target=probe, args=(r,)) for r in reps or self.reps]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r, s in took.items():
            self.tl.mark(f"{r}: first 200 {s:.1f} s after the fault" if s is not None else f"{r}: no 200 in {RECOVER_S + 60} s")
            self.tl.check(s is not None and s <= RECOVER_S, f"{r} answered a chat {s} s after the fault (limit {RECOVER_S} s)")

    def skew(self, home) -> None:
        self.tl.mark(f"no fault but the clocks ({', '.join(r.name for r in self.reps)})")

    def terminate(self, home) -> None:
        for i in range(2):
            if i:
                time.sleep(3)
            self.tl.mark(f"terminated {self.pg.terminate('faults')} connections")
        self.answers_again(time.time())

    def pg_stop(self, home) -> None:
        self.pg.stop("fast")
        stopped = time.time()
        self.tl.mark("PostgreSQL stopped")
        ready: dict[str, list] = {r.name: [] for r in self.reps}

        def probe(r):  # /ready once a second while stopped (a probe in flight at the start is waited for)
            while time.time() - stopped < STOP_S - 1:
                ready[r.name].append(faults.ready_status(r, ANSWER_S + 5))
                time.sleep(1)

        threads = [threading.Thread(target=probe, args=(r,), daemon=True) for r in self.reps]
        try:
            for t in threads:
                t.start()
            time.sleep(max(0.0, STOP_S - (time.time() - stopped)))
        finally:
            self.pg.start()
        self.tl.mark(f"PostgreSQL started after {time.time() - stopped:.0f} s")
        for t in threads:
            t.join(ANSWER_S + 10)
        for name, seen in ready.items():
            statuses = [s for s, _ in seen]
            slowest = max((t for _, t in seen), default=0)
            self.tl.mark(f"{name}: /ready during the stop {statuses}, slowest {slowest:.1f} s")
            self.tl.check(bool(seen) and set(statuses) == {503} and slowest <= ANSWER_S,
                          f"{name}: /ready during the stop answered {statuses} (slowest {slowest:.1f} s), not only 503s")
        self.answers_again(time.time())

    def freeze(self, home) -> None:
        home.freeze()
        try:
            self.tl.mark(f"{home.name} frozen (SIGSTOP, server and jobs worker) for {self.lease + 5:.0f} s")
            time.sleep(self.lease + 5)
        finally:
            home.thaw()
        self.tl.mark(f"{home.name} resumed (SIGCONT)")
        self.answers_again(time.time(), [home])

    # --- after every phase ---------------------------------------------------------------------------------------

    def afterwards(self) -> None:
        tl = self.tl
        tl.phase = "after"
        for key in KEYS:
            succeeded = [p.id for p in self.pieces if p.kind == "job" and p.key == key and
                         p.status(self.reps[0].clients[key]) == "succeeded"]
            for r in self.reps:
                kept = faults.results_of_key(r.clients[key])
                tl.check(kept == len(succeeded), f"{key} keeps {kept} results files on {r.name} for {len(succeeded)} "
                         "jobs that succeeded (a job finished twice)")
                for job in succeeded:
                    name = r.clients[key].fine_tuning.jobs.retrieve(job).fine_tuned_model
                    listed = [m.id for m in r.clients[key].models.list().data].count(name)
                    tl.check(listed == 1, f"{name} listed {listed} times on {r.name}")
                    try:
                        r.clients[key].chat.completions.create(model=name, messages=[{"role": "user", "content": "my card"}],
                                                               max_tokens=4)
                    except openai.APIError as exc:
                        tl.fail(f"fine-tuned model {name} does not answer on {r.name}: {exc}")
        heal = self.lease + 5 - (time.time() - self.quiet_since)  # a lease and 5 s after the traffic stopped
        tl.mark(f"fine-tuned models checked; waiting {max(0, heal):.0f} s more for every key's limit to heal (a lease "
                "and 5 s after the traffic stopped)")
        time.sleep(max(0.0, heal))
        with suppress(Exception):
            rows = self.store.db.execute("SELECT * FROM key_places").fetchall()
            tl.mark(f"key_places: {[tuple(r) for r in rows]}")
        found: dict[tuple[str, str], str | None] = {}

        def probe(r, key):
            found[r.name, key] = faults.limit_probe(r, key, self.model, REQUESTS_PER_KEY, self.eos)

        for turn in range(len(KEYS)):  # each key on one replica at a time, the keys side by side
            threads = [threading.Thread(target=probe, args=(r, KEYS[(i + turn) % len(KEYS)]))
                       for i, r in enumerate(self.reps)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for (name, key), wrong in sorted(found.items()):
            tl.mark(f"{name} {key}: limit of {REQUESTS_PER_KEY} " + (wrong or "whole"))
            tl.check(wrong is None, f"{key} on {name}: {wrong}")
        for r in self.reps:
            tl.check(r.proc.poll() is None, f"{r.name}'s server exited ({r.proc.returncode})")
            alive = r.workers()
            tl.check(r.worker is not None and r.worker in alive,
                     f"{r.name}'s jobs worker (pid {r.worker}) is gone; its workers now: {alive}")

    def statuses(self) -> None:
        """Every answer a 200, a 429 with a retry-after or a 503, in time (a frozen replica's aside)."""
        import re

        by_name = {r.name: r for r in self.reps}
        wrong: dict[str, list] = {}
        for s in self.tl.seen:
            excused = by_name[s.replica].frozen_within(s.start, s.end)
            what = f"{s.phase} {s.replica} {s.method} {re.sub(r'/[a-z]+[-_][0-9a-f]{8,}', '/{id}', s.path)}"
            if s.status is None and not excused:
                wrong.setdefault(f"no answer ({s.error})", []).append((what, s.end - s.start))
            elif s.status is not None and s.status not in faults.ALLOWED:
                wrong.setdefault(f"status {s.status}", []).append((what, s.end - s.start))
            elif s.status == 429 and not s.retry_after:
                wrong.setdefault("429 without retry-after", []).append((what, s.end - s.start))
            if s.status is not None and s.end - s.start > ANSWER_S and not excused:
                wrong.setdefault(f"answered after more than {ANSWER_S} s", []).append((what, s.end - s.start))
        for kind, cases in wrong.items():
            routes = sorted({w for w, _ in cases})
            self.tl.fail(f"{kind}: {len(cases)} request(s), slowest {max(t for _, t in cases):.1f} s, on {routes[:8]}")

    def logs(self, data_dir: Path) -> None:
        for path in [r.log for r in self.reps] + [data_dir / "worker.log"]:
            text = path.read_text(errors="replace") if path.exists() else ""
            bad, ends = faults.log_findings(text)
            if ends:
                self.tl.mark(f"{path.name} exceptions: " + "; ".join(f"{n}x {e}" for e, n in ends.most_common(8)))
            self.tl.check(not bad, f"{path.name}: {len(bad)} line(s) of 500s or dead threads: {bad[:4]}")


def test_replicas_survive_database_and_replica_faults_mid_work(tiny_model_dir, tmp_path, own_postgres):
    from transformers import AutoTokenizer

    lease = faults.lease_of(LEASE_ENV)
    model, data_dir, tl = str(tiny_model_dir), tmp_path / "shared", faults.Timeline()
    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    args = ("--batch-concurrency", "1", "--requests-per-key", str(REQUESTS_PER_KEY), "--request-timeout",
            str(REQUEST_TIMEOUT_S))
    run, traffic = None, None
    try:
        with faults.replicas(tiny_model_dir, data_dir, own_postgres.urls["faults"], tmp_path, KEYS, CLOCKS, tl,
                             ANSWER_S + 5, LEASE_ENV, args) as reps:
            tl.mark(f"replicas up: {[r.name for r in reps]}, lease {lease:.0f} s, jobs workers "
                    f"{[r.worker for r in reps]}")
            store = JobStore(Store(data_dir, own_postgres.urls["faults"]))
            traffic = faults.Traffic(reps, KEYS, model, tl)
            run = FaultRun(reps, store, own_postgres, model, eos, lease, tl, traffic)
            run.setup()
            traffic.start()
            for i, name in enumerate(PHASES):
                started = time.time()
                try:
                    run.phase(i, name, getattr(run, name.replace("-", "_")))
                except Exception as exc:  # noqa: BLE001 - said as a finding; the next phases still run
                    tl.fail(f"phase {name} broke off: {type(exc).__name__}: {str(exc)[:300]}")
                tl.mark(f"phase {name}: {time.time() - started:.0f} s")
            started = time.time()
            try:
                run.finish(3 * lease + 2 * JOB_SPAN_S + 120)
            except Exception as exc:  # noqa: BLE001 - said as a finding; the other checks still run
                tl.fail(f"the checks of the work broke off: {type(exc).__name__}: {str(exc)[:300]}")
            tl.mark(f"the work ended (or was given up on) in {time.time() - started:.0f} s")
            traffic.end()
            run.quiet_since = time.time()
            tl.mark("traffic stopped")
            for check in (run.afterwards, run.statuses, lambda: run.logs(data_dir)):
                try:
                    check()
                except Exception as exc:  # noqa: BLE001 - said as a finding; the other checks still run
                    tl.fail(f"a check broke off: {type(exc).__name__}: {str(exc)[:300]}")
            store.db.close()
    finally:
        if traffic is not None:
            traffic.end()
        print(tl.summary(), flush=True)
        if tl.findings:
            for log in sorted(tmp_path.glob("replica*.log")) + [data_dir / "worker.log"]:
                if log.exists():
                    print(f"--- {log.name} (end) ---\n{log.read_text(errors='replace')[-4000:]}", flush=True)
    assert not tl.findings, f"{len(tl.findings)} finding(s):\n" + "\n".join(tl.findings)
