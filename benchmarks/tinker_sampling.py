"""What an RL loop's sampling costs through the Tinker API, against the OpenAI completions route on the same engine and
against transformers' ``generate`` one sequence at a time.

One round of sampling as an RL loop does it: ``--prompts`` BANKING77 messages, a group of ``--group`` sequences after
each (temperature 1, ``--max-tokens`` tokens, ``stop=[]`` so that every sequence has exactly that many: each way
generates the same number of tokens), five ways on the embedded model:

- **api, num_samples**: through the ``tinker`` SDK against a real ``tunesmith serve``, one call per prompt asking the
  group (``num_samples=--group``), the calls sent at once (the cookbook's ``rl_loop.py``);
- **api, single calls**: the same round as ``prompts x group`` calls of one sequence each, sent at once (the
  cookbook's ``TinkerTokenCompleter``);
- **api, four tenants**: the same round split among four keys, each sampling its own sampler checkpoint (a rank-16
  LoRA run saved for sampling) with ``num_samples=--group``, all sent at once (one batch through four adapters);
- **openai completions** (the same engine's other door): the official ``openai`` client against the same server, one
  ``completions.create`` per prompt with the prompt's token ids and ``n=--group``, the calls sent at once, every end
  of sequence banned by ``logit_bias`` (the OpenAI API's way to keep generating, what ``stop=[]`` is to Tinker);
- **generate loop** (the peer): in this process, transformers' ``generate`` for one sequence at a time with the same
  model and parameters, each token's logprob from its raw logits (what a server without batching does; what
  tunesmith's Tinker sampling did before its calls were batched).

The ways run in alternating blocks (``--rounds`` rounds each); only one computes at a time. Prints the machine, the
load average at the start and the end, tokens per second of each way with the ratio to the peer, the server's peak
memory, and the result as JSON (``--out`` writes it too).

    python benchmarks/tinker_sampling.py --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import alternating, counting, machine, stats  # noqa: E402
from tinker_api import MODEL, KeyedServer  # noqa: E402
from tinker_trainer import generate_round, prompts  # noqa: E402

TENANTS = ("tenant-1", "tenant-2", "tenant-3", "tenant-4")


def api_round(client, rounds: list[list[int]], group: int, max_tokens: int, single: bool) -> tuple[float, int]:
    """One round through the SDK, every call sent at once: (seconds, tokens generated)."""
    from tinker import types

    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=[])
    t0 = time.perf_counter()
    if single:
        futures = [client.sample(types.ModelInput.from_ints(p), 1, params) for p in rounds for _ in range(group)]
    else:
        futures = [client.sample(types.ModelInput.from_ints(p), group, params) for p in rounds]
    answers = [f.result() for f in futures]
    seconds = time.perf_counter() - t0
    return seconds, sum(len(s.tokens) for a in answers for s in a.sequences)


def completions_round(client, model: str, rounds: list[list[int]], group: int, max_tokens: int,
                      ends: list[int]) -> tuple[float, int]:
    """One round through the OpenAI completions route, one call per prompt asking ``n=group``, every call sent at
    once (threads, as the SDK sends its calls): (seconds, tokens generated)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(prompt):
        return client.completions.create(model=model, prompt=prompt, n=group, max_tokens=max_tokens, temperature=1.0,
                                         logit_bias={str(e): -100 for e in ends})

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(rounds)) as pool:
        answers = list(pool.map(one, rounds))
    return time.perf_counter() - t0, sum(a.usage.completion_tokens for a in answers)


def tenants_round(clients, rounds: list[list[int]], group: int, max_tokens: int) -> tuple[float, int]:
    """One round through the SDK by four tenants, each sampling its own checkpoint for its share of the prompts
    (``num_samples=group`` a call), every call sent at once."""
    from tinker import types

    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=[])
    t0 = time.perf_counter()
    futures = [clients[i % len(clients)].sample(types.ModelInput.from_ints(p), group, params)
               for i, p in enumerate(rounds)]
    answers = [f.result() for f in futures]
    return time.perf_counter() - t0, sum(len(s.tokens) for a in answers for s in a.sequences)


