"""A hostile tenant against `tunesmith serve`, attack by attack: what one key's work (or a request with no key at all)
does to another key's latency, at default settings.

Each attack gets a fresh `python -m tunesmith serve --engine E` (started as a user starts it, two keys A and B,
nothing else set but ``--no-python-graders``), so a server that an attack froze poisons no other attack; it is
killed with SIGKILL (its children too) when an attack left it frozen or still busy, else stopped with SIGTERM.
On each server key B first sends ``--quiet-requests`` pairs of requests alone, one after another (a ``GET
/v1/models``, then an 8-token greedy chat on a BANKING77 message, with the official client), then the attack starts
and B sends the same pairs again. Every B request has a timeout (``--models-timeout``, ``--chat-timeout``): one
with no answer within it counts as that timeout and is flagged ``no_answer``; after two in a row the server is
reported frozen and B stops. B also stops at ``--phase-seconds`` after the attack began.

The attacks (``--attacks``, default all):

- ``formula``: A runs ``/v1/fine_tuning/alpha/graders/run`` with a ``multi`` grader whose ``calculate_output`` is
  ``((9**999)**999)**999`` over two string_check graders.
- ``body``: a 300 MB (``--body-mb``) JSON body POSTed to ``/v1/uploads`` with no key. It is streamed from a
  generator over a plain socket while another thread reads the answer, so the answer's status, when it came and how
  much of the body had been sent by then are known even if the server answers before reading the body (an HTTP
  client library sends the whole body before it reads the answer).
- ``graders``: eight concurrent ``text_similarity`` ``rouge_l`` grader runs by A on two 60 KB texts.
- ``batches``: A uploads one 16-line chat batch file (purpose batch) and creates eight batches of it.
- ``embeddings``: A's batch of 12 ``/v1/embeddings`` lines of 2,048 inputs each; B goes on until the batch ends.
- ``flood``: A keeps 64 chat requests in flight from 64 threads, each waiting out a 429's ``retry-after``
  (noisy_neighbour.py's flood); ``flood-impatient``: the same, retrying at once.

For each attack one line: B's p50 and p99 (models and chat) alone and during the attack and their ratios, the status
codes and no-answers B saw, A's facts (status codes, answer times, batches' progress), the server process's memory
(VmRSS sampled every 0.2 s, VmHWM before and after, from /proc/<pid>/status) and the load average. ``--out`` writes
it all as JSON, B's every request included.

    python benchmarks/hostile_tenant.py --engine builtin --out result.json
    python benchmarks/hostile_tenant.py --engine vllm --attacks flood,batches --out result.json
    python benchmarks/hostile_tenant.py --attacks formula,body --quiet-requests 3 --chat-timeout 20 --body-mb 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import openai
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noisy_neighbour import KEYS, MODEL, Flood, percentiles, start  # noqa: E402
from serving_engines import questions  # noqa: E402

A, B = KEYS["flood"], KEYS["quiet"]
ATTACKS = ("formula", "body", "graders", "batches", "embeddings", "flood", "flood-impatient")
B_TOKENS = 8
FROZEN_AFTER = 2  # B's no-answers in a row that mean the server is frozen
ENCODER = "all-MiniLM-L6-v2"


# --- key B: timed requests --------------------------------------------------------------------------------------

def timed(call, timeout: float) -> tuple[float, str]:
    """``call()``'s seconds and outcome: the status code, ``no_answer`` (counted as ``timeout``) or
    ``connection_error``."""
    t0 = time.perf_counter()
    try:
        call()
        outcome = "200"
    except openai.APITimeoutError:
        return timeout, "no_answer"
    except openai.APIStatusError as exc:
        outcome = str(exc.status_code)
    except openai.APIConnectionError:
        outcome = "connection_error"
    return time.perf_counter() - t0, outcome


class KeyB:
    """Key B's two requests, each with its own timeout."""

    def __init__(self, url: str, args):
        self.models_timeout, self.chat_timeout = args.models_timeout, args.chat_timeout
        self.models_client = openai.OpenAI(base_url=url, api_key=B, max_retries=0, timeout=args.models_timeout)
        self.chat_client = openai.OpenAI(base_url=url, api_key=B, max_retries=0, timeout=args.chat_timeout)

    def models(self) -> tuple[float, str]:
        return timed(self.models_client.models.list, self.models_timeout)

    def chat(self, text: str) -> tuple[float, str]:
        return timed(lambda: self.chat_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=B_TOKENS, temperature=0),
            self.chat_timeout)


