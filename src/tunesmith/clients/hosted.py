"""``tunesmith train RECIPE --backend openai``: the same recipe, trained by an OpenAI-compatible
fine-tuning API (OpenAI itself, or ``tunesmith serve`` on another machine).

Uploads the prepared splits as chat JSONL, creates the job with the official ``openai`` client,
follows its events with a progress bar, downloads the result file (raw CSV or base64, as the
cookbook decodes it) and writes the same ``train/metrics.csv`` and ``loss.png`` as a local run.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import os
import time
from pathlib import Path

from rich.console import Console

from tunesmith.config import Recipe
from tunesmith.errors import ConfigError, ProviderError, TrainingError

TERMINAL = {"succeeded", "failed", "cancelled"}


def write_chat_jsonl(path: Path, conversations: list[list[dict]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for messages in conversations:
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


def decode_result_file(raw: bytes) -> list[dict]:
    """The results CSV, whether the server sent it raw or base64-encoded."""
    text = raw.decode("utf-8", errors="replace")
    if not text.lstrip().startswith("step"):
        try:
            text = base64.b64decode(raw, validate=True).decode("utf-8")
        except (binascii.Error, ValueError) as exc:
            raise ProviderError("the result file is neither a CSV nor base64-encoded CSV") from exc
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        rows.append({k: (float(v) if v not in ("", None) else None) for k, v in r.items()})
        rows[-1]["step"] = int(rows[-1]["step"])
    return rows


def make_client(recipe: Recipe):
    import openai

    h = recipe.hosted
    if h is None:
        raise ConfigError("--backend openai needs a `hosted` section (base_url, api_key_env, model)")
    key = os.environ.get(h.api_key_env) if h.api_key_env else "not-needed"
    if not key:
        raise ConfigError(f"set the environment variable {h.api_key_env} (hosted.api_key_env) to your API key")
    return openai.OpenAI(base_url=h.base_url, api_key=key, max_retries=3, timeout=h.timeout_s)


def train_hosted(recipe: Recipe, train_conversations, val_conversations, console: Console, bar) -> dict:
    """Run the hosted job to completion; returns the job as a dict. Raises TrainingError if it fails."""
    import openai

    from tunesmith.train.metrics import plot_loss, write_metrics_csv

    h = recipe.hosted
    out = recipe.run_dir / "train"
    client = make_client(recipe)
    try:
        train_file = _upload(client, write_chat_jsonl(out / "hosted" / "train.jsonl", train_conversations))
        val_file = _upload(client, write_chat_jsonl(out / "hosted" / "val.jsonl", val_conversations)) \
            if val_conversations else None
        hyper = {k: v for k, v in {"n_epochs": h.n_epochs, "batch_size": h.batch_size,
                                   "learning_rate_multiplier": h.learning_rate_multiplier}.items() if v is not None}
        job = client.fine_tuning.jobs.create(
            model=h.model or recipe.model.name, training_file=train_file, validation_file=val_file,
            suffix=h.suffix, seed=recipe.seed,
            method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
        )
        console.print(f"created job {job.id} on {h.base_url}")
        (out / "hosted" / "job.json").write_text(json.dumps({"id": job.id, "base_url": h.base_url}), encoding="utf-8")
        job = follow(client, job.id, h.poll_s, console, bar)
        if job.status != "succeeded":
            message = job.error.message if job.error else job.status
            raise TrainingError(f"hosted job {job.id} {job.status}: {message}")
        rows = decode_result_file(client.files.content(job.result_files[0]).read()) if job.result_files else []
    except openai.AuthenticationError as exc:
        raise ProviderError(f"{h.base_url} rejected the API key (401): check ${h.api_key_env}") from exc
    except openai.APIConnectionError as exc:
        raise ProviderError(f"cannot reach {h.base_url}: {exc}") from exc
    except openai.APIStatusError as exc:
        raise ProviderError(f"{h.base_url} answered {exc.status_code}: {exc.message}") from exc
    write_metrics_csv(rows, out / "metrics.csv")
    if rows:
        plot_loss(rows, out / "loss.png", f"{recipe.name}: loss (hosted job {job.id})")
    summary = {"job_id": job.id, "fine_tuned_model": job.fine_tuned_model, "trained_tokens": job.trained_tokens,
               "result_files": job.result_files, "base_url": h.base_url}
    (out / "hosted" / "job.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    console.print(f"fine-tuned model: {job.fine_tuned_model}")
    return summary


def _upload(client, path: Path) -> str:
    with open(path, "rb") as fh:
        return client.files.create(file=fh, purpose="fine-tune").id


def follow(client, job_id: str, poll_s: float, console: Console, bar):
    """Poll the job and print its new events until it ends; a bar tracks steps once known."""
    seen: set[str] = set()
    total, done = None, 0
    ctx = None
    advance = None
    try:
        while True:
            job = client.fine_tuning.jobs.retrieve(job_id)
            events = list(client.fine_tuning.jobs.list_events(job_id, limit=100).data)
            for ev in reversed(events):  # oldest first
                if ev.id in seen:
                    continue
                seen.add(ev.id)
                data = ev.data or {}
                if ev.type == "metrics" and data.get("total_steps"):
                    if advance is None:
                        total = int(data["total_steps"])
                        ctx = bar("hosted training", total)
                        advance = ctx.__enter__()
                    step = int(data.get("step", done))
                    if step > done:
                        advance(step - done, f"loss {data.get('train_loss', 0) or 0:.3f}")
                        done = step
                elif ev.type != "metrics":
                    console.print(f"  {ev.message}")
            if job.status in TERMINAL:
                return job
            time.sleep(poll_s)
    finally:
        if ctx is not None:
            if total and done < total and job.status == "succeeded":
                advance(total - done)
            ctx.__exit__(None, None, None)


def run_hosted(recipe: Recipe, console: Console) -> dict:
    """The data stage, then the hosted job on the prepared train/val splits."""
    from tunesmith.config import dump_resolved
    from tunesmith.data.formatting import chat_messages
    from tunesmith.data.prepare import prepare as prepare_data
    from tunesmith.progress import task_bar

    if recipe.data is None:
        raise ConfigError("--backend openai trains on the recipe's data section; add one")
    make_client(recipe)  # a missing key or section fails before any data work
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    dump_resolved(recipe, recipe.run_dir / "config.resolved.yaml")
    data = prepare_data(recipe, recipe.run_dir / "data", console)

    def conversations(split: str) -> list[list[dict]]:
        return [chat_messages(e, recipe.data) + [{"role": "assistant", "content": e.target}] for e in data.splits[split]]

    return train_hosted(recipe, conversations("train"), conversations("val"), console,
                        lambda desc, total: task_bar(console, desc, total))