def tenant_samplers(root: str, model: str) -> tuple[list, list]:
    """Four keys' clients, each with a run (rank 16, the output layer not adapted) saved for sampling: (their
    services, their sampling clients)."""
    import tinker

    services = [tinker.ServiceClient(base_url=root, api_key=f"tml-{k}") for k in TENANTS]
    runs = [s.create_lora_training_client(base_model=model, rank=16, seed=i, train_unembed=False).result()
            for i, s in enumerate(services)]  # (train_unembed=False: a checkpoint either engine serves)
    return services, [r.save_weights_and_get_sampling_client().result() for r in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--block", type=int, default=2)
    ap.add_argument("--model", default=MODEL, help="the served base (a GPU machine: random:llama-3.2-1b?tokenizer=...)")
    ap.add_argument("--engine", choices=["builtin", "vllm"], default="builtin",
                    help="the server's inference engine (vllm: `make vllm` first, TUNESMITH_VLLM_PYTHON)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import openai
    import tinker

    from tunesmith.generation import stop_ids
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model, load_tokenizer

    load = os.getloadavg()
    print(f"machine: {machine()}  load average at start: {load[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        server = KeyedServer(args.engine, args.model, [], Path(tmp),
                             env={"TUNESMITH_API_KEYS": ",".join(("bench", *TENANTS))})
        try:
            service = tinker.ServiceClient(base_url=server.url[:-3], api_key="tml-bench")
            client = service.create_sampling_client(base_model=args.model).result()
            services, samplers = tenant_samplers(server.url[:-3], args.model)
            model = load_model(args.model, pick_placement())
            model.eval()
            tokenizer = load_tokenizer(args.model)
            rounds = prompts(tokenizer, args.prompts)
            oai = openai.OpenAI(base_url=server.url, api_key="bench", max_retries=0, timeout=3600)
            ends = stop_ids(tokenizer, model)
            api_round(client, rounds[:1], 2, 4, False), generate_round(model, rounds[:1], 1, 4)  # warm both
            timed, tokens = counting({
                "api_num_samples": lambda: api_round(client, rounds, args.group, args.max_tokens, False),
                "openai_completions": lambda: completions_round(oai, args.model, rounds, args.group, args.max_tokens,
                                                                ends),
                "api_single_calls": lambda: api_round(client, rounds, args.group, args.max_tokens, True),
                "api_four_tenants": lambda: tenants_round(samplers, rounds, args.group, args.max_tokens),
                "generate_loop": lambda: generate_round(model, rounds, args.group, args.max_tokens)})
            times = alternating(timed, args.rounds, args.block)
            for s in (service, *services):
                s.close("success").result()
            peak_gb = round(server.peak_rss / 1e9, 2)
        except BaseException:
            log = (Path(tmp) / "serve.log").read_text(errors="replace")
            print(f"the server's log, its end:\n{log[-4000:]}", file=sys.stderr)
            raise
        finally:
            server.proc.terminate()
            server.proc.wait(30)
    per_round = args.prompts * args.group * args.max_tokens
    ways = {}
    for name, seconds in times.items():
        assert all(n == per_round for n in tokens[name]), f"{name} generated {tokens[name]}, not {per_round} a round"
        ways[name] = {**stats(seconds), "tokens_per_s": round(per_round * len(seconds) / sum(seconds), 1)}
    peer = ways["generate_loop"]["tokens_per_s"]
    result = {"machine": machine(), "model": args.model, "engine": args.engine, "load_start": round(load[0], 2),
              "load_end": round(os.getloadavg()[0], 2),
              "prompts": args.prompts, "group": args.group, "max_tokens": args.max_tokens, "rounds": args.rounds,
              "ways": ways, "ratio_num_samples": round(ways["api_num_samples"]["tokens_per_s"] / peer, 2),
              "ratio_single_calls": round(ways["api_single_calls"]["tokens_per_s"] / peer, 2),
              "ratio_four_tenants": round(ways["api_four_tenants"]["tokens_per_s"] / peer, 2),
              "tinker_over_openai": round(ways["api_num_samples"]["tokens_per_s"]
                                          / ways["openai_completions"]["tokens_per_s"], 2),
              "server_peak_rss_gb": peak_gb}
    print(f"\nA round: {args.prompts} prompts x {args.group} sequences x {args.max_tokens} tokens "
          f"({per_round} tokens), {args.rounds} rounds each way:")
    for name, way in ways.items():
        ratio = way["tokens_per_s"] / peer
        print(f"  {name:18s} {way['tokens_per_s']:8.1f} tokens/s  (median round {way['p50_ms'] / 1000:.1f} s)  "
              f"{ratio:.2f}x the generate loop")
    print(f"  Tinker sample (num_samples) / OpenAI completions (n), one engine: {result['tinker_over_openai']:.2f}x")
    print(f"server peak memory (its process tree): {peak_gb} GB; load average at end: {result['load_end']}")
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
