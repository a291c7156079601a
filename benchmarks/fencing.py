"""What fencing costs: every write of a claim's holder in a transaction that first reads the row's generation under a
row lock (:mod:`tunesmith.serve.store.claims`), against the way before (the same writes unfenced), per training step,
per batch line and per request, on SQLite (a temporary folder) and on PostgreSQL (a server of the benchmark's own,
tests/pg.py).

1. **A training step**: the same short fine-tuning job (``--steps`` rows, batch 1, one epoch, the same seed) trained
   through :func:`tunesmith.serve.jobs.worker.run_or_fail` with its claim (fenced) and without it (the way before;
   the job is claimed and its lease renewed either way), ``--pairs`` times each, alternating. A step's seconds are
   the job's pace: from the first step's end to the last's (``on_step_end``, timed around the job's own callback),
   over the steps between. Apart from the training, the callback's store work of a step (its metrics event, its
   estimated finish, the job read back, a checkpoint every ``--save-every`` steps) is timed alone ``--writes``
   times each way, in alternating blocks.
2. **A batch line**: ``--records`` lines recorded with :meth:`BatchStore.add_chunk_result` (ours: fenced by the
   chunk's claim) and with the statements before it (the chunk's lengths updated ``WHERE claimed_by = ?`` and the
   line upserted, in one transaction), in alternating blocks.
3. **A request** (PostgreSQL only: on SQLite no places are shared): a key's place taken and given back ``--requests``
   times with :class:`SharedPlaces` (ours: the replica's true count written under the key's advisory lock, given
   back in a locked transaction too) and with the statements before it (the same sum under the lock, then
   ``in_flight = key_places.in_flight + 1``; given back by a decrement), in alternating blocks. Timed: the request's
   own part (the place taken, its give-back handed to the replicas' thread) and the whole (until the give-back is
   written).

The denominators, measured in the same run on one ``tunesmith serve`` (built-in engine, the model of the jobs, its
store on the PostgreSQL server and ``--requests-per-key`` on, so that each request takes a shared place; started
after the training, so that one model process runs at a time): a short chat request's latency (``--chats``
requests one after another, ``--max-tokens`` tokens) and a batch line's time (a batch of ``--lines`` of the same
requests: its wall time from upload to completed, polled every half second, over its lines). Prints the machine, the load average
at the start and the end, a table with the ratios, and the result as JSON (``--out`` writes it too).

    python benchmarks/fencing.py --out result.json
    python benchmarks/fencing.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import banking_rows, chat_lines  # noqa: E402
from tests.pg import postgres_server  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_throughput import MODEL, one, timed_batch  # noqa: E402
from jobs_throughput import tiny_model  # noqa: E402
from serving_engines import Served, questions  # noqa: E402
from timing import alternating, machine, stats  # noqa: E402

OWNER, HOLDER = "bench", "replica-1"
LABELS = ("card_arrival", "pin_blocked", "age_limit", "exchange_rate")
PLACES_LIMIT, KEYS = 64, 4  # a key's places never reach the limit: every place is taken


# --- a batch line -------------------------------------------------------------------------------------------------


def line_before(db, chunk: dict, line: int, custom_id: str, status: int, output_bytes: int, error_bytes: int,
                holder: str) -> None:
    """A line recorded the way before fencing: the chunk's lengths updated while ``holder`` holds it, and the line
    upserted, in one transaction."""
    from tunesmith.serve.batches.store import ClaimLost

    with db.transaction():
        if db.execute("UPDATE batch_chunks SET output_bytes = ?, error_bytes = ? WHERE id = ? AND claimed_by = ?",
                      (output_bytes, error_bytes, chunk["id"], holder)).rowcount != 1:
            raise ClaimLost(chunk["id"])
        db.execute("INSERT INTO batch_results VALUES (?, ?, ?, ?, '') ON CONFLICT (batch_id, line) DO UPDATE "
                   "SET custom_id = excluded.custom_id, status_code = excluded.status_code, body = ''",
                   (chunk["batch_id"], line, custom_id, status))


def line_cost(store, n: int, block: int) -> dict:
    """ms per line recorded, ours (fenced by the chunk's claim) and the way before, on one claimed chunk."""
    from tunesmith.serve.batches.store import BatchStore

    batches = BatchStore(store)
    bid = batches.add(OWNER, "/v1/chat/completions", "file-bench", None, 2 * n, MODEL, 86400)["id"]
    batches.add_chunks(bid, [(0, 2 * n, 0, 2 * n)], batches.claim_batch(bid, HOLDER))
    chunk, claim = batches.claim_chunk(bid, HOLDER)
    line = 0

    def timed(fenced: bool) -> float:
        nonlocal line
        line += 1
        args = (chunk, line, f"r{line}", 200, 400 * line, 0)
        t0 = time.perf_counter()
        if fenced:
            batches.add_chunk_result(*args, claim)
        else:
            line_before(store.db, *args, HOLDER)
        return time.perf_counter() - t0

    with store.claims.holding(claim):
        times = alternating({"ours": lambda: timed(True), "before": lambda: timed(False)}, n, block)
    return {way: stats(t) for way, t in times.items()}


# --- a request's place --------------------------------------------------------------------------------------------


def take_before(places, key: str, limit: int) -> int | None:
    """A place taken the way before: the same sum of the key's live rows under its advisory lock, then this
    replica's row counted up by one."""
    from tunesmith.serve.store import LEASE_S
    from tunesmith.serve.store.database import NOW

    db = places.db
    with db.transaction():
        db.serialize(f"key_places:{key}")
        used = db.execute(f"SELECT COALESCE(SUM(in_flight), 0) FROM key_places WHERE owner = ? AND seen >= {NOW} - ?",
                          (key, LEASE_S)).fetchone()[0]
        if used >= limit:
            return int(used)
        db.execute(f"INSERT INTO key_places VALUES (?, ?, 1, {NOW}) ON CONFLICT (owner, replica) DO UPDATE "
                   "SET in_flight = key_places.in_flight + 1, seen = excluded.seen", (key, places.replica))
    return None


def give_back_before(places, key: str) -> None:
    """A place given back the way before (in the replica's thread for it): this replica's row counted down by one."""
    from tunesmith.serve.store.database import NOW

    places.db.execute(f"UPDATE key_places SET in_flight = CASE WHEN in_flight > 0 THEN in_flight - 1 ELSE 0 END, "
                      f"seen = {NOW} WHERE owner = ? AND replica = ?", (key, places.replica))


def place_cost(store, n: int, block: int) -> dict:
    """Per request, ours and the way before: the request's own part (a place taken, its give-back handed to the
    replica's thread for them) and the whole (until that thread has written it)."""
    from tunesmith.serve.api.shared_limits import SharedPlaces

    places = SharedPlaces(store, HOLDER)
    turn = 0

    def timed(ours: bool) -> tuple[float, float]:
        nonlocal turn
        turn += 1
        key = f"key{turn % KEYS}"
        t0 = time.perf_counter()
        if ours:
            assert places.take(key, PLACES_LIMIT) is None
            places.give_back(key)
        else:
            assert take_before(places, key, PLACES_LIMIT) is None
            places.returns.submit(give_back_before, places, key)
        t1 = time.perf_counter()
        places.returns.submit(int).result()  # the give-back written
        return t1 - t0, time.perf_counter() - t0

    try:
        times = alternating({"ours": lambda: timed(True), "before": lambda: timed(False)}, n, block)
        left = store.db.execute("SELECT COALESCE(SUM(in_flight), 0) FROM key_places").fetchone()[0]
        assert left == 0, f"{left} places left counted"  # both ways gave every place back
    finally:
        places.close()
    return {f"{way}, {part}": stats([t[i] for t in ts]) for way, ts in times.items()
            for i, part in enumerate(("request", "with its give-back written"))}


# --- a training step ----------------------------------------------------------------------------------------------


def queued_job(store, model: str, training_file: str) -> tuple[dict, object]:
    """A new job of ``training_file`` (batch 1, one epoch), queued and claimed as the jobs worker claims it."""
    job = store.add_job(OWNER, model=model, training_file=training_file, validation_file=None, suffix=None, seed=1,
                        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1,
                                                                                          "batch_size": 1}}},
                        metadata=None)
    store.update_job(job["id"], status="queued")
    claimed, claim = store.claim_job(HOLDER, sole=store.db.kind == "sqlite")
    assert claimed["id"] == job["id"], "another job was queued"
    return claimed, claim


