"""One API key runs its largest accepted Tinker calls on `tunesmith serve` while another key chats and makes small Tinker
calls: the other key's latencies beside them against the same requests alone.

Starts `python -m tunesmith serve` (the embedded model, the built-in engine, default settings) with two keys. Then:

1. alone: the quiet key sends ``--requests`` chat requests one after another (real BANKING77 messages, greedy,
   ``--max-tokens``), as many small Tinker samples (8 tokens from the base, through the ``tinker`` SDK) and as many
   small Tinker training calls (a ``forward_backward`` of one message, rank 8);
2. beside the heavy key: the heavy key keeps sending, one after another, the largest Tinker call this server accepts
   of ``--heavy`` kind: ``sample`` (``num_samples`` 64, ``--heavy-tokens`` new tokens each, 4 stop strings of 256
   characters) or ``step`` (a forward_backward of datums as long as its memory quota allows, then optim_step); once
   its first call runs, the quiet key sends the same requests again.

Prints the quiet key's p50 and p99 alone and beside, their ratios (the OpenAI side's goal: at most 1.5x at the median,
2x at p99), the heavy key's calls answered and refused, and the load average; ``--out`` writes it all as JSON.

    python benchmarks/tinker_neighbour.py --heavy sample --out result.json
    python benchmarks/tinker_neighbour.py --heavy step --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noisy_neighbour import KEYS, MODEL, durations, percentiles, quiet_run, start  # noqa: E402
from serving_engines import questions  # noqa: E402
from timing import machine  # noqa: E402


def tinker_client(root: str, key: str):
    import tinker

    return tinker.ServiceClient(base_url=root, api_key=f"tml-{key}")


def small_steps(training, prompts: list[list[int]]) -> list[tuple[float, float]]:
    """The quiet key's small training calls: a forward_backward of one message, one after another."""
    from tinker import types

    out = []
    for prompt in prompts:
        datum = types.Datum(model_input=types.ModelInput.from_ints(prompt[:-1]),
                            loss_fn_inputs={"target_tokens": prompt[1:], "weights": [1.0] * (len(prompt) - 1)})
        t0 = time.perf_counter()
        training.forward_backward([datum], "cross_entropy").result()
        out.append((t0, time.perf_counter()))
    return out


def small_samples(service, prompts: list[list[int]]) -> list[tuple[float, float]]:
    """The quiet key's small Tinker calls: 8 greedy tokens after each prompt, from the base, one after another."""
    from tinker import types

    client = service.create_sampling_client(base_model=MODEL).result()
    out = []
    for prompt in prompts:
        t0 = time.perf_counter()
        client.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=8, temperature=0.0)
                      ).result()
        out.append((t0, time.perf_counter()))
    return out