def b_requests(b: KeyB, texts: list[str], n: int, keep_going=lambda more: more) -> list[dict]:
    """Pairs (models, then a chat) one after another while ``keep_going(fewer than n sent)`` says so, and none after
    :data:`FROZEN_AFTER` no-answers in a row. Every request counts in the percentiles: an error at the time it
    took, a no-answer at its timeout."""
    out, silent, t0, i = [], 0, time.perf_counter(), 0
    while keep_going(i < n):
        for kind in ("models", "chat"):
            sent = time.perf_counter() - t0
            seconds, outcome = b.models() if kind == "models" else b.chat(texts[i % len(texts)])
            out.append({"kind": kind, "sent_s": round(sent, 3), "seconds": round(seconds, 4), "outcome": outcome})
            silent = silent + 1 if outcome == "no_answer" else 0
            if silent >= FROZEN_AFTER:
                return out
        i += 1
    return out


def frozen(requests: list[dict]) -> bool:
    return len(requests) >= FROZEN_AFTER and all(r["outcome"] == "no_answer" for r in requests[-FROZEN_AFTER:])


def summary(requests: list[dict]) -> dict:
    out = {}
    for kind in ("models", "chat"):
        lat = [r["seconds"] for r in requests if r["kind"] == kind]
        out[kind] = {**{k: round(v, 4) for k, v in percentiles(lat).items()}, "n": len(lat)} if lat else None
    out["outcomes"] = dict(Counter(f"{r['kind']}:{r['outcome']}" for r in requests))
    out["no_answer"] = sum(r["outcome"] == "no_answer" for r in requests)
    return out


def ratios(alone: dict, during: dict) -> dict:
    return {f"{kind}_{p}": round(during[kind][f"{p}_s"] / alone[kind][f"{p}_s"], 2)
            for kind in ("models", "chat") if alone[kind] and during[kind] for p in ("p50", "p99")}


# --- the server process -----------------------------------------------------------------------------------------

def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in kB."""
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    return fields


class Memory:
    """The server process's VmRSS every 0.2 s from now until :meth:`end`, and its VmHWM before and after."""

    def __init__(self, pid: int):
        self.pid, self.before, self.peak = pid, proc_status(pid), 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.2):
            try:
                self.peak = max(self.peak, proc_status(self.pid)["VmRSS"])
            except (OSError, KeyError):
                return

    def end(self) -> dict:
        self.done.set()
        self.thread.join()
        try:
            after = proc_status(self.pid)
        except (OSError, KeyError):
            after = {}
        mb = lambda kb: round(kb / 1024, 1) if kb is not None else None  # noqa: E731
        peak = max(self.peak, after.get("VmRSS", 0))
        if after.get("VmHWM", 0) > self.before["VmHWM"]:  # a new peak between two samples
            peak = max(peak, after["VmHWM"])
        return {"rss_before_mb": mb(self.before["VmRSS"]), "rss_peak_mb": mb(peak),
                "rss_growth_mb": mb(peak - self.before["VmRSS"]), "rss_after_mb": mb(after.get("VmRSS")),
                "hwm_before_mb": mb(self.before["VmHWM"]), "hwm_after_mb": mb(after.get("VmHWM"))}