def step_write_cost(store, n: int, block: int, save_every: int) -> dict:
    """ms of the jobs callback's store work per step, called as the trainer calls it: through the store fenced by
    the job's claim (ours) and through the store itself (the way before)."""
    from transformers import TrainerControl, TrainerState

    from tunesmith.serve.jobs.worker import READS, job_callback
    from tunesmith.serve.store.claims import Fenced

    job, claim = queued_job(store, "m", "file-bench")
    args, control = SimpleNamespace(output_dir=str(store.root / "ckpt")), TrainerControl()
    callbacks = {"ours": job_callback(Fenced(store, claim, READS), job["id"], "ft:m", claim),
                 "before": job_callback(store, job["id"], "ft:m")}
    for callback in callbacks.values():
        callback.on_train_begin(args, TrainerState(max_steps=2 * n), control)
    step = 0

    def timed(callback) -> float:
        nonlocal step
        step += 1
        state = TrainerState(global_step=step, max_steps=2 * n)
        t0 = time.perf_counter()
        callback.on_step_end(args, state, control)
        callback.on_log(args, state, control, logs={"loss": 1.0, "mean_token_accuracy": 0.5})
        if step % save_every == 0:
            callback.on_save(args, state, control)
        return time.perf_counter() - t0

    with store.claims.holding(claim):
        times = alternating({way: lambda c=c: timed(c) for way, c in callbacks.items()}, n, block)
        assert not control.should_training_stop, "the claim was lost"
    store.update_job(job["id"], status="cancelled")  # off the queue: the next job claimed is the training's
    return {way: stats(t) for way, t in times.items()}


