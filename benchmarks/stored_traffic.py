"""Stored completions at production volume: listing by metadata and paging over ``--rows`` stored completions of
one key, on SQLite and on PostgreSQL side by side.

The rows are written straight into a fresh store of each backend (``CompletionStore.add``'s tables: the completion
and its metadata tags), 95% of them under the key measured and 5% under other keys, each with metadata
``team`` (one of 10 values), ``case`` (one of 1,000) and ``user`` (unique). Then, ``--queries`` times each, with
random values: a first page of 20 by a common value (``team``: 1 row in 10), by a rare one (``case``: 1 in 1,000),
by both, and a page 20 pages deep through ``after`` (the key's whole list, no filter). Each query is timed as
``CompletionStore.select`` runs it (our way: the first pair's tags walked in list order) and as the query before
the tags table ran it (the peer: every row's metadata parsed by the database's JSON functions, ``json_each`` /
``jsonb``), p50 and p99 in ms.

    python benchmarks/stored_traffic.py --rows 1000000 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


def fill(store, rows: int, seed: int = 0) -> float:
    """``rows`` stored completions written in chunks; returns the seconds it took."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for start in range(0, rows, CHUNK):
        completions, tags = [], []
        for i in range(start, min(rows, start + CHUNK)):
            owner = KEY if rng.random() < 0.95 else f"owner-{rng.randrange(50)}"
            meta = {"team": f"t{rng.randrange(10)}", "case": f"c{rng.randrange(1000)}", "user": f"u{i}"}
            cid = f"chatcmpl-{i:08d}"
            body = json.dumps({"id": cid, "object": "chat.completion", "choices": [{"message": {
                "role": "assistant", "content": "Your card arrives in 3 to 5 working days."}}]})
            completions.append((cid, owner, "m", 1_700_000_000 + i // 4, json.dumps(meta),
                                json.dumps({"messages": [{"role": "user", "content": f"where is my card {i}"}]}), body))
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
                     "peer": timed(lambda p=pick: peer_select(store, p()), max(3, queries // 50))}
    out["page 21, no filter"] = {"ours": timed(lambda: ours.select(KEY, after=deep, limit=20), queries),
                                 "peer": timed(lambda: peer_select(store, {}, after=cursor), queries)}
    return out


def main() -> None:
    from tunesmith.serve.store import Store

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()}, {args.rows:,} stored completions")
    results = {}
    with postgres_server(("traffic",)) as urls:
        for backend, url in (("sqlite", None), ("postgresql", urls["traffic"])):
            store = Store(Path(tempfile.mkdtemp(prefix=f"traffic-{backend}-")), url)
            filled = fill(store, args.rows)
            results[backend] = {"fill_s": round(filled, 1), **measure(store, args.queries, random.Random(1))}
            print(f"{backend}: {args.rows:,} rows written in {filled:.0f} s")
            for name, r in results[backend].items():
                if isinstance(r, dict):
                    print(f"  {name:32s} ours p50 {r['ours']['p50_ms']:8.2f} ms p99 {r['ours']['p99_ms']:8.2f} ms | "
                          f"json functions p50 {r['peer']['p50_ms']:9.2f} ms p99 {r['peer']['p99_ms']:9.2f} ms")
            store.db.close()
    if args.out:
        args.out.write_text(json.dumps({"rows": args.rows, "queries": args.queries, "results": results}, indent=2))


if __name__ == "__main__":
    main()
