"""A fault harness for replicas of `tunesmith serve` on one PostgreSQL (tests/test_serve_faults.py): real server
processes (each clock shifted with libfaketime), every HTTP answer recorded with the replica, the phase and the time,
chat traffic from threads, the work a fault must not break (a fine-tuning job, a batch, an eval run, an upload in
parts) and what checks each piece ended once, whole."""

from __future__ import annotations

import base64
import csv
import glob
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx2 as httpx
import openai

from .conftest import wait_serving
from .test_serve_hostile import _free_port

ALLOWED = (200, 429, 503)  # a 429 only with a retry-after


def libfaketime() -> str | None:
    """Debian's libfaketime (the faketime package), or None."""
    return next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None)


# libfaketime 0.9.10 (Debian 12) with FAKETIME_DONT_FAKE_MONOTONIC=1 shifts the absolute monotonic deadline that
# time.sleep passes to clock_nanosleep since Python 3.11, and every sleep fails with EINVAL (libfaketime issue 426);
# a shifted replica's Python sleeps on a lock instead, whose monotonic wait libfaketime leaves alone
SLEEP_SHIM = '''import threading
import time


def _sleep(seconds):
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    threading.Event().wait(seconds)


time.sleep = _sleep
'''


def clock_env(offset: str, folder: Path) -> dict:
    """The environment that shifts a process's clock (and its children's) by ``offset`` (libfaketime's ``+60s``,
    ``-60s``): the wall clock only, the monotonic one left alone."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SLEEP_SHIM)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"LD_PRELOAD": libfaketime() or "", "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "PYTHONPATH": path}


def lease_of(env: dict) -> float:
    """The lease a process started with ``env`` runs with (``tunesmith.serve.store.LEASE_S`` read in one)."""
    out = subprocess.run([sys.executable, "-c", "from tunesmith.serve.store import LEASE_S; print(LEASE_S)"],
                         env={**os.environ, **env}, capture_output=True, text=True, check=True, timeout=120)
    return float(out.stdout.strip().splitlines()[-1])


# --- what was seen ---------------------------------------------------------------------------------------------


@dataclass
class Seen:
    """One HTTP exchange with a replica: its status (None: no answer) or the client's error."""

    replica: str
    key: str
    method: str
    path: str
    phase: str
    start: float
    end: float
    status: int | None
    retry_after: str | None = None
    error: str | None = None


class Timeline:
    """Marks (seconds since the start), the phase requests are counted in, every exchange, and the findings."""

    def __init__(self):
        self.t0 = time.time()
        self.phase = "start"
        self.marks: list[tuple[float, str]] = []
        self.seen: list[Seen] = []
        self.findings: list[str] = []
        self.lock = threading.Lock()

    def at(self, t: float | None = None) -> float:
        return (t or time.time()) - self.t0

    def mark(self, text: str) -> None:
        with self.lock:
            self.marks.append((self.at(), text))
        print(f"[{self.at():7.1f}s] {text}", flush=True)

    def record(self, seen: Seen) -> None:
        with self.lock:
            self.seen.append(seen)

    def fail(self, text: str, phase: str | None = None) -> None:
        """A finding (of ``phase``, else of the current one): the test fails at its end with every one of them."""
        phase = phase or self.phase
        with self.lock:
            self.findings.append(f"[{phase}] {text}")
        print(f"[{self.at():7.1f}s] FINDING [{phase}] {text}", flush=True)

    def check(self, ok: bool, text: str) -> bool:
        if not ok:
            self.fail(text)
        return ok

    def statuses(self) -> dict[tuple[str, str], Counter]:
        """(phase, replica) → Counter of statuses (errors by name)."""
        out: dict[tuple[str, str], Counter] = {}
        for s in list(self.seen):
            out.setdefault((s.phase, s.replica), Counter())[s.status or s.error] += 1
        return out

    def summary(self) -> str:
        """The statuses seen, by phase (``name:fault`` while a fault lasted) and replica (the marks are printed as
        they come)."""
        lines = ["statuses by phase and replica:"]
        for (phase, replica), counts in sorted(self.statuses().items()):
            lines.append(f"  {phase:10} {replica}: " + ", ".join(f"{k}x{n}" for k, n in sorted(counts.items(), key=str)))
        return "\n".join(lines)