@contextmanager
def timed_steps(ends: list[float], hooks: list[float]):
    """The jobs worker's callback noting when each step ends (``ends``: the trainer's pace) and how long each of its
    hooks takes (``hooks``: its store reads and writes); the job is otherwise run as the worker runs it."""
    from tunesmith.serve.jobs import worker

    made = worker.job_callback

    def job_callback(*args, **kwargs):
        callback = made(*args, **kwargs)
        for name in ("on_log", "on_save", "on_step_end"):
            setattr(callback, name, timed(getattr(callback, name), name == "on_step_end"))
        return callback

    def timed(hook, end: bool):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            if end:
                ends.append(t0)
            try:
                return hook(*args, **kwargs)
            finally:
                hooks.append(time.perf_counter() - t0)
        return run

    worker.job_callback = job_callback
    try:
        yield
    finally:
        worker.job_callback = made


def train_cost(store, model: str, steps: int, pairs: int) -> dict:
    """The same job trained ``pairs`` times fenced and unfenced, alternating: seconds per step of each job, and the
    callback's hooks' ms per step."""
    from tunesmith.serve.jobs.worker import run_or_fail

    rows = banking_rows(LABELS, -(-steps // len(LABELS)))[:steps]
    training_file = store.add_file(OWNER, "train.jsonl", "fine-tune", chat_lines(rows))["id"]
    jobs: dict[str, list[dict]] = {"fenced": [], "unfenced": []}
    for pair in range(pairs):
        for way in ("fenced", "unfenced") if pair % 2 == 0 else ("unfenced", "fenced"):
            job, claim = queued_job(store, model, training_file)
            ends, hooks = [], []
            t0 = time.perf_counter()
            with timed_steps(ends, hooks), store.claims.holding(claim):
                run_or_fail(store, job, None, claim if way == "fenced" else None)
            wall = time.perf_counter() - t0
            done = store.get_job(job["id"], OWNER)
            if done["status"] != "succeeded" or len(ends) != steps:
                raise SystemExit(f"the {way} job ended {done['status']} after {len(ends)} steps: {done['error']}")
            jobs[way].append({"s_per_step": round((ends[-1] - ends[0]) / (steps - 1), 4),
                              "hooks_ms_per_step": round(sum(hooks) / steps * 1000, 3), "job_s": round(wall, 2)})
            print(f"    {way} job {pair + 1}/{pairs}: {jobs[way][-1]}", flush=True)
    return {way: {"jobs": js, "s_per_step": round(statistics.median(j["s_per_step"] for j in js), 4),
                  "fastest_s_per_step": min(j["s_per_step"] for j in js),
                  "hooks_ms_per_step": round(statistics.median(j["hooks_ms_per_step"] for j in js), 3)}
            for way, js in jobs.items()}


# --- the denominators ---------------------------------------------------------------------------------------------


def answer_times(model: str, url: str, chats: int, lines: int, max_tokens: int) -> dict:
    """On one `tunesmith serve` (built-in engine) whose store is PostgreSQL at ``url`` and whose key's requests are
    limited (each request takes a shared place): a short chat request's latency, one after another, and a batch
    line's time (a batch of the same requests, upload to completed, over its lines)."""
    import openai

    texts = questions(max(chats, lines))
    extra = ("--requests-per-key", str(PLACES_LIMIT))
    if model != MODEL:
        extra += ("--model-alias", f"{MODEL}={model}")  # the requests name MODEL
    server = Served("builtin", model, [], Path(tempfile.mkdtemp(prefix="fencing-serve-")), extra,
                    env={"TUNESMITH_DATABASE": url})
    try:
        client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=1800)
        one(client, texts[0], max_tokens)  # warm
        latency = []
        for text in texts[:chats]:
            t0 = time.perf_counter()
            one(client, text, max_tokens)
            latency.append(time.perf_counter() - t0)
        seconds, _, _ = timed_batch(client, texts[:lines], max_tokens)
    finally:
        server.stop()
    return {"chat": stats(latency), "batch_s": round(seconds, 2), "batch_lines": lines,
            "line_ms": round(seconds / lines * 1000, 2), "max_tokens": max_tokens}


# --- the run ------------------------------------------------------------------------------------------------------


def measured(kind: str, url: str | None, args) -> dict:
    """Every part but the denominators on one backend, in a fresh store."""
    from tunesmith.serve.jobs.store import JobStore
    from tunesmith.serve.store import Store

    store = JobStore(Store(Path(tempfile.mkdtemp(prefix=f"fencing-{kind}-")), url))
    try:
        out = {"lines": line_cost(store, args.records, args.block)}
        print(f"  {kind}: lines {out['lines']}", flush=True)
        if url:
            out["places"] = place_cost(store, args.requests, args.block)
            print(f"  {kind}: places {out['places']}", flush=True)
        out["step_writes"] = step_write_cost(store, args.writes, args.block, args.save_every)
        print(f"  {kind}: a step's store work {out['step_writes']}", flush=True)
        out["training"] = train_cost(store, args.model, args.steps, args.pairs)
        return out
    finally:
        store.close()


def rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """The table: (what, ours, before, ours / before, the added cost's share of what it is added to). The share is
    of the fastest request, batch line and step the run saw: an upper bound, since a loaded machine slows the model
    more than the store."""
    answers = result["answers"]
    chat_ms, line_ms = answers["chat"]["min_ms"], answers["line_ms"]
    out = []

    def row(what: str, ours: float, before: float, unit: str, share: str) -> None:
        digits = 3 if unit == "ms" else 2
        out.append((what, f"{ours:.{digits}f} {unit}", f"{before:.{digits}f} {unit}", f"{ours / before:.2f}", share))

    for kind, r in result["backends"].items():
        ours, before = r["lines"]["ours"]["p50_ms"], r["lines"]["before"]["p50_ms"]
        row(f"{kind}: a batch line recorded (p50)", ours, before, "ms",
            f"{(ours - before) / line_ms:+.3%} of a line ({line_ms:.0f} ms)")
        for part in ("request", "with its give-back written") if "places" in r else ():
            ours, before = r["places"][f"ours, {part}"]["p50_ms"], r["places"][f"before, {part}"]["p50_ms"]
            row(f"{kind}: a key's place, {part} (p50)", ours, before, "ms",
                f"{(ours - before) / chat_ms:+.3%} of a request ({chat_ms:.0f} ms)")
        train = r["training"]
        step_s = min(train[way]["fastest_s_per_step"] for way in ("fenced", "unfenced"))
        ours, before = r["step_writes"]["ours"]["p50_ms"], r["step_writes"]["before"]["p50_ms"]
        row(f"{kind}: a step's store work (p50)", ours, before, "ms",
            f"{(ours - before) / (step_s * 1000):+.3%} of a step ({step_s:.2f} s)")
        for what, key in (("median", "s_per_step"), ("fastest", "fastest_s_per_step")):
            ours, before = train["fenced"][key], train["unfenced"][key]
            row(f"{kind}: a training step ({what} of {len(train['fenced']['jobs'])} jobs)", ours, before, "s",
                f"{ours / before - 1:+.2%} (the whole step, measured)")
    return out


def table(result: dict) -> str:
    head = ("", "ours (fenced)", "before", "ratio", "added, as a share")
    body = rows(result)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(r) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, body)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny run: the tests' tiny random Llama, few of each")
    ap.add_argument("--model", default=MODEL, help="the jobs' and the server's model (default: the embedded one)")
    ap.add_argument("--steps", type=int, default=16, help="a job's steps (its rows: batch 1, one epoch)")
    ap.add_argument("--pairs", type=int, default=3, help="jobs trained each way, alternating")
    ap.add_argument("--records", type=int, default=2000, help="batch lines recorded each way")
    ap.add_argument("--requests", type=int, default=2000, help="key's places taken and given back each way")
    ap.add_argument("--writes", type=int, default=2000, help="a step's store work done each way")
    ap.add_argument("--block", type=int, default=100, help="calls of one way before the other's turn")
    ap.add_argument("--save-every", type=int, default=2, help="a checkpoint every N steps (a 16-step job's)")
    ap.add_argument("--chats", type=int, default=20, help="chat requests timed for a request's latency")
    ap.add_argument("--lines", type=int, default=256, help="lines of the batch timed for a line's time")
    ap.add_argument("--max-tokens", type=int, default=16, help="a short answer's tokens")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.pairs, args.records, args.requests, args.writes, args.block = 4, 1, 60, 60, 60, 10
        args.chats, args.lines = 3, 4
    host = machine()
    load_start = os.getloadavg()
    print(f"{host['cpus']} CPUs ({host['cpu_model']}), GPU: {host['gpu'] or 'none'}; load average at the start "
          f"{load_start}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fencing-model-") as folder:
        if args.quick and args.model == MODEL:
            args.model = str(tiny_model(Path(folder), questions(300)))
        backends = {}
        with postgres_server(("fencing", "serve")) as urls:
            for kind, url in (("sqlite", None), ("postgresql", urls["fencing"])):
                print(f"{kind}:", flush=True)
                backends[kind] = measured(kind, url, args)
            print("the denominators (tunesmith serve on PostgreSQL):", flush=True)
            answers = answer_times(args.model, urls["serve"], args.chats, args.lines, args.max_tokens)
    result = {"machine": host, "load_average": {"start": load_start, "end": os.getloadavg()},
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "answers": answers, "backends": backends}
    result["table"] = rows(result)
    print(json.dumps(result, indent=2))
    print(table(result))
    print(f"a short chat request: p50 {answers['chat']['p50_ms']:.0f} ms, fastest {answers['chat']['min_ms']:.0f} ms; "
          f"a batch line: {answers['line_ms']:.0f} ms "
          f"({answers['batch_lines']} lines in {answers['batch_s']} s); {args.max_tokens} tokens each")
    print(f"load average at the end {result['load_average']['end']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
