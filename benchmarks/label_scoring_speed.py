"""Speed of closed-label scoring on the embedded model (BANKING77 prompts as ``tunesmith run`` builds them for a
base model, the label list included): tunesmith's batched scoring vs two peers, on the same prompts in one run.

- ``tunesmith``: prompts in length-sorted, left-padded batches of 8 (what evaluation passes: ``eval.batch_size``
  16 // 2); the batch's KV cache shared by the candidate labels; scores kept on the device until the batch ends.
- ``one prompt at a time``: tunesmith's previous scoring, kept below: the same cache sharing, one prompt per
  forward, a host read (``.item()``) per candidate token.
- ``lm-eval-harness style``: every (prompt, label) pair its own sequence, 8 sequences per forward, the full
  vocabulary log-softmax over each continuation (how loglikelihood requests are scored by
  lm-evaluation-harness's Hugging Face backend, without its prefix cache).

Every method's scores are checked against tunesmith's (largest absolute difference printed).

    python benchmarks/label_scoring_speed.py                      # 10 and 77 intents
    python benchmarks/label_scoring_speed.py --prompts 16 --peer-pairs 80
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEN = REPO / "examples/data/banking77_10intents.csv"
FULL = REPO.parent / "shared/data/banking77/banking77_train.csv"


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def spread(rows: list[dict], n: int) -> list[dict]:
    """``n`` rows taken round-robin over the intents (the files are sorted by intent)."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["category"], []).append(r)
    out, i = [], 0
    while len(out) < n:
        for group in by.values():
            if i < len(group) and len(out) < n:
                out.append(group[i])
        i += 1
    return out


def one_prompt_at_a_time(model, tokenizer, prompts, labels, suffix, chunk_tokens=512):
    """tunesmith's label scoring before batching (commit d3e53e8): one prompt per forward, its cache shared by
    the candidates in chunks, one ``.item()`` per candidate token."""
    import numpy as np
    import torch

    from tunesmith.generation.scoring import _candidate_chunks
    from tunesmith.machine.masks import block_causal_mask

    cand = [tokenizer(label + suffix, add_special_tokens=False)["input_ids"] for label in labels]
    chunks = _candidate_chunks([len(c) for c in cand], chunk_tokens)
    scores = np.zeros((len(prompts), len(cand)), dtype=np.float64)
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            first_logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            cache, n = out.past_key_values, len(ids)
            for chunk in chunks:
                flat = [t for j in chunk for t in cand[j]]
                segment = torch.tensor([[k for k, j in enumerate(chunk) for _ in cand[j]]])
                pos = torch.tensor([[n + p for j in chunk for p in range(len(cand[j]))]])
                mask = torch.cat([torch.ones(1, 1, len(flat), n, dtype=torch.bool), block_causal_mask(segment, "bool")], dim=-1)
                logits = model(input_ids=torch.tensor([flat]), attention_mask=mask, position_ids=pos,
                               past_key_values=cache, use_cache=True).logits[0].float()
                cache.crop(-len(flat))
                logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
                start = 0
                for j in chunk:
                    c = cand[j]
                    lp = [first_logp[c[0]].item()] + [logp[start + k - 1, c[k]].item() for k in range(1, len(c))]
                    scores[i, j] = sum(lp) / len(lp)
                    start += len(c)
    return scores


def harness_style(model, tokenizer, prompts, labels, suffix, batch_size=8):
    """Every (prompt, label) pair as its own right-padded sequence, ``batch_size`` per forward, full log-softmax."""
    import numpy as np
    import torch

    pad = tokenizer.pad_token_id
    cand = [tokenizer(label + suffix, add_special_tokens=False)["input_ids"] for label in labels]
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(cand))]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    scores = np.zeros((len(prompts), len(cand)), dtype=np.float64)
    for b in range(0, len(pairs), batch_size):
        part = pairs[b:b + batch_size]
        seqs = [ids[i] + cand[j] for i, j in part]
        width = max(len(s) for s in seqs)
        x = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=x, attention_mask=attn).logits.float(), dim=-1)
        for row, (i, j) in enumerate(part):
            n, c = len(ids[i]), cand[j]
            scores[i, j] = logp[row, n - 1:n - 1 + len(c)].gather(1, torch.tensor(c)[:, None]).mean().item()
    return scores


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def run_setup(name: str, rows: list[dict], n_prompts: int, peer_pairs: int, model, tok) -> dict:
    from tunesmith.config import DataSection
    from tunesmith.data.formats.messages import chat_messages, end_of_turn, prompt_text
    from tunesmith.generation import score_labels
    from tunesmith.records import Example

    labels = sorted({r["category"] for r in rows})
    n_peer = max(1, min(n_prompts, peer_pairs // len(labels)))
    picked = spread(rows, n_prompts)
    data = DataSection(path=Path("x.csv"), input_fields=["text"], target_field="category",
                       system_prompt="Classify the banking customer message by intent.")
    prompts = [prompt_text(tok, chat_messages(Example(str(i), {"text": r["text"]}, r["category"]), data, labels))
               for i, r in enumerate(picked)]
    suffix = end_of_turn(tok)
    ours, t_ours = timed(score_labels, model, tok, prompts, labels, suffix, batch_size=8)
    single, t_single = timed(one_prompt_at_a_time, model, tok, prompts, labels, suffix)
    peer, t_peer = timed(harness_style, model, tok, prompts[:n_peer], labels, suffix)
    ms = {"tunesmith": 1000 * t_ours / len(prompts), "one prompt at a time": 1000 * t_single / len(prompts),
          "lm-eval-harness style": 1000 * t_peer / n_peer}
    return {
        "setup": name, "labels": len(labels), "prompts": len(prompts), "peer_prompts": n_peer,
        "prompt_tokens_max": max(len(tok(p)["input_ids"]) for p in prompts),
        "ms_per_prompt": {k: round(v, 1) for k, v in ms.items()},
        "speedup vs one prompt at a time": round(ms["one prompt at a time"] / ms["tunesmith"], 2),
        "speedup vs lm-eval-harness style": round(ms["lm-eval-harness style"] / ms["tunesmith"], 2),
        "max |score difference|": {"one prompt at a time": float(abs(single - ours).max()),
                                   "lm-eval-harness style": float(abs(peer - ours[:n_peer]).max())},
        "same argmax": {"one prompt at a time": bool((single.argmax(1) == ours.argmax(1)).all()),
                        "lm-eval-harness style": bool((peer.argmax(1) == ours[:n_peer].argmax(1)).all())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64, help="prompts per setup for tunesmith and the one-at-a-time loop")
    ap.add_argument("--peer-pairs", type=int, default=160,
                    help="(prompt, label) sequences for the harness-style peer: 16 prompts at 10 labels, 2 at 77")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}; torch {torch.__version__}, {args.threads} threads")
    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", pick_placement("auto", "cpu"))
    setups = [("BANKING77, 10 intents", read_rows(TEN))]
    if FULL.exists():
        setups.append(("BANKING77, 77 intents", read_rows(FULL)))
    else:
        print(f"{FULL} not found: the 77-intent setup is skipped")
    for name, rows in setups:
        print(json.dumps(run_setup(name, rows, args.prompts, args.peer_pairs, model, tok)), flush=True)
    print(f"load average after: {os.getloadavg()}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