class Heavy:
    """The heavy key's largest accepted calls, one after another until stopped."""

    def __init__(self, root: str, kind: str, tokens: int, prompt: list[int]):
        self.stop, self.started = threading.Event(), threading.Event()
        self.answered, self.refused, self.spans = 0, [], []
        self.worker = threading.Thread(target=self._work, args=(root, kind, tokens, prompt), daemon=True)
        self.worker.start()

    def _work(self, root: str, kind: str, tokens: int, prompt: list[int]) -> None:
        from tinker import types

        with tinker_client(root, KEYS["flood"]) as service:
            if kind == "sample":
                client = service.create_sampling_client(base_model=MODEL).result()
                params = types.SamplingParams(max_tokens=tokens, temperature=1.0,
                                              stop=[("z" * 255) + str(i) for i in range(4)])
                call = lambda: client.sample(types.ModelInput.from_ints(prompt), 64, params)  # noqa: E731
            else:
                training = service.create_lora_training_client(base_model=MODEL, rank=32).result()
                long = (prompt * (tokens // len(prompt) + 1))[:tokens]
                datum = types.Datum(model_input=types.ModelInput.from_ints(long[:-1]),
                                    loss_fn_inputs={"target_tokens": long[1:], "weights": [1.0] * (len(long) - 1)})

                def call():
                    training.forward_backward([datum], "cross_entropy").result()
                    return training.optim_step(types.AdamParams(learning_rate=1e-4))
            while not self.stop.is_set():
                t0 = time.perf_counter()
                future = call()
                self.started.set()
                try:
                    future.result()
                    self.answered += 1
                    self.spans.append((t0, time.perf_counter()))
                except Exception as exc:  # noqa: BLE001 - a refusal (its reason) is reported
                    self.refused.append(str(exc)[:300])
                    self.stop.wait(1)

    def end(self) -> None:
        self.stop.set()
        self.worker.join(1800)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heavy", choices=["sample", "step"], default="sample")
    ap.add_argument("--heavy-tokens", type=int, default=None,
                    help="sample: new tokens of each of the 64 sequences (default 256); step: the datum's tokens "
                    "(default 2048)")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tokens = args.heavy_tokens or (256 if args.heavy == "sample" else 2048)
    from tunesmith.models.loading import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    texts = questions(args.requests)
    prompts = [tokenizer.encode(t) for t in texts]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start("builtin", Path(tmp), [])
        root = url[:-3]
        try:
            quiet_run(url, texts[:2], args.max_tokens)  # warm: the first request loads what it needs
            with tinker_client(root, KEYS["quiet"]) as quiet:
                small_samples(quiet, prompts[:2])
                training = quiet.create_lora_training_client(base_model=MODEL, rank=8).result()
                small_steps(training, prompts[:2])
                load = os.getloadavg()[0]
                alone_chat = durations(quiet_run(url, texts, args.max_tokens))
                alone_tinker = durations(small_samples(quiet, prompts))
                alone_step = durations(small_steps(training, prompts))
                heavy = Heavy(root, args.heavy, tokens, prompts[0])
                heavy.started.wait(600)
                time.sleep(1.0)  # its call is running in the Tinker lane
                beside_chat = durations(quiet_run(url, texts, args.max_tokens))
                beside_tinker = durations(small_samples(quiet, prompts))
                beside_step = durations(small_steps(training, prompts))
                heavy.end()
        finally:
            proc.terminate()
            proc.wait(60)
    result = {"machine": machine(), "load_average_at_start": load, "heavy": args.heavy, "heavy_tokens": tokens,
              "chat": {"alone": percentiles(alone_chat), "beside": percentiles(beside_chat)},
              "tinker": {"alone": percentiles(alone_tinker), "beside": percentiles(beside_tinker)},
              "tinker_step": {"alone": percentiles(alone_step), "beside": percentiles(beside_step)},
              "heavy_answered": heavy.answered, "heavy_refused": heavy.refused[:3],
              "heavy_call_s": percentiles(durations(heavy.spans)) if heavy.spans else None}
    raw = {"chat": (alone_chat, beside_chat), "tinker": (alone_tinker, beside_tinker),
           "tinker_step": (alone_step, beside_step)}
    for what in ("chat", "tinker", "tinker_step"):
        result[what]["latencies_s"] = {"alone": [round(x, 4) for x in raw[what][0]],
                                       "beside": [round(x, 4) for x in raw[what][1]]}
        alone, beside = result[what]["alone"], result[what]["beside"]
        result[what]["p50_ratio"] = beside["p50_s"] / alone["p50_s"]
        result[what]["p99_ratio"] = beside["p99_s"] / alone["p99_s"]
        print(f"quiet {what}: p50 {alone['p50_s']:.2f} s -> {beside['p50_s']:.2f} s ({result[what]['p50_ratio']:.2f}x), "
              f"p99 {alone['p99_s']:.2f} s -> {beside['p99_s']:.2f} s ({result[what]['p99_ratio']:.2f}x)")
    print(f"heavy {args.heavy} calls answered {heavy.answered}, refused {len(heavy.refused)}; load average at start "
          f"{load:.2f}")
    if heavy.refused:
        print("first refusal:", heavy.refused[0])
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
