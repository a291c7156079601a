"""Function calling learned from OpenAI-format examples: base vs LoRA fine-tune on held-out requests.

A small function-calling set from real BANKING77 messages (the repository's 10-intent file, CC BY 4.0):
seven intents become seven functions, and two take an argument read from the message (a lost or
stolen card's ``reason``; the ``currency`` an exchange-rate question names, ISO code, omitted when it
names none). Requests are split per function, seeded; the training file is written in OpenAI's chat
fine-tuning format (tools, the user message, the assistant's ``tool_calls``), checked by the same
validator as uploads, and trained by the same conversation rows as the jobs worker. Both models then
answer the held-out requests greedily with the tools in the prompt (``tool_choice: auto`` as the
server renders it: the hermes form) and the server's parser reads the calls back.

Reported: function-name accuracy (the first call names the expected function; no call counts as
wrong) and argument exact match (right name and exactly the expected arguments), with bootstrap 95%
intervals, and the paired difference fine-tune − base.

    python benchmarks/function_calling.py [--train-per-function 30] [--test-per-function 20] [--epochs 1]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "banking77_10intents.csv"


def _obj(props: dict | None = None) -> dict:
    return {"type": "object", "properties": props or {}}


TOOLS = [{"type": "function", "function": {"name": n, "parameters": p}} for n, p in [
    ("track_card", _obj()),
    ("report_card", _obj({"reason": {"type": "string", "enum": ["lost", "stolen"]}})),
    ("unblock_pin", _obj()),
    ("get_exchange_rate", _obj({"currency": {"type": "string"}})),
    ("close_account", _obj()),
    ("check_wallet_support", _obj()),
    ("get_transfer_time", _obj()),
]]
INTENTS = {"card_arrival": "track_card", "lost_or_stolen_card": "report_card", "pin_blocked": "unblock_pin",
           "exchange_rate": "get_exchange_rate", "terminate_account": "close_account",
           "apple_pay_or_google_pay": "check_wallet_support", "transfer_timing": "get_transfer_time"}
CURRENCIES = [("EUR", r"\beuros?\b|\beur\b|€"), ("USD", r"\bdollars?\b|\busd\b|\$"), ("GBP", r"\bpounds?\b|\bgbp\b|£"),
              ("JPY", r"\byen\b|\bjpy\b"), ("CHF", r"\bfrancs?\b|\bchf\b"), ("AUD", r"\baud\b"), ("CAD", r"\bcad\b")]


def arguments(function: str, text: str) -> dict:
    """The arguments a request states: read from the message itself, never from its label."""
    low = text.lower()
    if function == "report_card":
        return {"reason": "stolen" if re.search(r"stol|steal|theft|thie|rob", low) else "lost"}
    if function == "get_exchange_rate":
        found = [code for code, pattern in CURRENCIES if re.search(pattern, low)]
        return {"currency": found[0]} if len(found) == 1 else {}
    return {}


def build_set(path: Path, n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``{"text", "name", "arguments"}`` requests, ``n_train`` and ``n_test`` per function, seeded."""
    by_fn: dict[str, list[dict]] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            fn = INTENTS.get(row["category"])
            if fn:
                by_fn.setdefault(fn, []).append({"text": row["text"], "name": fn, "arguments": arguments(fn, row["text"])})
    rng = random.Random(seed)
    train, test = [], []
    for fn in sorted(by_fn):
        rows = by_fn[fn]
        rng.shuffle(rows)
        train += rows[:n_train]
        test += rows[n_train:n_train + n_test]
    rng.shuffle(train)
    return train, test


def example(req: dict, i: int) -> dict:
    """One request as an OpenAI chat fine-tuning example that ends on the assistant's call."""
    call = {"id": f"call_{i}", "type": "function", "function": {"name": req["name"], "arguments": json.dumps(req["arguments"])}}
    return {"tools": TOOLS, "messages": [{"role": "user", "content": req["text"]},
                                         {"role": "assistant", "tool_calls": [call]}]}


def score(outputs: list[str], test: list[dict]) -> tuple[list[float], list[float], int]:
    """Per request: name right, name and arguments right; and how many answers held no parseable call."""
    from tunesmith.data.formats.tool_format import parse_tool_calls

    names, exact, no_call = [], [], 0
    for text, req in zip(outputs, test, strict=True):
        _, calls = parse_tool_calls(text)
        no_call += not calls
        first = calls[0] if calls else {"name": None, "arguments": None}
        names.append(float(first["name"] == req["name"]))
        exact.append(float(first["name"] == req["name"] and first["arguments"] == req["arguments"]))
    return names, exact, no_call


