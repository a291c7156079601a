"""Evaluation's generation: the one engine (continuous batching) vs the path it replaced
(``model.generate`` on length-sorted fixed batches, benchmarks/peers/fixed_batch_generate.py).

Both run greedy on the same rows, with the embedded SmolLM2-135M-Instruct, the same batch size
(evaluation's default, 16) and the same limit on tokens per batch (8,192): KorQuAD questions with their
passage (passages of at most 700 tokens: Korean costs a small English tokenizer many tokens) mixed with
Stanford Alpaca seed tasks (most under 100 tokens, a few over 1,000). Each side runs in a fresh process (so that neither inherits
the other's memory): time (wall and CPU), the speed ratio, identical outputs, load average and peak
resident memory.

    python benchmarks/generation_engine.py [--korquad 16] [--alpaca 32] [--max-new-tokens 32] [--rounds 2]
    python benchmarks/generation_engine.py --device cuda --model 'random:llama-3.2-1b?tokenizer=PATH'  # a GPU

``--model`` takes any model name tunesmith loads (a ``random:`` architecture measures a GPU without a download;
its greedy text is noise, but both sides must still produce the same noise); ``--device`` and ``--precision``
are the placement (on a GPU bf16 by default: ``--precision fp32`` for a strict comparison of the two sides).

Reads ../shared/data (or $TUNESMITH_SHARED_DATA); those files are not part of the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import fixed_batch_generate  # noqa: E402

SHARED = Path(os.environ.get("TUNESMITH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MODEL = "smollm2-135m-instruct"
QA_SYSTEM = "Answer with the shortest span copied from the passage."


def korquad_messages(tok, n: int, max_tokens: int, rng: random.Random) -> list[list[dict]]:
    """One question from each of ``n`` sampled paragraphs whose passage fits in ``max_tokens`` tokens."""
    doc = json.loads((SHARED / "korquad" / "korquad_v1_dev_shared.json").read_text(encoding="utf-8"))
    paras = [p for art in doc["data"] for p in art["paragraphs"] if len(tok(p["context"])["input_ids"]) <= max_tokens]
    out = []
    for p in rng.sample(paras, n):
        qa = rng.choice(p["qas"])
        out.append([{"role": "system", "content": QA_SYSTEM},
                    {"role": "user", "content": f"context: {p['context']}\nquestion: {qa['question']}"}])
    return out


def alpaca_messages(n: int, rng: random.Random) -> list[list[dict]]:
    """``n`` sampled Stanford Alpaca seed tasks: instruction, and its first instance's input when it has one."""
    lines = (SHARED / "instructions" / "stanford_alpaca_seed_tasks.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    out = []
    for r in rng.sample(rows, n):
        task_input = r["instances"][0]["input"]
        out.append([{"role": "user", "content": r["instruction"] + (f"\n\n{task_input}" if task_input else "")}])
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(side: str, args) -> dict:
    """One side in a fresh process: its time (wall and CPU), outputs and peak resident memory."""
    import resource

    import torch

    from tunesmith.generation import generate_greedy
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(args.model)
    model = load_model(args.model, pick_placement(args.precision, args.device))
    prompts = build_prompts(tok, args)
    generate_greedy(model, tok, prompts[:2], 2, args.batch_size)  # first-call allocations, outside the timing
    fn = fixed_batch_generate.generate_greedy if side == "peer" else generate_greedy
    loaded_mb, load = rss_mb(), os.getloadavg()[0]
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    outputs = fn(model, tok, prompts, args.max_new_tokens, args.batch_size)
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {"side": side, "seconds": seconds, "cpu_seconds": cpu, "loaded_mb": loaded_mb, "peak_mb": peak_mb,
            "gpu_peak_mb": gpu_peak_mb, "device": str(model.device), "dtype": str(model.dtype),
            "load_before": load, "load_after": os.getloadavg()[0], "threads": torch.get_num_threads(),
            "new_tokens": sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outputs), "outputs": outputs}


def build_prompts(tok, args) -> list[str]:
    rng = random.Random(args.seed)
    messages = korquad_messages(tok, args.korquad, args.max_context_tokens, rng) + alpaca_messages(args.alpaca, rng)
    rng.shuffle(messages)
    return [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]


def run_child(side: str, argv: list[str]) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, *argv, "--child", side], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {NAMES[side]:<44} {result['seconds']:7.1f} s  CPU {result['cpu_seconds']:6.1f} s  peak RSS "
          f"{result['peak_mb']:5.0f} MB ({result['loaded_mb']:4.0f} MB after loading)  load average "
          f"{result['load_before']:.2f} -> {result['load_after']:.2f}"
          + (f"  GPU peak {result['gpu_peak_mb']:.0f} MB" if result["gpu_peak_mb"] else ""))
    return result


NAMES = {"peer": "model.generate, fixed length-sorted batches", "engine": "engine (continuous batching)"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--korquad", type=int, default=16)
    ap.add_argument("--alpaca", type=int, default=32)
    ap.add_argument("--max-context-tokens", type=int, default=700)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=MODEL, help="a model name tunesmith loads (random:<arch> too)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on a GPU, fp32 on a CPU), bf16, fp32")
    ap.add_argument("--rounds", type=int, default=1, help="1: peer then engine; 2: peer, engine, engine, peer")
    ap.add_argument("--child", choices=["peer", "engine"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args), ensure_ascii=False))
        return
    sys.stdout.reconfigure(line_buffering=True)
    argv = sys.argv[1:]

    import torch

    from tunesmith.models.loading import load_tokenizer

    tok = load_tokenizer(args.model)
    lengths = sorted(len(tok(p, add_special_tokens=False)["input_ids"]) for p in build_prompts(tok, args))
    gpu = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else "no GPU"
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.2f}; model {args.model}")
    print(f"{len(lengths)} prompts ({args.korquad} KorQuAD, {args.alpaca} Alpaca seed tasks), prompt tokens "
          f"min {lengths[0]} / median {statistics.median(lengths):.0f} / max {lengths[-1]}, "
          f"max_new_tokens {args.max_new_tokens}, batch {args.batch_size}, greedy; each side in its own process")
    order = ["peer", "engine"] + (["engine", "peer"] if args.rounds > 1 else [])
    runs = [run_child(side, argv) for side in order]
    peer = [r for r in runs if r["side"] == "peer"]
    ours = [r for r in runs if r["side"] == "engine"]
    t_peer, t_ours = (statistics.mean(r["seconds"] for r in rs) for rs in (peer, ours))
    c_peer, c_ours = (statistics.mean(r["cpu_seconds"] for r in rs) for rs in (peer, ours))
    same = sum(a == b for a, b in zip(ours[0]["outputs"], peer[0]["outputs"], strict=True))
    print(f"  speed-up: {t_peer / t_ours:.2f}x (wall, mean of {len(ours)}), {c_peer / c_ours:.2f}x (CPU)   "
          f"identical outputs: {same}/{len(lengths)}   about {ours[0]['new_tokens'] / t_ours:.1f} new tokens/s "
          f"(engine) vs {peer[0]['new_tokens'] / t_peer:.1f} (peer)")
    for a, b in [(a, b) for a, b in zip(ours[0]["outputs"], peer[0]["outputs"], strict=True) if a != b][:3]:
        print(f"    differs: {a[:60]!r} vs {b[:60]!r}")


if __name__ == "__main__":
    main()