def stop_server(proc, force: bool) -> str:
    """SIGKILL for the server and its children when ``force`` (or when SIGTERM did not end it in 20 s)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    how = "SIGKILL"
    if force:
        proc.send_signal(signal.SIGKILL)
    else:
        proc.terminate()
        how = "SIGTERM"
        try:
            proc.wait(20)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: force it
            proc.send_signal(signal.SIGKILL)
            how = "SIGTERM, then SIGKILL"
    proc.wait(60)
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        child.send_signal(signal.SIGKILL)
    return how


# --- attacks ----------------------------------------------------------------------------------------------------

class Background:
    """One call in a daemon thread: its seconds and outcome once it ends (via :func:`timed`)."""

    def __init__(self, call, timeout: float):
        self.t0, self.result = time.perf_counter(), None
        self.thread = threading.Thread(target=lambda: setattr(self, "result", timed(call, timeout)), daemon=True)
        self.thread.start()

    def fact(self) -> dict:
        if self.result is None:
            return {"status": "no_answer", "seconds": round(time.perf_counter() - self.t0, 2)}
        return {"status": self.result[1], "seconds": round(self.result[0], 2)}


class Attack:
    """What key A (or no key) does: :meth:`begin`, :meth:`running`, :meth:`facts` (for the JSON) and :meth:`line`
    (for the printed summary). ``settle_s``: seconds from the attack's start to B's first request beside it;
    ``to_the_end``: B goes on until the attack ends (within ``--phase-seconds``)."""

    settle_s, to_the_end = 1.0, False

    def __init__(self, url: str, args, texts: list[str]):
        self.url, self.args, self.texts = url, args, texts
        self.client = openai.OpenAI(base_url=url, api_key=A, max_retries=0, timeout=args.attack_timeout)

    def begin(self) -> None:
        raise NotImplementedError

    def running(self) -> bool:
        raise NotImplementedError

    def facts(self) -> dict:
        raise NotImplementedError

    def line(self, facts: dict) -> str:
        raise NotImplementedError

    def end(self) -> None:
        """Called once B is done, before the server is stopped: send nothing more."""


def power_grader() -> dict:
    check = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
             "operation": "eq"}
    return {"type": "multi", "name": "power", "calculate_output": "((9**999)**999)**999",
            "graders": {"exact": {**check, "name": "exact"}, "same": {**check, "name": "same"}}}


class Formula(Attack):
    def begin(self) -> None:
        self.run = Background(lambda: self.client.fine_tuning.alpha.graders.run(
            grader=power_grader(), model_sample="Paris", item={"answer": "Paris"}), self.args.attack_timeout)

    def running(self) -> bool:
        return self.run.result is None

    def facts(self) -> dict:
        return {"a_graders_run": self.run.fact()}

    def line(self, facts: dict) -> str:
        run = facts["a_graders_run"]
        return f"A's run: {run['status']} after {run['seconds']:.1f} s"


def json_body(total: int, chunk_items: int = 16384):
    """An uploads.create body of exactly ``total`` bytes: the fields it takes and a padding list of short strings,
    in chunks of about 1 MB."""
    head = b'{"filename": "train.jsonl", "purpose": "fine-tune", "bytes": 1024, "mime_type": "text/jsonl", "padding": ['
    item, tail = b'"' + b"x" * 62 + b'",', b'"x"]}'
    items, spare = divmod(total - len(head) - len(tail), len(item))
    yield head
    while items > 0:
        n = min(items, chunk_items)
        yield item * n
        items -= n
    yield b" " * spare + tail


class UnauthenticatedBody(Attack):
    """``--body-mb`` of JSON to ``/v1/uploads`` with no key over a plain socket: one thread sends (stopping once the
    answer has come), another reads the answer."""

    settle_s = 0.5

    def begin(self) -> None:
        parts = urlsplit(self.url)
        self.total = self.args.body_mb * 1_000_000
        self.sent = self.sent_at_answer = 0
        self.status = self.answer_s = self.send_error = self.read_error = None
        self.answered = threading.Event()
        self.t0 = time.perf_counter()
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=self.args.attack_timeout)
        self.head = (f"POST /v1/uploads HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {self.total}\r\n\r\n").encode()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.sender = threading.Thread(target=self._send, daemon=True)
        self.reader.start()
        self.sender.start()

    def _send(self) -> None:
        try:
            self.sock.sendall(self.head)
            for chunk in json_body(self.total):
                if self.answered.is_set():
                    return
                self.sock.sendall(chunk)
                self.sent += len(chunk)
        except OSError as exc:
            self.send_error = f"{type(exc).__name__} after {self.sent / 1e6:.1f} MB"

    def _read(self) -> None:
        try:
            reader = self.sock.makefile("rb")
            status_line = reader.readline()
            self.answer_s, self.sent_at_answer = time.perf_counter() - self.t0, self.sent
            self.status = status_line.split()[1].decode() if status_line else "closed without an answer"
        except OSError as exc:
            self.read_error = type(exc).__name__
        finally:
            self.answered.set()

    def running(self) -> bool:
        return not self.answered.is_set()

    def facts(self) -> dict:
        return {"status": self.status or ("no_answer" if self.running() else None),
                "answer_s": round(self.answer_s, 2) if self.answer_s is not None else None,
                "body_mb": self.total / 1e6, "mb_sent_at_answer": round(self.sent_at_answer / 1e6, 1),
                "mb_sent": round(self.sent / 1e6, 1), "send_error": self.send_error, "read_error": self.read_error}

    def end(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def line(self, facts: dict) -> str:
        when = f"after {facts['answer_s']:.1f} s" if facts["answer_s"] is not None else "(no answer)"
        return (f"no-key body {facts['body_mb']:.0f} MB: {facts['status']} {when}, {facts['mb_sent_at_answer']:.0f} MB "
                f"sent by then")


def long_texts(texts: list[str], size: int = 60_000) -> tuple[str, str]:
    """Two different texts of ``size`` characters from the same messages (the second in a shuffled order)."""
    def text(order):
        out, n = [], 0
        while n < size:
            for t in order:
                out.append(t)
                n += len(t) + 1
        return " ".join(out)[:size]
    shuffled = list(texts)
    random.Random(0).shuffle(shuffled)
    return text(texts), text(shuffled)


class Graders(Attack):
    settle_s = 2.0

    def begin(self) -> None:
        sample, reference = long_texts(questions(400))
        grader = {"type": "text_similarity", "name": "long", "input": "{{sample.output_text}}",
                  "reference": "{{item.reference}}", "evaluation_metric": "rouge_l"}
        self.runs = [Background(lambda: self.client.fine_tuning.alpha.graders.run(
            grader=grader, model_sample=sample, item={"reference": reference}), self.args.attack_timeout)
            for _ in range(self.args.graders)]

    def running(self) -> bool:
        return any(r.result is None for r in self.runs)

    def facts(self) -> dict:
        runs = [r.fact() for r in self.runs]
        return {"a_runs": runs, "a_status": dict(Counter(r["status"] for r in runs))}

    def line(self, facts: dict) -> str:
        secs = sorted(r["seconds"] for r in facts["a_runs"])
        return f"A's {len(secs)} rouge_l runs: {facts['a_status']}, {secs[0]:.1f}-{secs[-1]:.1f} s"


def batch_file(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


class Batches(Attack):
    """``count`` batches of one file of ``lines`` for ``endpoint``, followed every 2 s until all have ended."""

    settle_s = 5.0
    ENDED = ("completed", "failed", "cancelled", "expired")

    def __init__(self, url, args, texts, lines: list[dict], count: int, endpoint: str):
        super().__init__(url, args, texts)
        self.lines, self.count, self.endpoint = lines, count, endpoint
        self.batches, self.error, self.ended_s = [], None, None
        self.stop = threading.Event()

    def begin(self) -> None:
        self.t0 = time.perf_counter()
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        try:
            f = self.client.files.create(file=("batch.jsonl", batch_file(self.lines)), purpose="batch")
            ids = [self.client.batches.create(input_file_id=f.id, endpoint=self.endpoint,
                                              completion_window="24h").id for _ in range(self.count)]
            while not self.stop.is_set():
                self.batches = [self.client.batches.retrieve(i) for i in ids]
                if all(b.status in self.ENDED for b in self.batches):
                    self.ended_s = time.perf_counter() - self.t0
                    return
                self.stop.wait(2)
        except openai.OpenAIError as exc:
            self.error = repr(exc)[:300]

    def running(self) -> bool:
        return self.ended_s is None and self.error is None

    def facts(self) -> dict:
        out = {"a_batches": len(self.batches), "a_lines_each": len(self.lines), "a_status": dict(Counter(
            b.status for b in self.batches)), "a_lines_completed": sum(b.request_counts.completed for b in self.batches
                                                                        if b.request_counts),
               "a_lines_failed": sum(b.request_counts.failed for b in self.batches if b.request_counts),
               "a_ended_s": round(self.ended_s, 1) if self.ended_s else None, "a_error": self.error}
        done = [b for b in self.batches if b.output_file_id]
        if done and self.endpoint == "/v1/embeddings":
            try:
                quick = self.client.with_options(timeout=30)
                out["a_output_mb"] = round(sum(quick.files.retrieve(b.output_file_id).bytes for b in done) / 1e6, 1)
            except openai.OpenAIError as exc:
                out["a_output_mb"] = repr(exc)[:100]
        return out

    def end(self) -> None:
        self.stop.set()

    def line(self, facts: dict) -> str:
        ended = f"all ended after {facts['a_ended_s']} s" if facts["a_ended_s"] else "not all ended"
        out = (f"A's {facts['a_batches']} batches of {facts['a_lines_each']} lines: {facts['a_status']}, "
               f"{facts['a_lines_completed']} lines done, {ended}")
        if "a_output_mb" in facts:
            out += f", output {facts['a_output_mb']} MB"
        return out + (f", error {facts['a_error']}" if facts["a_error"] else "")


def chat_batches(url, args, texts) -> Batches:
    lines = [{"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": MODEL, "messages": [{"role": "user", "content": t}], "max_tokens": args.a_tokens, "temperature": 0}}
        for i, t in enumerate(questions(16))]
    return Batches(url, args, texts, lines, args.batches, "/v1/chat/completions")


def embeddings_batch(url, args, texts) -> Batches:
    pool = questions(2048)
    lines = [{"custom_id": f"emb-{i}", "method": "POST", "url": "/v1/embeddings", "body": {
        "model": ENCODER, "input": [f"{pool[j % len(pool)]} ({i}.{j})" for j in range(2048)]}} for i in range(12)]
    attack = Batches(url, args, texts, lines, 1, "/v1/embeddings")
    attack.settle_s, attack.to_the_end = 2.0, True
    return attack


class Flooding(Attack):
    """noisy_neighbour.py's flood by key A: ``--flood`` chat requests in flight, ``impatient``: retried at once after
    a 429 instead of after its ``retry-after``."""

    settle_s = 5.0

    def __init__(self, url, args, texts, impatient: bool):
        super().__init__(url, args, texts)
        self.impatient = impatient

    def begin(self) -> None:
        self.flood = Flood(self.url, self.args.flood, "volume", self.args.a_tokens, self.texts, impatient=self.impatient)

    def running(self) -> bool:
        return not self.flood.stop.is_set()

    def facts(self) -> dict:
        with self.flood.lock:
            return {"a_in_flight": self.args.flood, "a_impatient": self.impatient, "a_answered": self.flood.answered,
                    "a_429": self.flood.limited, "a_errors": len(self.flood.errors),
                    "a_error_sample": self.flood.errors[:3]}

    def end(self) -> None:
        self.flood.stop.set()

    def line(self, facts: dict) -> str:
        retry = "retrying at once" if self.impatient else "waiting out retry-after"
        return (f"A's {facts['a_in_flight']} in flight ({retry}): {facts['a_answered']} answered, {facts['a_429']} 429s, "
                f"{facts['a_errors']} errors")


def attack_of(name: str, url: str, args, texts: list[str]) -> Attack:
    return {"formula": lambda: Formula(url, args, texts), "body": lambda: UnauthenticatedBody(url, args, texts),
            "graders": lambda: Graders(url, args, texts), "batches": lambda: chat_batches(url, args, texts),
            "embeddings": lambda: embeddings_batch(url, args, texts),
            "flood": lambda: Flooding(url, args, texts, impatient=False),
            "flood-impatient": lambda: Flooding(url, args, texts, impatient=True)}[name]()


# --- one attack on a fresh server -------------------------------------------------------------------------------

def beside(b: KeyB, attack: Attack, args, texts: list[str]) -> tuple[list[dict], float | None]:
    """B's requests while the attack runs, and when the attack ended (seconds after it began; None: still running)."""
    t0 = time.perf_counter()
    attack.begin()
    ended = []
    watcher = threading.Thread(target=lambda: _wait_end(attack, ended, t0), daemon=True)
    watcher.start()
    time.sleep(attack.settle_s)
    deadline = t0 + args.phase_seconds
    requests = b_requests(b, texts, args.quiet_requests, lambda more: time.perf_counter() < deadline and (
        more or (attack.to_the_end and attack.running())))
    for r in requests:
        r["sent_s"] = round(r["sent_s"] + attack.settle_s, 3)  # from the attack's start
    return requests, (ended[0] if ended else None)


