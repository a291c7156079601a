"""lm-evaluation-harness itself against a `tunesmith serve` process: its ``local-completions`` model scores a
multiple-choice task (token-id prompts, ``echo`` with ``logprobs``, ``max_tokens`` 1) and its
``local-chat-completions`` model answers a generation task, and on every item they choose and answer as its own
``hf`` backend does on the same weights, the loglikelihoods within 1e-4 relative. On the embedded model: the built-in
engine in `make test`, vLLM in `make test-vllm`. The tasks are local YAML files over a small JSONL file, run
offline."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import EMBEDDED, banking_rows, http_get, vllm_or_skip

LABELS = ("card_arrival", "pin_blocked", "age_limit", "exchange_rate")
KEY = "harness-key"


def tasks_folder(folder: Path) -> Path:
    """A multiple-choice task (which intent a message has: one of four labels) and a generation task (the intent,
    asked in a chat turn), each over 8 BANKING77 messages."""
    rows = banking_rows(LABELS, 2)
    folder.mkdir(parents=True)
    with open(folder / "items.jsonl", "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({"text": r["text"], "choices": list(LABELS),
                                 "label": LABELS.index(r["category"]), "category": r["category"]}) + "\n")
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / "items.jsonl")}},
              "test_split": "test"}
    mc = common | {"task": "intent_choice", "output_type": "multiple_choice",
                   "doc_to_text": "Message: {{text}}\nIntent:", "doc_to_choice": "{{choices}}",
                   "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}
    gen = common | {"task": "intent_answer", "output_type": "generate_until",
                    "doc_to_text": "Name the intent of this message: {{text}}", "doc_to_target": "{{category}}",
                    "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
                    "metric_list": [{"metric": "exact_match"}]}
    for doc in (mc, gen):
        (folder / f"{doc['task']}.yaml").write_text(json.dumps(doc), encoding="utf-8")  # JSON is YAML
    return folder


def lm_eval(tasks: Path, runs: list[dict], out: Path) -> dict[str, dict[int, list]]:
    """lm-evaluation-harness's evaluations (offline, in one process: tests/lm_eval_runs.py); each run's responses
    by item."""
    spec = out / "runs.json"
    spec.write_text(json.dumps({"include_path": str(tasks), "runs": runs}), encoding="utf-8")
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("lm_eval_runs.py")), str(spec)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return {name: {int(k): v for k, v in by_item.items()}
            for name, by_item in json.loads(done.stdout.splitlines()[-1]).items()}


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(abs(a), abs(b), 1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: str, engine: str, data_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`tunesmith serve` on ``engine``, one API key; (the process, its root URL) once it answers."""
    port = free_port()
    exe = Path(sys.executable).with_name("tunesmith")
    proc = subprocess.Popen([str(exe), "serve", "--model", model, "--engine", engine, "--data-dir", str(data_dir),
                             "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "TUNESMITH_API_KEYS": KEY})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while time.time() < deadline:
        try:
            if http_get(f"{url}/v1/models", KEY, timeout=5)[0] == 200:
                return proc, url
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"the server did not answer within 900 s: {log.read_text()[-3000:]}")


def compare_with_hf(tmp_path: Path, engine: str, model: str, folder: str) -> None:
    """The harness's two API models against the server, and its hf backend on ``folder`` (the same weights)."""
    tasks = tasks_folder(tmp_path / "tasks")
    api = ["tokenizer_backend=huggingface", f"tokenizer={folder}", f"model={model}", "max_retries=1"]
    hf = f"pretrained={folder},dtype=float32"
    proc, url = serve(model, engine, tmp_path / "data", tmp_path / "serve.log")
    try:
        runs = lm_eval(tasks, [
            {"name": "scored", "model": "local-completions", "task": "intent_choice",  # 8 prompts a request
             "model_args": ",".join([*api, f"base_url={url}/v1/completions", "batch_size=8"])},
            {"name": "answered", "model": "local-chat-completions", "task": "intent_answer", "apply_chat_template": True,
             "model_args": f"model={model},base_url={url}/v1/chat/completions,max_retries=1,num_concurrent=4"},
            {"name": "hf_scored", "model": "hf", "task": "intent_choice", "model_args": hf},
            {"name": "hf_answered", "model": "hf", "task": "intent_answer", "model_args": hf,
             "apply_chat_template": True}], tmp_path)
    finally:
        proc.terminate()
        proc.wait(60)
    assert sorted(runs["scored"]) == sorted(runs["hf_scored"]) == list(range(8))
    for doc_id, resps in runs["scored"].items():
        ours, theirs = [float(r[0][0]) for r in resps], [float(r[0][0]) for r in runs["hf_scored"][doc_id]]
        assert ours.index(max(ours)) == theirs.index(max(theirs)), (doc_id, ours, theirs)
        assert all(close(a, b) for a, b in zip(ours, theirs, strict=True)), (doc_id, ours, theirs)
    answers = [resps[0][0] for _, resps in sorted(runs["answered"].items())]
    assert answers == [resps[0][0] for _, resps in sorted(runs["hf_answered"].items())]
    assert sum(bool(a.strip()) for a in answers) >= 6, answers  # the model answered, not an empty string each time


@pytest.mark.slow
def test_lm_eval_scores_and_answers_through_the_builtin_engine_as_its_hf_backend(tmp_path):
    from tunesmith.models import registry

    if not registry.is_cached(EMBEDDED):
        pytest.skip(f"{EMBEDDED} not cached; run `tunesmith models pull {EMBEDDED}`")
    compare_with_hf(tmp_path, "builtin", EMBEDDED, str(registry.cached_path(EMBEDDED)))


@pytest.mark.vllm
@pytest.mark.slow
def test_lm_eval_scores_and_answers_through_vllm_as_its_hf_backend(tmp_path):
    from tunesmith.models import registry

    vllm_or_skip()
    compare_with_hf(tmp_path, "vllm", EMBEDDED, str(registry.cached_path(EMBEDDED)))