class Recorder(httpx.BaseTransport):
    """The transport of one (replica, key) client: each exchange recorded in the timeline."""

    def __init__(self, timeline: Timeline, replica: str, key: str):
        self.timeline, self.replica, self.key = timeline, replica, key
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request):
        start, phase = time.time(), self.timeline.phase
        seen = Seen(self.replica, self.key, request.method, request.url.path, phase, start, start, None)
        try:
            response = self.inner.handle_request(request)
        except httpx.HTTPError as exc:
            seen.end, seen.error = time.time(), type(exc).__name__
            self.timeline.record(seen)
            raise
        seen.end, seen.status = time.time(), response.status_code
        seen.retry_after = response.headers.get("retry-after")
        self.timeline.record(seen)
        return response


# --- replicas ----------------------------------------------------------------------------------------------------


@dataclass
class Replica:
    """One `tunesmith serve` process (in a process group of its own, with its jobs worker) and its clients."""

    name: str
    url: str
    proc: subprocess.Popen
    log: Path
    clock: str
    clients: dict[str, openai.OpenAI] = field(default_factory=dict)
    frozen: list[list[float]] = field(default_factory=list)  # [from, to] (to: inf while frozen)
    worker: int | None = None

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen) and self.frozen[-1][1] == float("inf")

    def frozen_within(self, start: float, end: float) -> bool:
        """Whether this replica was frozen at some moment from ``start`` to ``end``."""
        return any(a <= end and start <= b for a, b in self.frozen)

    def freeze(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)
        self.frozen.append([time.time(), float("inf")])

    def thaw(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)
        self.frozen[-1][1] = time.time()

    def workers(self) -> list[int]:
        """Pids of this server's jobs worker processes that are alive (not zombies)."""
        found = []
        for stat in glob.glob("/proc/[0-9]*/stat"):
            with suppress(OSError):
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
                pid = int(stat.split("/")[2])
                if int(fields[1]) == self.proc.pid and fields[0] != "Z" and \
                        b"tunesmith.serve.jobs.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
        return found


@contextmanager
def replicas(model: Path, data_dir: Path, database: str, logs: Path, keys: tuple[str, ...], clocks: tuple[str, ...],
             timeline: Timeline, timeout_s: float, env: dict, args: tuple[str, ...] = ()):
    """One `tunesmith serve` for each of ``clocks`` (libfaketime's offset, e.g. ``+60s``) on ``database`` and
    ``data_dir``, started together; yields the :class:`Replica` list (each with a recording client per key)."""
    exe = Path(sys.executable).with_name("tunesmith")
    started: list[Replica] = []
    try:
        for i, clock in enumerate(clocks, start=1):
            port, log = _free_port(), logs / f"replica{i}.log"
            faked = clock_env(clock, logs / "clock")
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [str(exe), "serve", "--model", str(model), "--data-dir", str(data_dir), "--port", str(port),
                     "--engine", "builtin", *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **env, **faked,
                         "TUNESMITH_API_KEYS": ",".join(keys), "TUNESMITH_DATABASE": database})
            started.append(Replica(f"r{i}{clock}", f"http://127.0.0.1:{port}/v1", proc, log, clock))
        for r in started:
            wait_serving(r.url, keys[0], r.proc, r.log)
            r.clients = {k: openai.OpenAI(base_url=r.url, api_key=k, max_retries=0, timeout=timeout_s,
                                          http_client=httpx.Client(transport=Recorder(timeline, r.name, k)))
                         for k in keys}
            workers = r.workers()
            r.worker = workers[0] if workers else None
        yield started
    finally:
        for r in started:
            if r.proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(r.proc.pid, signal.SIGCONT)
                    os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait()


def holder_replica(reps: list[Replica], holder: str | None) -> Replica | None:
    """The replica whose server or jobs worker is the claim holder ``holder`` (host:pid:…)."""
    if not holder or holder.count(":") < 1:
        return None
    with suppress(ValueError):
        pid = int(holder.split(":")[1])
        for r in reps:
            if pid == r.proc.pid or pid in r.workers():
                return r
    return None


# --- traffic -----------------------------------------------------------------------------------------------------


