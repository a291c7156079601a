"""What the Tinker API costs a training loop, and what four tenants get from sharing one base.

1. **A step through the API against the same step in process.** The same LoRA step (``forward_backward`` of
   ``--batch`` BANKING77 examples with ``cross_entropy``, then ``optim_step``) run ``--steps`` times through the
   ``tinker`` SDK against a real ``tunesmith serve`` (built-in engine, the embedded model) and ``--steps`` times by
   tunesmith's trainer called directly in this process (:class:`tunesmith.serve.tinker.trainer.Trainer`, the code the
   server runs, without HTTP, futures or the store), in alternating blocks of ``--block`` (both see the same load).
   A step's seconds: from its submission to both answers. Only one of the two computes at a time.
2. **Four tenants at once against one after another.** Four keys, each its own client and run, ``--tenant-steps``
   steps each: all four loops at once (threads), then the same four loops one after another. The ratio is what
   sharing the base gains over queueing whole loops. Measured on the default server (the keys' calls waiting together
   run as one step while they fit one pass, each row through its own run's adapter) and on a second one started with
   ``--no-tinker-fused-steps`` (each call takes its turn alone), its peak memory beside.
3. **A step through two replicas behind a per-request round robin** (``--replicas``, on by default where PostgreSQL
   is installed: a server of the benchmark's own, initdb in a temporary folder, a Unix socket): the same step through
   the SDK, each call sent to the next replica in turn, so about half of a run's training calls reach the replica that
   does not hold the run and go through the store's command log (:mod:`tunesmith.serve.tinker.commands`), against the
   same step in process, alternating as in 1. What it costs a loop to need no sticky routing.

Prints the machine, the load average at the start and the end, the server's peak memory, both tables and the result
as JSON (``--out`` writes it too).

    python benchmarks/tinker_api.py --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_engines import Served  # noqa: E402
from timing import alternating, machine, stats  # noqa: E402

from tests.conftest import banking_rows  # noqa: E402
from tests.pg import missing, postgres_server  # noqa: E402
from tests.round_robin import round_robin  # noqa: E402

MODEL = "smollm2-135m-instruct"
LABELS = ("card_arrival", "pin_blocked", "age_limit", "exchange_rate")
KEYS = ("tenant-1", "tenant-2", "tenant-3", "tenant-4")


class KeyedServer(Served):
    """A `tunesmith serve` with API keys: ready when its keyless /health answers (its /v1/models needs a key); a
    ``random:<arch>`` model (a GPU machine's 1B, without the hub) is served with ``--allow-random-model``."""

    def __init__(self, engine: str, model: str, adapters: list[str], data_dir: Path, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        random = ("--allow-random-model",) if model.startswith("random:") else ()
        super().__init__(engine, model, adapters, data_dir, (*extra, *random), env)

    def ready_url(self) -> str:
        return f"{self.url[:-3]}/health"


def examples(tokenizer, n: int) -> list[tuple[list[int], list[float]]]:
    """``n`` BANKING77 messages with their label as the answer: (tokens, a weight per token: 1 on the answer)."""
    out = []
    for row in banking_rows(LABELS, n)[:n]:
        prompt = tokenizer.encode(f"Classify: {row['text']}\nLabel:")
        answer = tokenizer.encode(" " + row["category"]) + [tokenizer.eos_token_id]
        out.append((prompt + answer, [0.0] * len(prompt) + [1.0] * len(answer)))
    return out


def sdk_batch(rows):
    from tinker import types

    return [types.Datum(model_input=types.ModelInput.from_ints(t[:-1]),
                        loss_fn_inputs={"target_tokens": t[1:], "weights": w[1:]}) for t, w in rows]


def wire_batch(rows):
    import numpy as np

    from tunesmith.serve.tinker.wire import Datum

    return [Datum(t[:-1], {"target_tokens": np.array(t[1:]), "weights": np.array(w[1:], dtype=np.float32)})
            for t, w in rows]


def api_step(client, batch, lr: float) -> float:
    from tinker import types

    t0 = time.perf_counter()
    fwd = client.forward_backward(batch, "cross_entropy")
    opt = client.optim_step(types.AdamParams(learning_rate=lr))
    fwd.result()
    opt.result()
    return time.perf_counter() - t0


def local_step(trainer, name: str, batch, lr: float) -> float:
    t0 = time.perf_counter()
    trainer.forward_backward(name, batch, "cross_entropy", {}, backward=True)
    trainer.optim_step(name, {"learning_rate": lr})
    return time.perf_counter() - t0


def tenants(root: str, model: str, rows, steps: int, lr: float) -> dict:
    """Four keys' loops at once, then one after another: wall seconds each way."""
    import tinker

    services = [tinker.ServiceClient(base_url=root, api_key=f"tml-{k}") for k in KEYS]
    clients = [s.create_lora_training_client(base_model=model, rank=16, seed=i).result()
               for i, s in enumerate(services)]
    batch = sdk_batch(rows)
    api_step(clients[0], batch, lr)  # warm

    def loop(client):
        for _ in range(steps):
            api_step(client, batch, lr)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    together = time.perf_counter() - t0
    t0 = time.perf_counter()
    for c in clients:
        loop(c)
    apart = time.perf_counter() - t0
    for s in services:
        s.close("success").result()
    return {"together_s": round(together, 2), "one_after_another_s": round(apart, 2),
            "speedup": round(apart / together, 3), "steps_each": steps}


def through_replicas(model: str, rows, trainer, steps: int, block: int, lr: float, tmp: Path) -> dict:
    """Part 3: the API step through a round robin of two replicas on one PostgreSQL, alternating with the step in
    process; each way's step statistics and the share of training calls the proxy sent to each replica."""
    import tinker

    env = {"TUNESMITH_API_KEYS": "bench"}
    with postgres_server() as urls:
        env["TUNESMITH_DATABASE"] = urls["tunesmith"]
        servers = []
        try:
            (tmp / "shared").mkdir()
            for _ in range(2):  # one data folder, one database: replicas
                servers.append(KeyedServer("builtin", model, [], tmp / "shared", env=env))
            with round_robin([s.url[:-3] for s in servers]) as (proxy, sent):
                service = tinker.ServiceClient(base_url=proxy, api_key="tml-bench")
                client = service.create_lora_training_client(base_model=model, rank=16, seed=0).result()
                sdk, local = sdk_batch(rows), wire_batch(rows)
                trainer.create("replicas", 16, 0)
                api_step(client, sdk, lr), local_step(trainer, "replicas", local, lr)  # warm both
                times = alternating({"api_replicas": lambda: api_step(client, sdk, lr),
                                     "in_process": lambda: local_step(trainer, "replicas", local, lr)}, steps, block)
                trainer.drop("replicas")
                service.close("success").result()
                calls = [u for u, path in sent if path.endswith(("/forward_backward", "/optim_step"))]
        finally:
            for server in servers:
                server.proc.terminate()
                server.proc.wait(30)
    step = {way: stats(t) for way, t in times.items()}
    return {"step": step, "overhead": round(step["api_replicas"]["p50_ms"] / step["in_process"]["p50_ms"] - 1, 4),
            "training_calls_per_replica": [calls.count(s.url[:-3]) for s in servers]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tenant-steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--model", default=MODEL, help="the served base (a GPU machine: random:llama-3.2-1b?tokenizer=...)")
    ap.add_argument("--replicas", action=argparse.BooleanOptionalAction, default=missing() is None,
                    help="part 3: the step through a round robin of two replicas on PostgreSQL (default: on where "
                         "PostgreSQL is installed)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import tinker

    from tunesmith.serve.tinker.trainer import Trainer

    load = os.getloadavg()
    print(f"machine: {machine()}  load average at start: {load[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        server = KeyedServer("builtin", args.model, [], Path(tmp), env={"TUNESMITH_API_KEYS": ",".join(("bench", *KEYS))})
        root = server.url[:-3]
        try:
            service = tinker.ServiceClient(base_url=root, api_key="tml-bench")
            client = service.create_lora_training_client(base_model=args.model, rank=16, seed=0).result()
            rows = examples(client.get_tokenizer(), args.batch)
            trainer = Trainer(args.model)
            trainer.create("local", 16, 0)
            sdk, local = sdk_batch(rows), wire_batch(rows)
            api_step(client, sdk, args.lr), local_step(trainer, "local", local, args.lr)  # warm both
            times = alternating({"api": lambda: api_step(client, sdk, args.lr),
                                 "in_process": lambda: local_step(trainer, "local", local, args.lr)},
                                args.steps, args.block)
            trainer.drop("local")
            service.close("success").result()
            if args.replicas:
                replicated = through_replicas(args.model, rows, trainer, args.steps, args.block, args.lr, Path(tmp))
            many = tenants(root, args.model, rows, args.tenant_steps, args.lr)
            peak_gb = round(server.peak_rss / 1e9, 2)
        finally:
            server.proc.terminate()
            server.proc.wait(30)
        (Path(tmp) / "unfused").mkdir()
        unfused_server = KeyedServer("builtin", args.model, [], Path(tmp) / "unfused",
                                     extra=("--no-tinker-fused-steps",), env={"TUNESMITH_API_KEYS": ",".join(KEYS)})
        try:
            unfused = tenants(unfused_server.url[:-3], args.model, rows, args.tenant_steps, args.lr)
            unfused["server_peak_rss_gb"] = round(unfused_server.peak_rss / 1e9, 2)
        finally:
            unfused_server.proc.terminate()
            unfused_server.proc.wait(30)
    step = {way: stats(t) for way, t in times.items()}
    overhead = step["api"]["p50_ms"] / step["in_process"]["p50_ms"] - 1
    result = {"machine": machine(), "model": args.model, "load_start": round(load[0], 2), "load_end": round(os.getloadavg()[0], 2),
              "batch": args.batch, "steps": args.steps, "step": step,
              "api_overhead": round(overhead, 4), "mean_overhead": round(
                  statistics.mean(times["api"]) / statistics.mean(times["in_process"]) - 1, 4),
              "tenants": many, "tenants_unfused": unfused, "server_peak_rss_gb": peak_gb,
              "replicas": replicated if args.replicas else None}
    print(f"\nA step ({args.batch} examples, forward_backward + optim_step), median of {args.steps}:")
    print(f"  in process   {step['in_process']['p50_ms']:9.1f} ms")
    print(f"  through API  {step['api']['p50_ms']:9.1f} ms   overhead {overhead * 100:+.1f}% (goal <= 5%)")
    print(f"\nFour tenants, {args.tenant_steps} steps each: at once {many['together_s']} s, one after another "
          f"{many['one_after_another_s']} s: {many['speedup']}x (goal >= 1.3x)")
    print(f"  with --no-tinker-fused-steps: at once {unfused['together_s']} s, one after another "
          f"{unfused['one_after_another_s']} s: {unfused['speedup']}x; that server's peak "
          f"{unfused['server_peak_rss_gb']} GB")
    if args.replicas:
        rs = replicated["step"]
        print(f"\nThrough a round robin of two replicas on PostgreSQL, median of {args.steps}: in process "
              f"{rs['in_process']['p50_ms']:.1f} ms, through the API {rs['api_replicas']['p50_ms']:.1f} ms: overhead "
              f"{replicated['overhead'] * 100:+.1f}% (training calls per replica: "
              f"{replicated['training_calls_per_replica']})")
    print(f"server peak memory (its process tree): {peak_gb} GB; load average at end: {result['load_end']}")
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
