"""Schema-constrained local generation: llguidance (ours) vs xgrammar vs no constraint, in one run.

The embedded SmolLM2-135M-Instruct answers the same synth prompts (paraphrase and QA-from-documents
templates on the shipped examples, greedy, same max tokens) three ways: unconstrained, under
llguidance's JSON-schema mask (tunesmith.generation.constrained, what synth uses), and under xgrammar's
Hugging Face logits processor. Prints completion tokens/s, the share of replies that parse and
validate against the task's pydantic schema, import/compile seconds, and the ratios.
lm-format-enforcer 0.11.3 is not run: its transformers integration fails to import with transformers 5.x.

    python benchmarks/constrained_decoding.py [--prompts 6] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[1]


def synth_prompts(n: int) -> list[tuple[str, type, int]]:
    """(user prompt, schema, max items): paraphrase prompts on Alpaca seed instructions, QA prompts on a shipped text."""
    from tunesmith.synth.generators import Paraphrases, QAPairs, load_prompt

    rows = [json.loads(x) for x in (ROOT / "examples/data/alpaca_seed_tasks.jsonl").read_text().splitlines()]
    para = load_prompt("paraphrase", "en")
    qa = load_prompt("qa_from_documents", "en")
    doc = next((ROOT / "examples/data/docs").rglob("*.md"), None) or next((ROOT / "examples/data/docs").rglob("*.txt"))
    text = doc.read_text(encoding="utf-8")
    chunks = [text[i * 900 : (i + 1) * 900] for i in range(n)]
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append((para.substitute(n=3, question=rows[i]["instruction"]), Paraphrases, 3))
        else:
            out.append((qa.substitute(n=2, chunk=chunks[i]), QAPairs, 2))
    return out


def run(model, tok, prompts, max_tokens, make_constraint):
    from tunesmith.generation import generate

    tokens, texts, t0 = 0, [], time.perf_counter()
    for text, schema, k in prompts:  # one schema per prompt: one prompt per batch
        chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        (row,) = generate(model, tok, [chat], max_tokens, 1, constraint=make_constraint(schema, k))
        tokens += row.completion_tokens
        texts.append(row.texts[0])
    return time.perf_counter() - t0, tokens, texts


def parse_rate(prompts, texts) -> float:
    ok = 0
    for (_, schema, _), t in zip(prompts, texts, strict=True):
        try:
            schema.model_validate_json(t.strip())
            ok += 1
        except (ValidationError, ValueError):
            pass
    return ok / len(texts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    print("load average:", os.getloadavg())
    from tunesmith.generation import stop_ids
    from tunesmith.generation.constrained import JsonConstraint, bounded_schema
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model, load_tokenizer

    model, tok = load_model("smollm2-135m-instruct", pick_placement("auto")), load_tokenizer("smollm2-135m-instruct")
    prompts = synth_prompts(args.prompts)
    eos = stop_ids(tok, model)

    t0 = time.perf_counter()
    llg = {s: JsonConstraint(tok, model.config.vocab_size, eos, bounded_schema(s, k)) for _, s, k in prompts}
    llg_setup = time.perf_counter() - t0

    t0 = time.perf_counter()
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=model.config.vocab_size, stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info)
    xg = {s: compiler.compile_json_schema(json.dumps(bounded_schema(s, k)), any_whitespace=False) for _, s, k in prompts}
    xg_setup = time.perf_counter() - t0

    results = {
        "unconstrained": run(model, tok, prompts, args.max_tokens, lambda s, k: None),
        "llguidance (ours)": run(model, tok, prompts, args.max_tokens, lambda s, k: llg[s]),
        "xgrammar": run(model, tok, prompts, args.max_tokens,
                        lambda s, k: (lambda rows, start: xgr.contrib.hf.LogitsProcessor(xg[s]))),
    }
    print(f"{len(prompts)} synth prompts (paraphrase + QA), greedy, up to {args.max_tokens} new tokens")
    print(f"setup (import + tokenizer + schema compile): llguidance {llg_setup:.1f} s, xgrammar {xg_setup:.1f} s")
    for name, (secs, tokens, texts) in results.items():
        print(f"{name:18s} {tokens:5d} tokens in {secs:6.1f} s = {tokens / secs:5.1f} tok/s, "
              f"parse rate {parse_rate(prompts, texts):.0%}")
    ours, peer, free = (results[k] for k in ("llguidance (ours)", "xgrammar", "unconstrained"))
    print(f"ratio tok/s llguidance / xgrammar: {(ours[1] / ours[0]) / (peer[1] / peer[0]):.2f}x; "
          f"llguidance / unconstrained: {(ours[1] / ours[0]) / (free[1] / free[0]):.2f}x")
    print("load average:", os.getloadavg())


if __name__ == "__main__":
    main()