def _wait_end(attack: Attack, ended: list, t0: float) -> None:
    while attack.running():
        time.sleep(0.1)
    ended.append(round(time.perf_counter() - t0, 2))


def run_attack(name: str, args, texts: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"hostile-{name}-") as tmp:
        proc, url = start(args.engine, Path(tmp), [])
        attack, during = None, []
        try:
            b = KeyB(url, args)
            b_requests(b, texts[:3], 2)  # warm-up, not counted
            alone = b_requests(b, texts, args.quiet_requests)
            memory = Memory(proc.pid)
            attack = attack_of(name, url, args, texts)
            during, ended_s = beside(b, attack, args, texts)
            facts = attack.facts()
            mem = memory.end()
            exited = proc.poll()
        finally:
            if attack is not None:
                attack.end()
            how = stop_server(proc, force=attack is None or attack.running() or frozen(during))
    a, d = summary(alone), summary(during)
    return {"attack": name, "b_alone": a, "b_during": d, "ratios": ratios(a, d), "frozen": frozen(during),
            "b_pairs_during": sum(r["kind"] == "chat" for r in during), "attack_ended_s": ended_s, **facts,
            "a_summary": attack.line(facts), "server_memory": mem, "server_exit_code": exited, "server_stopped_by": how,
            "load_average": [round(x, 2) for x in os.getloadavg()], "b_requests_during": during}


