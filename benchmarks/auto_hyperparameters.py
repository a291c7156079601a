"""Do "auto" hyperparameters learn a small label file? Fine-tuning jobs through the official `openai` client
against the built-in server, on 12-, 50- and 500-example BANKING77 label files (five intents), each job
created with every hyperparameter "auto" (or the ones given with --hyper), then held-out accuracy of the
base model and of each fine-tune: greedy chat completions, a reply counts when it is exactly the label.

The held-out messages (20 per intent) are the same for every size and never in a training file.
Prints one line per job (the resolved hyperparameters, steps, training time) and a markdown table with
95% bootstrap intervals.

    python benchmarks/auto_hyperparameters.py [--sizes 12 50 500] [--model smollm2-135m-instruct]
        [--hyper '{"learning_rate_multiplier": 4}']
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
import time
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parents[1]
LABELS = ("card_arrival", "top_up_failed", "pin_blocked", "exchange_rate", "age_limit")
SYSTEM = "Classify the customer message. Answer with one label: " + ", ".join(LABELS) + "."
HELD_OUT_PER_LABEL = 20


def split_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training pool, held-out) from the repository's BANKING77 file, the held-out set stratified."""
    with open(REPO / "examples" / "data" / "banking77_10intents.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["category"] in LABELS]
    random.Random(seed).shuffle(rows)
    held, pool = [], []
    for r in rows:
        (held if sum(h["category"] == r["category"] for h in held) < HELD_OUT_PER_LABEL else pool).append(r)
    return pool, held


def take_balanced(pool: list[dict], n: int) -> list[dict]:
    """``n`` rows, round robin over the labels (as even as the pool allows)."""
    by_label = {label: [r for r in pool if r["category"] == label] for label in LABELS}
    out: list[dict] = []
    while len(out) < n:
        for label in LABELS:
            if by_label[label] and len(out) < n:
                out.append(by_label[label].pop(0))
    return out


def chat_line(r: dict) -> str:
    return json.dumps({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["text"]},
                                    {"role": "assistant", "content": r["category"]}]}) + "\n"


def accuracy(client: openai.OpenAI, model: str, held: list[dict]) -> list[float]:
    """1.0 per held-out message whose greedy reply is exactly its label (requests sent together: the
    server batches them)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(r: dict) -> float:
        reply = client.chat.completions.create(model=model, temperature=0, max_tokens=12, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": r["text"]}])
        return float((reply.choices[0].message.content or "").strip() == r["category"])

    with ThreadPoolExecutor(32) as pool:
        return list(pool.map(one, held))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[12, 50, 500])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--hyper", default="{}", help="hyperparameters to send instead of 'auto' (JSON)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from tunesmith.scoring.bootstrap import mean_ci
    from tunesmith.serve.app import ServeSettings, create_app
    from tunesmith.serve.jobs.worker import work
    from tunesmith.serve.launch import serve_in_thread

    pool, held = split_rows(args.seed)
    data_dir = Path(tempfile.mkdtemp(prefix="auto-hyper-"))
    server, root = serve_in_thread(create_app(ServeSettings(model=args.model, data_dir=data_dir)))
    url = f"{root}/v1"
    client = openai.OpenAI(base_url=url, api_key="local", max_retries=0, timeout=600)
    table = []
    base = accuracy(client, args.model, held)
    table.append(("base (no fine-tuning)", "–", base, "–"))
    for n in args.sizes:
        rows = take_balanced(pool, n)
        f = client.files.create(file=(f"labels-{n}.jsonl", "".join(map(chat_line, rows)).encode()),
                                purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=args.model, training_file=f.id, seed=args.seed, method={
            "type": "supervised", "supervised": {"hyperparameters": json.loads(args.hyper)}})
        started = time.perf_counter()
        work(data_dir, once=True)
        seconds = time.perf_counter() - started
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status != "succeeded":
            raise SystemExit(f"{n} examples: job {job.status}: {job.error}")
        hyper = job.method.supervised.hyperparameters
        steps = max(cp.step_number for cp in client.fine_tuning.jobs.checkpoints.list(job.id).data)
        print(f"{n} examples: n_epochs={hyper.n_epochs} batch_size={hyper.batch_size} "
              f"learning_rate_multiplier={hyper.learning_rate_multiplier} steps={steps} job={seconds:.0f}s", flush=True)
        scores = accuracy(client, job.fine_tuned_model, held)
        table.append((f"{n} examples", f"{hyper.n_epochs} / {hyper.batch_size} / {hyper.learning_rate_multiplier:g}",
                      scores, f"{seconds:.0f} s"))
        print(f"{n} examples: held-out accuracy {sum(scores) / len(scores):.1%}", flush=True)
    server.should_exit = True
    print(f"\n{args.model}, {len(LABELS)} intents, {len(held)} held-out messages\n")
    print("| training file | epochs / batch / lr multiplier (auto) | held-out accuracy [95% CI] | job time |")
    print("|---|---|---|---|")
    for name, hyper, scores, seconds in table:
        low, high = mean_ci(scores)
        print(f"| {name} | {hyper} | {sum(scores) / len(scores):.1%} [{low:.1%}, {high:.1%}] | {seconds} |")


if __name__ == "__main__":
    main()
