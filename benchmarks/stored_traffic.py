"""Stored completions at production volume: listing by metadata and paging over ``--rows`` stored completions of
one key, a distilled fine-tuning file of ``--distill-rows`` and an eval run over ``--eval-rows`` of them, on SQLite
and on PostgreSQL side by side.

The rows are written straight into a fresh store of each backend (``CompletionStore.add``'s tables: the completion
and its metadata tags), 95% of them under the key measured and 5% under other keys, each with metadata
``team`` (one of 10 values), ``case`` (one of 1,000) and ``user`` (unique). Then, ``--queries`` times each, with
random values: a first page of 20 by a common value (``team``: 1 row in 10), by a rare one (``case``: 1 in 1,000),
by both, and a page 20 pages deep through ``after`` (the key's whole list, no filter). Each query is timed as
``CompletionStore.select`` runs it (our way: the page's ids chosen by walking the rarest pair's tags in list order,
then joined), as the tags query before it ran (``before``: the tags joined to the rows, then ordered and cut; a
fifth as many times) and as the query before the tags table ran it (the peer: every row's metadata parsed by the
database's JSON functions, ``json_each`` / ``jsonb``), p50 and p99 in ms.

The distilled file and the eval run are measured in a fresh store holding ``--distill-rows`` completions, all of the
key's, each way in a process of its own. The work's memory: the process's peak resident memory during the work
(``VmHWM``, reset through ``/proc/self/clear_refs`` before it; Linux) less what it held then. Ours reads the selection
a page at a time (``CompletionStore.walk``) and writes and checks the file line by line (``distill.written_file``)
or makes the run's rows page by page (``evals.check.stored_rows``); the peer is the way before: every selected row
loaded in one query, the file built in memory and checked as an upload, or the run's rows made of the loaded list
and its output items committed one by one (ours: a thousand to a transaction). The eval run grades every row with a
``string_check``.

    python benchmarks/stored_traffic.py --rows 1000000 --out result.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from replicas import percentiles  # noqa: E402

from tests.pg import postgres_server  # noqa: E402

KEY = "owner-measured"
CHUNK = 20_000


SYSTEM = ("You are the support assistant of a bank. Answer in one or two short sentences, name the screen of the "
          "app where the customer can do it, and never ask for a card number or a PIN.")


def fill(store, rows: int, seed: int = 0, share: float = 0.95, system: bool = False) -> float:
    """``rows`` stored completions written in chunks, ``share`` of them the measured key's (with a system prompt
    when ``system``); returns the seconds it took."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for start in range(0, rows, CHUNK):
        completions, tags = [], []
        for i in range(start, min(rows, start + CHUNK)):
            owner = KEY if rng.random() < share else f"owner-{rng.randrange(50)}"
            meta = {"team": f"t{rng.randrange(10)}", "case": f"c{rng.randrange(1000)}", "user": f"u{i}"}
            cid = f"chatcmpl-{i:08d}"
            body = json.dumps({"id": cid, "object": "chat.completion", "model": "m", "choices": [{"index": 0, "message": {
                "role": "assistant", "content": "Your card arrives in 3 to 5 working days."}, "finish_reason": "stop"}]})
            asked = [{"role": "system", "content": SYSTEM}] if system else []
            asked.append({"role": "user", "content": f"where is my card {i}"})
            completions.append((cid, owner, "m", 1_700_000_000 + i // 4, json.dumps(meta),
                                json.dumps({"messages": asked}), body))
            tags += [(cid, owner, k, v, 1_700_000_000 + i // 4, i + 1) for k, v in meta.items()]
        with store.db.transaction():
            store.db.executemany("INSERT INTO stored_completions VALUES (?, ?, ?, ?, ?, ?, ?)", completions)
            store.db.executemany("INSERT INTO stored_completion_tags VALUES (?, ?, ?, ?, ?, ?)", tags)
    store.db.execute("ANALYZE")  # the planner's statistics, as a database that has lived a while has them
    return time.perf_counter() - t0


PEER_MATCH = {  # a metadata pair matched in the row's JSON, as the selection did before the tags table
    "sqlite": "EXISTS (SELECT 1 FROM json_each(stored_completions.metadata) m WHERE m.key = ? AND m.type = 'text' "
              "AND m.value = ?)",
    "postgresql": "((stored_completions.metadata)::jsonb -> ?) = to_jsonb(?::text)",
}


def peer_select(store, metadata: dict, after=None, limit: int = 20) -> list:
    """The selection before the tags table: every row of the key, its metadata read by the JSON functions."""
    where, args = ["owner IS ?"], [KEY]
    for k, v in metadata.items():
        where.append(PEER_MATCH[store.db.kind])
        args += [k, v]
    if after is not None:
        where.append("(created_at, rowid) > (?, ?)")
        args += list(after)
    sql = f"SELECT * FROM stored_completions WHERE {' AND '.join(where)} ORDER BY created_at, rowid LIMIT ?"
    return store.db.execute(sql, [*args, limit]).fetchall()


def before_select(store, metadata: dict, after=None, limit: int = 20) -> list:
    """The tags query before this change: the pairs ordered by a count capped at 1,000, the first pair's tags joined
    to the rows, the owner matched with ``IS ?``, then ordered and cut (PostgreSQL's generic plan of the prepared
    statement sorts every tag row of the value before the ``LIMIT``)."""
    def carried(pair: tuple[str, str]) -> int:
        return store.db.execute("SELECT COUNT(*) FROM (SELECT 1 FROM stored_completion_tags WHERE owner IS ? AND "
                                "name = ? AND value = ? LIMIT 1000) carried", (KEY, *pair)).fetchone()[0]

    if not metadata:
        where, args, order = ["sc.owner IS ?"], [KEY], ("sc.created_at", "sc.rowid")
        source = "stored_completions sc"
    else:
        (name, value), *others = sorted(metadata.items(), key=carried) if len(metadata) > 1 else list(metadata.items())
        where, args, order = ["t.owner IS ?", "t.name = ?", "t.value = ?"], [KEY, name, value], ("t.created_at", "t.seq")
        source = "stored_completion_tags t JOIN stored_completions sc ON sc.id = t.completion_id"
        for k, v in others:
            where.append("EXISTS (SELECT 1 FROM stored_completion_tags u WHERE u.completion_id = sc.id AND u.name = ? "
                         "AND u.value = ?)")
            args += [k, v]
    if after is not None:
        where.append(f"({', '.join(order)}) > (?, ?)")
        args += list(after)
    sql = f"SELECT sc.* FROM {source} WHERE {' AND '.join(where)} ORDER BY {order[0]} ASC, {order[1]} ASC LIMIT ?"
    return [{**dict(r), **{k: json.loads(r[k]) for k in ("metadata", "request", "completion")}}  # read as select reads
            for r in store.db.execute(sql, [*args, limit])]


def timed(fn, n: int) -> dict:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return percentiles(times)


def measure(store, queries: int, rng: random.Random) -> dict:
    from tunesmith.serve.api.stored_completions import CompletionStore

    ours = CompletionStore(store)
    deep = ours.select(KEY, limit=20 * 20)[-1]["id"]  # the last id of page 20
    cursor = ours._cursor(KEY, deep)
    cases = {
        "common value (team, 1 in 10)": lambda: {"team": f"t{rng.randrange(10)}"},
        "rare value (case, 1 in 1,000)": lambda: {"case": f"c{rng.randrange(1000)}"},
        "both": lambda: {"team": f"t{rng.randrange(10)}", "case": f"c{rng.randrange(1000)}"},
    }
    out = {}
    for name, pick in cases.items():
        out[name] = {"ours": timed(lambda p=pick: ours.select(KEY, p(), limit=20), queries),
                     "before": timed(lambda p=pick: before_select(store, p()), max(3, queries // 5)),
                     "peer": timed(lambda p=pick: peer_select(store, p()), max(3, queries // 50))}
    out["page 21, no filter"] = {"ours": timed(lambda: ours.select(KEY, after=deep, limit=20), queries),
                                 "before": timed(lambda: before_select(store, {}, after=cursor), max(3, queries // 5)),
                                 "peer": timed(lambda: peer_select(store, {}, after=cursor), queries)}
    return out


# --- a distilled file and an eval run over many stored completions, each way in a process of its own -------------


def peer_training_lines(rows: list[dict], drop_system: bool = False) -> list[dict]:
    """The examples as the way before made them: every row's, in one list."""
    from tunesmith.serve.api.stored_completions import training_example

    return [e for e in (training_example(r, drop_system) for r in rows) if e is not None]


def distill(store, way: str) -> dict:
    """A fine-tuning file of every stored completion of the key, made and kept as the route does (less HTTP)."""
    from tunesmith.serve.api.stored_completions import CompletionStore
    from tunesmith.serve.jobs.distill import MAX_EXAMPLES, DistillBody, written_file
    from tunesmith.serve.jobs.routes import check_upload

    body = DistillBody()
    if way == "ours":
        made = written_file(store, KEY, body, {})
        kept, examples, problems = store.adopt_file(KEY, body.filename, "fine-tune", made.path), made.examples, made.problems
    else:  # the way before: the rows in one query, the file in memory, checked as an upload
        rows = CompletionStore(store).select(KEY, limit=MAX_EXAMPLES)
        lines = peer_training_lines(rows, body.drop_system_messages)
        content = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in lines).encode()
        examples, problems = len(lines), check_upload(content)
        kept = store.add_file(KEY, body.filename, "fine-tune", content)
    digest = hashlib.sha256()
    with open(kept["storage"], "rb") as f:  # read in blocks: the measured memory is the file's making, not this
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"examples": examples, "bytes": kept["bytes"], "problems": problems, "sha256": digest.hexdigest()}


EVAL_CRITERION = {"type": "string_check", "name": "answered", "operation": "ne", "input": "{{sample.output_text}}",
                  "reference": ""}


def item_by_item(store):
    """The eval store as it wrote a run's output items before: each item its own commit."""
    from tunesmith.serve.evals.store import EvalStore
    from tunesmith.serve.store import new_id

    class ItemByItem(EvalStore):
        def add_output_items(self, run_id: str, eval_id: str, items: list[dict]) -> None:
            now = int(time.time())
            for item in items:
                self._insert("eval_output_items", {"id": new_id("outputitem"), "run_id": run_id, "eval_id": eval_id,
                                                   "created_at": now, **item})

    return ItemByItem(store)


def eval_run(store, way: str, rows: int) -> dict:
    """An eval over ``rows`` stored completions of the key carrying ``team: t9`` (1 in 10; 10,139 of 100,000),
    their stored answers graded as they are."""
    from tunesmith.graders import Context
    from tunesmith.serve.api.stored_completions import CompletionStore
    from tunesmith.serve.evals.check import data_source_schema, stored_rows
    from tunesmith.serve.evals.run import execute
    from tunesmith.serve.evals.store import EvalStore

    source = {"type": "stored_completions", "metadata": {"team": "t9"}, "limit": rows}
    config = data_source_schema({"type": "stored_completions"})
    if way == "ours":
        items = stored_rows(store, KEY, source, config)
    else:  # the way before: every selected row loaded in one query, the run's rows made of the list, its
        # output items committed one by one
        found = CompletionStore(store).select(KEY, source["metadata"], limit=rows)
        items = [{"item": {"id": r["id"], "input": r["request"]["messages"], "output": r["completion"]["choices"][0][
            "message"]["content"], "model": r["model"], "metadata": r["metadata"]},
            "sample": {"output_text": r["completion"]["choices"][0]["message"]["content"]}} for r in found]
    evals = EvalStore(store) if way == "ours" else item_by_item(store)
    e = evals.add_eval(KEY, name="stored answers", data_source_config=config, testing_criteria=[EVAL_CRITERION])
    run, _ = evals.add_run(KEY, e["id"], "benchmark", name=way, model="(given samples)",
                           data_source={"type": "jsonl", "source": source})
    execute(evals, e, run, items, Context())
    done = evals.get_run(e["id"], run["id"])
    return {"status": done["status"], "counts": done["result_counts"]}


def child(args) -> None:
    """One measured way in this process: the seconds, the process's peak resident memory and the work's share."""
    from tunesmith.serve.store import Store

    store = Store(args.root, args.url)
    import tunesmith.serve.evals.run  # noqa: F401 - every module either way needs, loaded before the baseline
    import tunesmith.serve.jobs.distill  # noqa: F401
    import tunesmith.serve.jobs.routes  # noqa: F401

    kind, way = args.child.split("-")
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident memory starts again from what is held now
    before = memory_kib("VmRSS")
    t0 = time.perf_counter()
    got = distill(store, way) if kind == "distill" else eval_run(store, way, args.eval_rows)
    seconds = time.perf_counter() - t0
    peak = memory_kib("VmHWM")
    print(json.dumps({**got, "s": round(seconds, 2), "peak_mb": round(peak / 1024, 1),
                      "work_mb": round((peak - before) / 1024, 1),
                      "process_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def memory_kib(field: str) -> int:
    """This process's ``VmRSS`` (resident now) or ``VmHWM`` (its peak since the last reset) in KiB (Linux)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def measured(kind: str, root: Path, url: str | None, eval_rows: int) -> dict:
    """Ours and the peer's way, each in a fresh process on the same store, and the ratio of their peak memory."""
    out = {}
    for way in ("ours", "peer"):
        cmd = [sys.executable, __file__, "--child", f"{kind}-{way}", "--root", str(root), "--eval-rows", str(eval_rows)]
        done = subprocess.run([*cmd, *(["--url", url] if url else [])], capture_output=True, text=True, check=True)
        out[way] = json.loads(done.stdout.strip().splitlines()[-1])
    out["work_memory_ratio"] = round(out["peer"]["work_mb"] / max(out["ours"]["work_mb"], 0.1), 1)
    return out


def main() -> None:
    from tunesmith.serve.store import Store

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--distill-rows", type=int, default=100_000, help="0: no distilled file nor eval run")
    ap.add_argument("--eval-rows", type=int, default=10_000)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one measured way, in its own process
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()}, {args.rows:,} stored completions")
    results = {}
    with postgres_server(("traffic", "distill")) as urls:
        for backend, url in (("sqlite", None), ("postgresql", urls["traffic"])):
            root = Path(tempfile.mkdtemp(prefix=f"traffic-{backend}-"))
            store = Store(root, url)
            filled = fill(store, args.rows)
            results[backend] = {"fill_s": round(filled, 1), **measure(store, args.queries, random.Random(1))}
            print(f"{backend}: {args.rows:,} rows written in {filled:.0f} s")
            for name, r in results[backend].items():
                if isinstance(r, dict):
                    print(f"  {name:30s} ours p50 {r['ours']['p50_ms']:7.2f} p99 {r['ours']['p99_ms']:7.2f} ms | before "
                          f"p50 {r['before']['p50_ms']:8.2f} p99 {r['before']['p99_ms']:8.2f} ms | json functions "
                          f"p50 {r['peer']['p50_ms']:8.2f} p99 {r['peer']['p99_ms']:8.2f} ms")
            store.db.close()
            shutil.rmtree(root, ignore_errors=True)  # a million rows of SQLite: 0.7 GB
        for backend, url in (("sqlite", None), ("postgresql", urls["distill"])) if args.distill_rows else ():
            root = Path(tempfile.mkdtemp(prefix=f"distill-{backend}-"))
            store = Store(root, url)
            fill(store, args.distill_rows, seed=2, share=1.0, system=True)
            store.db.close()
            for kind in ("distill", "eval"):
                r = results[backend][kind] = measured(kind, root, url, args.eval_rows)
                same = r["ours"].get("sha256") == r["peer"].get("sha256") if kind == "distill" else \
                    r["ours"]["counts"] == r["peer"]["counts"]
                print(f"{backend} {kind} ({args.distill_rows:,} stored): ours {r['ours']['s']:.1f} s, work "
                      f"{r['ours']['work_mb']:.0f} MB (process peak {r['ours']['process_peak_mb']:.0f} MB) | before "
                      f"{r['peer']['s']:.1f} s, work {r['peer']['work_mb']:.0f} MB (process peak "
                      f"{r['peer']['process_peak_mb']:.0f} MB) | the work's memory {r['work_memory_ratio']}x less; "
                      f"same result: {same}")
            shutil.rmtree(root, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps({"rows": args.rows, "queries": args.queries, "distill_rows": args.distill_rows,
                                        "eval_rows": args.eval_rows, "results": results}, indent=2))


if __name__ == "__main__":
    main()