def train_adapter(train_file: Path, out: Path, epochs: int, lr: float, seed: int):
    from contextlib import contextmanager

    from rich.console import Console

    from tunesmith.config import validate_recipe
    from tunesmith.data.formats.chat_rows import read_chat_file
    from tunesmith.train.jobs import TrainData, train

    @contextmanager
    def bar(_desc, _total):
        yield lambda *a, **k: None

    recipe = validate_recipe({"name": "function-calling", "output_dir": str(out), "seed": seed,
                              "model": {"name": "smollm2-135m-instruct"},
                              "train": {"epochs": epochs, "batch_size": 4, "learning_rate": lr, "logging_steps": 5,
                                        "max_seq_length": 1024}})
    return train(recipe, TrainData(rows=read_chat_file(train_file), val_rows=[]), Console(), bar)


def answer(model, tok, test: list[dict], adapter: str, max_new_tokens: int) -> list[str]:
    from tunesmith.data.formats.tool_format import render
    from tunesmith.generation import generate

    prompts = [render(tok, [{"role": "user", "content": r["text"]}], TOOLS, add_generation_prompt=True) for r in test]
    done = generate(model, tok, prompts, max_new_tokens, 16, adapters=[adapter] * len(prompts))
    return [g.texts[0] for g in done]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-per-function", type=int, default=30)
    ap.add_argument("--test-per-function", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "function-calling")
    ap.add_argument("--adapter", type=Path, default=None,
                    help="evaluate this adapter, trained earlier by this script with the same set options, "
                         "instead of training one (the set is rebuilt from the same seed)")
    args = ap.parse_args()

    from tunesmith.data.formats.validate import validate_chat
    from tunesmith.scoring.bootstrap import diff_ci, mean_ci

    train, test = build_set(DATA, args.train_per_function, args.test_per_function, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    train_file = args.out / "train.jsonl"
    train_file.write_text("".join(json.dumps(example(r, i)) + "\n" for i, r in enumerate(train)), encoding="utf-8")
    (args.out / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test), encoding="utf-8")
    v = validate_chat(train_file, lambda t: len(t.split()))
    assert not v.errors, v.errors
    with_args = sum(bool(r["arguments"]) for r in test)
    print(f"{len(train)} training / {len(test)} held-out requests ({with_args} held-out with arguments), "
          f"{len(TOOLS)} functions")

    start = time.time()
    result = None if args.adapter else train_adapter(train_file, args.out, args.epochs, args.lr, args.seed)
    train_s = time.time() - start
    adapter_dir = args.adapter or result.output_dir

    from peft import PeftModel

    from tunesmith.generation import BASE
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model, load_tokenizer
    from tunesmith.models.names import resolve

    tok = load_tokenizer(resolve("smollm2-135m-instruct"))
    model = PeftModel.from_pretrained(load_model(resolve("smollm2-135m-instruct"), pick_placement()),
                                      str(adapter_dir), adapter_name="ft").eval()
    start = time.time()
    rows, per = {}, {}
    for label, adapter in (("base", BASE), ("LoRA fine-tune", "ft")):
        outputs = answer(model, tok, test, adapter, args.max_new_tokens)
        names, exact, no_call = score(outputs, test)
        per[label] = (names, exact)
        rows[label] = {"name_accuracy": sum(names) / len(names), "name_ci": mean_ci(names),
                       "args_exact": sum(exact) / len(exact), "args_ci": mean_ci(exact), "no_call": no_call,
                       "examples": [{"text": r["text"], "expected": [r["name"], r["arguments"]], "output": o}
                                    for r, o in list(zip(test, outputs, strict=True))[:5]]}
    eval_s = time.time() - start
    diff_names = diff_ci(per["LoRA fine-tune"][0], per["base"][0])
    diff_exact = diff_ci(per["LoRA fine-tune"][1], per["base"][1])

    def pct(x, ci):
        return f"{100 * x:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"

    print("| model | function name accuracy [95% CI] | argument exact match [95% CI] | answers without a call |")
    print("|---|---:|---:|---:|")
    for label, m in rows.items():
        print(f"| {label} | {pct(m['name_accuracy'], m['name_ci'])} | {pct(m['args_exact'], m['args_ci'])} | "
              f"{m['no_call']} / {len(test)} |")
    print(f"fine-tune − base: name {100 * diff_names[0]:+.1f} to {100 * diff_names[1]:+.1f} points, "
          f"arguments {100 * diff_exact[0]:+.1f} to {100 * diff_exact[1]:+.1f} points (paired bootstrap 95%)")
    trained = (f"training {train_s:.0f} s ({result.tokens:,} tokens, {result.tokens_per_second:,.0f} tok/s)"
               if result else f"adapter trained earlier: {adapter_dir}")
    print(f"{trained}, evaluation {eval_s:.0f} s")
    (args.out / "metrics.json").write_text(json.dumps(
        {"rows": rows, "diff_name_ci": diff_names, "diff_args_ci": diff_exact, "train_s": train_s, "eval_s": eval_s,
         "train_tokens": result.tokens if result else None, "n_train": len(train), "n_test": len(test), "args": vars(args) | {
             "out": str(args.out), "adapter": str(adapter_dir)}}, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