class Traffic:
    """Until stopped: short chat requests, plain and streamed, from one thread per key and replica pair, and from one
    thread per replica the reads a client makes of its work (the current phase's job, batch and eval run, its files
    and models); a frozen replica is skipped (a load balancer stops sending to it). Every answer is in the timeline;
    a stream that broke after its 200 is a finding."""

    def __init__(self, reps: list[Replica], keys: tuple[str, ...], model: str, timeline: Timeline):
        self.reps, self.keys, self.model, self.timeline = reps, keys, model, timeline
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(r, k), daemon=True, name=f"chat-{r.name}-{k}")
                        for r in reps for k in keys]
        self.threads += [threading.Thread(target=self._reads, args=(r,), daemon=True, name=f"reads-{r.name}")
                         for r in reps]
        self.work: dict[str, str] = {}  # key, job, batch, eval, run: the current phase's work, read by _reads

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _loop(self, replica: Replica, key: str) -> None:
        client, i = replica.clients[key], 0
        while not self.stop.is_set():
            if replica.is_frozen:
                self.stop.wait(0.2)
                continue
            i += 1
            messages, start = [{"role": "user", "content": f"card question {i}"}], time.time()
            try:
                if i % 2:
                    for _ in client.chat.completions.create(model=self.model, messages=messages, max_tokens=24,
                                                            stream=True):
                        pass
                else:
                    client.chat.completions.create(model=self.model, messages=messages, max_tokens=4)
                self.stop.wait(0.3)
            except (openai.APIStatusError, openai.APIConnectionError):  # a refusal, or no answer: in the timeline
                self.stop.wait(0.3)
            except (openai.APIError, httpx.HTTPError) as exc:  # an error event, or the connection cut, after a 200
                if not replica.frozen_within(start, time.time()):  # (a frozen replica's stream times out)
                    self.timeline.fail(f"a streamed chat on {replica.name} broke after its 200: "
                                       f"{type(exc).__name__}: {str(exc)[:200]}")
                self.stop.wait(0.3)

    def _reads(self, replica: Replica) -> None:
        while not self.stop.wait(1.0):
            work = dict(self.work)
            if replica.is_frozen or not work:
                continue
            client = replica.clients[work["key"]]
            reads = [(client.models.list, ()), (client.files.list, ())]
            if "job" in work:
                reads.append((client.fine_tuning.jobs.retrieve, (work["job"],)))
            if "batch" in work:
                reads.append((client.batches.retrieve, (work["batch"],)))
            if "run" in work:
                reads.append((partial(client.evals.runs.retrieve, eval_id=work["eval"]), (work["run"],)))
            for read, args in reads:
                with suppress(openai.APIError):  # what it answered is in the timeline
                    read(*args)


def first_answer(replica: Replica, key: str, model: str, since: float, limit_s: float) -> float | None:
    """Seconds from ``since`` until ``replica`` answers a chat of ``key`` with a 200 (None: not within ``limit_s``)."""
    while time.time() - since < limit_s:
        with suppress(openai.APIError):
            replica.clients[key].chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                         max_tokens=2)
            return time.time() - since
        time.sleep(0.5)
    return None


def ready_status(replica: Replica, timeout: float) -> tuple[int | None, float]:
    """``GET /ready`` of ``replica``: its status (None: no answer within ``timeout``) and its seconds."""
    start = time.time()
    try:
        return httpx.get(f"{replica.root}/ready", timeout=timeout).status_code, time.time() - start
    except httpx.HTTPError:
        return None, time.time() - start