def fmt(p: dict | None) -> str:
    return "-" if p is None else f"{p['p50_s']:.3f}/{p['p99_s']:.3f}"


def line(result: dict) -> str:
    a, d, r = result["b_alone"], result["b_during"], result["ratios"]
    odd = {k: v for k, v in d["outcomes"].items() if not k.endswith(":200")}
    mem = result["server_memory"]
    ended = "not while B asked" if result["attack_ended_s"] is None else f"at {result['attack_ended_s']:.1f} s"
    return (f"{result['attack']:15} B models p50/p99 {fmt(a['models'])} -> {fmt(d['models'])} s "
            f"({r.get('models_p50', '-')}x/{r.get('models_p99', '-')}x), chat {fmt(a['chat'])} -> {fmt(d['chat'])} s "
            f"({r.get('chat_p50', '-')}x/{r.get('chat_p99', '-')}x); B saw {odd or 'only 200s'}"
            f"{', FROZEN' if result['frozen'] else ''}; {result['a_summary']}; attack ended "
            f"{ended}; "
            f"server RSS {mem['rss_before_mb']:.0f} -> peak {mem['rss_peak_mb']:.0f} MB (+{mem['rss_growth_mb']:.0f}), "
            f"stopped by {result['server_stopped_by']}; load {' '.join(f'{x:.2f}' for x in result['load_average'])}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=["builtin", "vllm"], default="builtin")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of {', '.join(ATTACKS)}")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quiet-requests", type=int, default=20, help="B's (models, chat) pairs alone and beside")
    ap.add_argument("--models-timeout", type=float, default=10.0, help="seconds B waits for GET /v1/models")
    ap.add_argument("--chat-timeout", type=float, default=60.0, help="seconds B waits for a chat answer")
    ap.add_argument("--phase-seconds", type=float, default=180.0, help="B stops this long after an attack began")
    ap.add_argument("--attack-timeout", type=float, default=900.0, help="A's client timeout")
    ap.add_argument("--body-mb", type=int, default=300)
    ap.add_argument("--graders", type=int, default=8)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--flood", type=int, default=64, help="A's chat requests in flight in the floods")
    ap.add_argument("--a-tokens", type=int, default=64, help="max_tokens of A's chats (floods and batches)")
    args = ap.parse_args(argv)
    args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown:
        ap.error(f"unknown attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated run still stops its server
    load = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average at start {load}", flush=True)
    texts = questions(args.quiet_requests)
    out = {"engine": args.engine, "cpus": os.cpu_count(), "load_average_start": load,
           "settings": {k: v for k, v in vars(args).items() if k != "out"}, "attacks": {}, "lines": []}
    for name in args.attacks:
        result = run_attack(name, args, texts)
        out["attacks"][name] = result
        out["lines"].append(line(result))
        print(out["lines"][-1], flush=True)
        if args.out:  # after every attack: a run cut short keeps what it measured
            args.out.write_text(json.dumps(out, indent=2, default=str))
    print("\n" + "\n".join(out["lines"]))


if __name__ == "__main__":
    main()
