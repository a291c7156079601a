"""Six small fine-tuning jobs submitted at once through the official `openai` client: the local executor
(one job at a time in one worker) vs the Ray executor (each job a Ray task, several at once) on the same
machine. Prints the total wall time (first submission to the last job finished) and each job's queue wait
(submission to status ``running``, which for Ray includes starting its worker process; the Ray instance
itself is started before the clock).

The model is a random tiny Llama (2 layers, hidden 64) built here, so the jobs are small and the
numbers show scheduling, not model speed: 3 API keys x 2 jobs, 24 chat rows each, batch 2, 1 epoch.

    python benchmarks/jobs_throughput.py [--ray-cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parents[1]
KEYS = ("k1", "k2", "k3")


def tiny_model(folder: Path, texts: list[str]) -> Path:
    """A random 2-layer Llama with a BPE tokenizer trained on ``texts`` (the test suite's tiny model)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                                      "<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>")
    fast.chat_template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
                          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                          "{{ '<|im_start|>assistant\n' }}{% endif %}")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=True, eos_token_id=fast.eos_token_id,
                                 pad_token_id=fast.pad_token_id)).save_pretrained(folder)
    return folder


def rows() -> list[dict]:
    import csv

    with open(REPO / "examples" / "data" / "banking77_10intents.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))[:24]


def run(executor: str, model: Path, data_dir: Path, ray_cpus: int) -> dict:
    from tests.conftest import running_server
    from tunesmith.serve.app import ServeSettings, create_app
    from tunesmith.serve.engines.builtin import Engine

    stop = threading.Event()
    if executor == "ray":
        import ray

        from tunesmith.serve.jobs.ray_executor import work_on_ray

        # the cluster is up before the clock starts, as it is for a server that has been running a while
        ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False)

        target = lambda: work_on_ray(data_dir, stop=stop, poll_s=0.2, init_kwargs={"num_cpus": ray_cpus})  # noqa: E731
    else:
        import tunesmith.serve.jobs.worker as worker

        worker.SHUTDOWN = stop
        target = lambda: worker.work(data_dir, poll_s=0.2)  # noqa: E731
    body = "".join(json.dumps({"messages": [{"role": "user", "content": r["text"]},
                                            {"role": "assistant", "content": r["category"]}]}) + "\n" for r in rows())
    settings = ServeSettings(model=str(model), api_keys=frozenset(KEYS), data_dir=data_dir)
    with running_server(create_app(settings, Engine(str(model), {}, wait_ms=5))) as url:
        clients = {k: openai.OpenAI(base_url=url, api_key=k, max_retries=0) for k in KEYS}
        files = {k: c.files.create(file=("t.jsonl", body.encode()), purpose="fine-tune").id for k, c in clients.items()}
        threading.Thread(target=target, daemon=True).start()
        submitted, started, finished, status = {}, {}, {}, {}
        t0 = time.perf_counter()
        for _ in range(2):
            for k, c in clients.items():
                job = c.fine_tuning.jobs.create(model=str(model), training_file=files[k], seed=1, method={
                    "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}})
                submitted[job.id] = (k, time.perf_counter())
        while len(finished) < len(submitted):
            for jid, (k, _) in submitted.items():
                if jid in finished:
                    continue
                job = clients[k].fine_tuning.jobs.retrieve(jid)
                if job.status != "queued":
                    started.setdefault(jid, time.perf_counter())
                if job.status in ("succeeded", "failed", "cancelled"):
                    finished[jid], status[jid] = time.perf_counter(), job.status
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        stop.set()
    waits = [started[j] - submitted[j][1] for j in submitted]
    return {"wall": wall, "waits": waits, "statuses": sorted(status.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    args = ap.parse_args()
    import sys

    sys.path.insert(0, str(REPO))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "model", [r["text"] for r in rows()] * 4)
        results = {name: run(name, model, Path(tmp) / name, args.ray_cpus) for name in ("local", "ray")}
    print(f"machine: {os.cpu_count()} CPU cores; 6 jobs (3 keys x 2), 12 steps each, tiny random Llama")
    print("| executor | jobs succeeded | total wall time | queue wait median | queue wait max |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        ok = r["statuses"].count("succeeded")
        print(f"| {name} | {ok}/6 | {r['wall']:.1f} s | {statistics.median(r['waits']):.1f} s | {max(r['waits']):.1f} s |")
    print(f"ratio local / ray wall time: {results['local']['wall'] / results['ray']['wall']:.2f}x")


if __name__ == "__main__":
    main()