def patient(call: Callable, timeout_s: float, what: str):
    """``call()`` again while it fails as a fault makes it fail (no answer, 5xx, 429), until ``timeout_s``: the
    harness's own reads and steps must get through a fault; what the statuses were is in the timeline."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return call()
        except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError, openai.APIStatusError) as exc:
            status = getattr(exc, "status_code", None)
            if status is not None and status < 500 and status != 429:
                raise
            if time.time() > deadline:
                raise AssertionError(f"{what}: still failing after {timeout_s:.0f} s: {exc}") from exc
            time.sleep(0.5)


# --- work --------------------------------------------------------------------------------------------------------


def batch_lines(model: str, n: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": model, "messages": [{"role": "user", "content": f"card question {i}"}], "max_tokens": 16,
        "temperature": 0}}) + "\n" for i in range(n)).encode()


def eval_source(model: str, n: int) -> dict:
    return {"type": "completions", "model": model, "sampling_params": {"max_completion_tokens": 16},
            "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.q}}"}]},
            "source": {"type": "file_content", "content": [{"item": {"q": f"card {i}"}} for i in range(n)]}}


EVAL_CONFIG = {"data_source_config": {"type": "custom", "item_schema": {"type": "object", "properties": {
    "q": {"type": "string"}}}, "include_sample_schema": True},
    "testing_criteria": [{"type": "string_check", "name": "answered", "input": "{{sample.output_text}}",
                          "reference": "\u0000", "operation": "ne"}]}


def job_problems(client: openai.OpenAI, events: list[dict], job_id: str) -> list[str]:
    """What is wrong with a finished job (``events``: the store's, newest first): not succeeded; a step reported
    twice, missing or out of order (two holders writing at once); not one "New fine-tuned model" event; not one
    results file; steps twice in its results file."""
    job = client.fine_tuning.jobs.retrieve(job_id)
    if job.status != "succeeded":
        return [f"job {job_id} {job.status}: {job.error}"]
    problems, events = [], list(reversed(events))  # in the order they were recorded
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    total = max((e["data"].get("total_steps") or 0 for e in events if e["type"] == "metrics"), default=0)
    twice = sorted(s for s, n in Counter(steps).items() if n > 1)
    if twice:
        problems.append(f"job {job_id}: steps reported more than once: {twice[:10]}")
    if sorted(set(steps)) != list(range(1, total + 1)):
        problems.append(f"job {job_id}: steps missing of 1..{total}: {sorted(set(range(1, total + 1)) - set(steps))[:10]}")
    if steps != sorted(steps):
        backs = [(a, b) for a, b in zip(steps, steps[1:], strict=False) if b <= a]
        problems.append(f"job {job_id}: step events out of order (two holders reporting): {backs[:5]}")
    made = [e for e in events if e["message"].startswith("New fine-tuned model")]
    if len(made) != 1:
        problems.append(f"job {job_id}: {len(made)} 'New fine-tuned model' events")
    results = [f for f in client.files.list(purpose="fine-tune-results").data if f.id in (job.result_files or [])]
    if len(job.result_files or []) != 1 or len(results) != 1:
        problems.append(f"job {job_id}: result files {job.result_files}")
    else:
        rows = list(csv.DictReader(io.StringIO(base64.b64decode(client.files.content(results[0].id).read()).decode())))
        csv_steps = Counter(int(r["step"]) for r in rows)
        if set(csv_steps.values()) != {1} or sorted(csv_steps) != list(range(1, total + 1)):
            problems.append(f"job {job_id}: step_metrics.csv steps {sorted(csv_steps.items())[:5]}… (of 1..{total})")
    resumed = [e["message"] for e in events if "resumed" in e["message"] or "restarted" in e["message"]]
    if resumed:
        print(f"    job {job_id}: {len(resumed)} resumption event(s): {resumed[:3]}", flush=True)
    return problems


def results_of_key(client: openai.OpenAI) -> int:
    """How many fine-tune results files the key keeps (one per job that succeeded)."""
    return len(client.files.list(purpose="fine-tune-results").data)


def batch_problems(client: openai.OpenAI, batch_id: str, n: int) -> list[str]:
    batch = client.batches.retrieve(batch_id)
    counts = batch.request_counts
    if batch.status != "completed" or counts.completed != n or counts.failed:
        return [f"batch {batch_id} {batch.status}: {counts}, errors {batch.errors}"]
    ids = Counter(json.loads(line)["custom_id"] for line in client.files.content(batch.output_file_id).read().splitlines())
    problems = []
    if set(ids) != {f"r{i}" for i in range(n)} or set(ids.values()) != {1}:
        twice = sorted(k for k, v in ids.items() if v > 1)
        problems.append(f"batch {batch_id}: {sum(ids.values())} output lines for {n} requests, twice: {twice[:10]}, "
                        f"missing: {sorted({f'r{i}' for i in range(n)} - set(ids))[:10]}")
    if batch.error_file_id:
        problems.append(f"batch {batch_id}: an error file: {client.files.content(batch.error_file_id).read()[:300]!r}")
    return problems


def run_problems(client: openai.OpenAI, eval_id: str, run_id: str, n: int) -> list[str]:
    run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
    if run.status != "completed" or run.result_counts.total != n or run.result_counts.errored:
        return [f"eval run {run_id} {run.status}: {run.result_counts}, error {run.error}"]
    indexes, after = [], None
    while True:
        page = client.evals.runs.output_items.list(run_id, eval_id=eval_id, limit=100, after=after)
        indexes += [i.datasource_item_id for i in page.data]
        if not page.has_more:
            break
        after = page.data[-1].id
    counts = Counter(indexes)
    if sorted(counts) != list(range(n)) or set(counts.values()) != {1}:
        return [f"eval run {run_id}: {len(indexes)} output items for {n} rows, twice: "
                f"{sorted(k for k, v in counts.items() if v > 1)[:10]}, missing: {sorted(set(range(n)) - set(counts))[:10]}"]
    return []


# --- a key's limit -------------------------------------------------------------------------------------------------


def limit_probe(replica: Replica, key: str, model: str, limit: int, eos: int, tries: int = 4) -> str | None:
    """Whether ``key`` has its whole limit of ``limit`` requests in flight on ``replica``: ``limit`` long streams at
    once are all admitted, and one more is refused (429) while they run. Returns what is wrong, or None. A try in
    which a stream ended before the extra request was answered proves nothing and is made again; so is one in which a
    stream was refused, a second later: a place the key's previous requests (on either replica) gave back a moment
    ago may not be written yet. A place kept for good is refused at every try."""
    create = {"model": model, "messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": 200,
              "temperature": 1.0, "logit_bias": {str(eos): -100}, "stream": True}
    refusals = []
    for _ in range(tries):
        admitted, refused, ended, extra, answered = _limit_try(replica.clients[key], create, limit)
        if refused:
            refusals.append(f"{admitted} of {limit} admitted (refused: {refused})")
            time.sleep(1)
            continue
        if all(e > answered for e in ended):
            return None if extra == 429 else f"a request past the limit of {limit} answered {extra}"
    if len(refusals) == tries:
        return f"requests at once refused below the limit at every try: {'; '.join(refusals)}"
    return ("inconclusive: the streams ended before the request past the limit was answered"
            + (f" (and tries refused below the limit: {'; '.join(refusals)})" if refusals else ""))


def _limit_try(client: openai.OpenAI, create: dict, limit: int) -> tuple[int, list, list, int, float]:
    """``limit`` streams opened at once, then one more request: (streams admitted, statuses of those refused, when
    each stream ended, the extra request's status, when it was answered)."""
    admitted, refused, ended = [], [], []
    opened = threading.Barrier(limit + 1, timeout=120)

    def stream():
        chunks = iter(())
        try:
            chunks = iter(client.chat.completions.create(**create))
            next(chunks)
            admitted.append(time.time())
        except openai.APIStatusError as exc:
            refused.append(exc.status_code)
        with suppress(threading.BrokenBarrierError):
            opened.wait()
        with suppress(openai.APIError, httpx.HTTPError):
            for _ in chunks:
                pass
        ended.append(time.time())

    threads = [threading.Thread(target=stream) for _ in range(limit)]
    for t in threads:
        t.start()
    with suppress(threading.BrokenBarrierError):
        opened.wait()
    try:
        client.chat.completions.create(**{**create, "stream": False, "max_tokens": 2})
        extra = 200
    except openai.APIStatusError as exc:
        extra = exc.status_code
    answered = time.time()
    for t in threads:
        t.join(120)
    return len(admitted), refused, ended, extra, answered


# --- logs --------------------------------------------------------------------------------------------------------


def log_findings(text: str) -> tuple[list[str], Counter]:
    """The lines of a server log that say a request got a 500 (or its connection dropped) or a thread died, and each
    traceback's last line counted (every exception the log holds)."""
    lines = text.splitlines()
    bad = [line for line in lines if "unexpected error on" in line or "Exception in ASGI application" in line
           or line.startswith("Exception in thread")]
    ends, inside = Counter(), False
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            inside = True
        elif inside and line and not line.startswith((" ", "\t")) and not line.startswith(("During handling",
                                                                                          "The above exception")):
            ends[re.sub(r"0x[0-9a-f]+|\d+", "N", line)[:160]] += 1
            inside = False
    return bad, ends
