"""Peak resident memory of classification evaluation (free generation + label scoring) on the embedded
model for 10, 77 and 500 labels: bounded label chunks (ours, now) vs every label of a batch at once
(the previous implementation, kept in this script as ``previous_score_labels``).

Each measurement runs in a fresh process (peak RSS is per process). The base model's prompt lists
every label, as ``tunesmith run`` does, so the prompt grows with the label count too.

    python benchmarks/label_scoring_memory.py --prompts 8
    python benchmarks/label_scoring_memory.py --child 77 bounded 8     # one measurement (used by the test)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ["request", "status", "issue", "limit", "refund", "fee", "change", "problem", "question", "help",
         "delay", "error", "update", "cancel", "verify", "declined", "pending", "missing", "wrong", "lost"]


def label_names(n: int) -> tuple[list[str], list[str]]:
    """``n`` intent-like labels: the 10 BANKING77 intents of the example file, then variants of them."""
    with open(REPO / "examples/data/banking77_10intents.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    base = sorted({r["category"] for r in rows})
    out = list(base)
    i = 0
    while len(out) < n:
        out.append(f"{base[i % len(base)]}_{WORDS[(i // len(base)) % len(WORDS)]}_{i // (len(base) * len(WORDS))}")
        i += 1
    return out[:n], [r["text"] for r in rows]


def previous_score_labels(model, tokenizer, prompts, labels, suffix, batch_size=8, advance=lambda n: None):
    """tunesmith's label scoring before this change (commit e0cfb1b): a batch of prompts' KV cache repeated
    once per label, and the full vocabulary log-softmax of every (prompt, label) row at once."""
    import numpy as np
    import torch

    from tunesmith.generation import length_sorted_batches

    tokenizer.padding_side = "left"
    cand = [tokenizer(label + suffix, add_special_tokens=False)["input_ids"] for label in labels]
    n_lab, t_max = len(cand), max(len(c) for c in cand)
    pad = tokenizer.pad_token_id
    cand_ids = torch.tensor([c + [pad] * (t_max - len(c)) for c in cand])
    cand_mask = torch.tensor([[1] * len(c) + [0] * (t_max - len(c)) for c in cand])
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    scores = np.zeros((len(prompts), n_lab), dtype=np.float64)
    for batch in length_sorted_batches([len(e) for e in encoded], batch_size):
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
        b = len(batch)
        with torch.inference_mode():
            positions = (enc["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
            out = model(**enc, position_ids=positions, use_cache=True, logits_to_keep=1)
            first_logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
            cache = out.past_key_values
            cache.batch_repeat_interleave(n_lab)
            prompt_len = enc["attention_mask"].sum(dim=1)
            ids = cand_ids.repeat(b, 1)
            cmask = cand_mask.repeat(b, 1)
            attn = torch.cat([enc["attention_mask"].repeat_interleave(n_lab, dim=0), cmask], dim=1)
            pos = prompt_len.repeat_interleave(n_lab).unsqueeze(1) + torch.arange(t_max)
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            tok_lp = torch.empty(b * n_lab, t_max)
            tok_lp[:, 0] = first_logp.repeat_interleave(n_lab, dim=0).gather(1, ids[:, :1]).squeeze(1)
            if t_max > 1:
                tok_lp[:, 1:] = logp[:, :-1, :].gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            mean = (tok_lp * cmask).sum(1) / cmask.sum(1)
        scores[batch] = mean.view(b, n_lab).numpy()
        advance(b)
    return scores


def child(n_labels: int, mode: str, n_prompts: int) -> dict:
    import resource

    import torch

    from tunesmith import generation
    from tunesmith.config import EvalSection
    from tunesmith.data.formats.messages import chat_messages, prompt_text
    from tunesmith.kinds import make_task
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model, load_tokenizer
    from tunesmith.records import Example

    torch.set_num_threads(2)
    labels, texts = label_names(n_labels)
    if mode == "previous":  # the implementation before bounded chunks, kept below as the peer
        generation.score_labels = previous_score_labels
    placement = pick_placement("auto", "cpu")
    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", placement)
    test = [Example(str(i), {"text": t}, labels[i % len(labels)]) for i, t in enumerate(texts[:n_prompts])]
    from tunesmith.config import DataSection

    data = DataSection(path=Path("x.csv"), input_fields=["text"], target_field="y", system_prompt="Classify.")
    prompts = [prompt_text(tok, chat_messages(e, data, labels)) for e in test]
    task = make_task("classification", EvalSection(max_new_tokens=8), labels)

    class _Bar:
        def __init__(self, *a):
            pass

        def __enter__(self):
            return lambda n, info="": None

        def __exit__(self, *a):
            return False

    t0 = time.time()
    res = task.evaluate_local("base", "base", model, tok, prompts, test, _Bar)
    return {"labels": n_labels, "mode": mode, "prompts": n_prompts, "prompt_tokens": max(len(tok(p)["input_ids"]) for p in prompts),
            "seconds": round(time.time() - t0, 1), "accuracy": res.metrics["accuracy"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def measure(n_labels: int, mode: str, n_prompts: int) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--child", str(n_labels), mode, str(n_prompts)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"labels": n_labels, "mode": mode, "prompts": n_prompts, "error": (out.stderr or "")[-300:],
                "returncode": out.returncode}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--skip-previous-above", type=int, default=77,
                    help="the previous implementation is not run above this many labels (it would exhaust memory)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], int(args.child[2]))))
        return
    print(f"load average: {os.getloadavg()}")
    rows = []
    for n in (10, 77, 500):
        new = measure(n, "bounded", args.prompts)
        old = measure(n, "previous", args.prompts) if n <= args.skip_previous_above else None
        rows.append((n, new, old))
        ratio = f"{old['peak_rss_mb'] / new['peak_rss_mb']:.1f}x" if old and "peak_rss_mb" in old else "–"
        print(json.dumps({"labels": n, "bounded": new, "previous": old, "memory ratio old/new": ratio}))


if __name__ == "__main__":
    main()
