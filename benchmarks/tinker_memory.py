"""The server's peak memory with four keys' Tinker runs: the trainer on the builtin engine's own weights (one base in
memory, what ``tunesmith serve`` does now) against the trainer with a copy of its own (what it did before).

Each way in a fresh process of its own, in turn: the builtin engine on ``--model``, the app served in that process,
then ``--keys`` keys through the ``tinker`` SDK, each creating a LoRA run (``--rank``), a ``forward_backward`` of 8
BANKING77 messages and an ``optim_step``, a sampler checkpoint and a sample of 4 sequences of 16 tokens from it (the
engine loads the checkpoint), every run still held at the end. The process's resident memory after the engine's load
and its peak (``VmHWM``), each way, and the difference.

    python benchmarks/tinker_memory.py --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noisy_neighbour import MODEL  # noqa: E402
from serving_engines import questions  # noqa: E402
from timing import machine  # noqa: E402


def rss_gb(field: str) -> float:
    """This process's ``VmRSS`` or ``VmHWM`` in GB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return round(int(line.split()[1]) * 1024 / 1e9, 3)


def one_way(way: str, model: str, keys: int, rank: int) -> dict:
    """One way's memory, in this process: ``shared`` (the engine's weights) or ``own`` (a copy of the trainer's)."""
    import tinker
    from tinker import types

    from tunesmith.serve.app import ServeSettings, create_app
    from tunesmith.serve.engines.builtin import Engine
    from tunesmith.serve.launch import serve_in_thread

    names = [f"key-{i}" for i in range(keys)]
    engine = Engine(model, {}, wait_ms=5)
    if way == "own":  # the trainer as it was: it loads a base of its own
        engine.resident_base = lambda: None
    loaded = rss_gb("VmRSS")
    with tempfile.TemporaryDirectory() as data:
        app = create_app(ServeSettings(model=model, data_dir=Path(data), api_keys=frozenset(names)), engine)
        server, url = serve_in_thread(app)
        clients = [tinker.ServiceClient(base_url=url, api_key=f"tml-{name}") for name in names]
        held = []
        for client in clients:
            training = client.create_lora_training_client(base_model=model, rank=rank, seed=0).result()
            tok = training.get_tokenizer()
            data_ = []
            for text in questions(8):
                ids = tok.encode(text)
                data_.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                         loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}))
            training.forward_backward(data_, "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=1e-4)).result()
            sampler = training.save_weights_and_get_sampling_client("memory")
            sampler.sample(prompt=types.ModelInput.from_ints(tok.encode(questions(1)[0])), num_samples=4,
                           sampling_params=types.SamplingParams(max_tokens=16, temperature=1.0, seed=0)).result()
            held.append(training)
        shares = app.state.tinker.trainer.shares_base
        peak = rss_gb("VmHWM")
        server.should_exit = True
        server.thread.join(30)
    return {"way": way, "trainer_shares_the_engines_base": shares, "rss_after_engine_load_gb": loaded,
            "peak_rss_gb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--keys", type=int, default=4)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--way", choices=["shared", "own"], help=argparse.SUPPRESS)  # one way, in a child process
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.way:
        print(json.dumps(one_way(args.way, args.model, args.keys, args.rank)))
        return
    result = {"machine": machine(), "model": args.model, "keys": args.keys, "rank": args.rank,
              "load_start": round(os.getloadavg()[0], 2)}
    for way in ("own", "shared"):
        out = subprocess.run([sys.executable, __file__, "--way", way, "--model", args.model, "--keys", str(args.keys),
                              "--rank", str(args.rank)], capture_output=True, text=True, check=True)
        result[way] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{way:>6}: {result[way]}")
    result["load_end"] = round(os.getloadavg()[0], 2)
    saved = result["own"]["peak_rss_gb"] - result["shared"]["peak_rss_gb"]
    result["peak_saved_gb"] = round(saved, 3)
    print(f"peak memory: a copy of its own {result['own']['peak_rss_gb']} GB, the engine's base "
          f"{result['shared']['peak_rss_gb']} GB ({saved:.2f} GB less, "
          f"{result['shared']['peak_rss_gb'] / result['own']['peak_rss_gb']:.2f}x); load average "
          f"{result['load_start']} -> {result['load_end']}")
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
