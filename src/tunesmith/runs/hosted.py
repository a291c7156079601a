"""``tunesmith train RECIPE --backend openai``: the recipe's data stage, then a job on an OpenAI-compatible
fine-tuning API (the client in :mod:`tunesmith.clients.hosted`) followed to its end, with the same
``train/metrics.csv`` and ``loss.png`` as a local run."""

from __future__ import annotations

import json

from rich.console import Console

from tunesmith.clients.hosted import decode_result_file, follow, make_client, upload, write_chat_jsonl
from tunesmith.config import Recipe
from tunesmith.errors import ConfigError, ProviderError, TrainingError


def train_hosted(recipe: Recipe, train_conversations, val_conversations, console: Console, bar) -> dict:
    """Run the hosted job to completion; returns the job as a dict. Raises TrainingError if it fails."""
    import openai

    from tunesmith.train.metrics import plot_loss, write_metrics_csv

    h = recipe.hosted
    out = recipe.run_dir / "train"
    client = make_client(recipe)
    try:
        train_file = upload(client, write_chat_jsonl(out / "hosted" / "train.jsonl", train_conversations))
        val_file = upload(client, write_chat_jsonl(out / "hosted" / "val.jsonl", val_conversations)) \
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



def run_hosted(recipe: Recipe, console: Console) -> dict:
    """The data stage, then the hosted job on the prepared train/val splits."""
    from tunesmith.config import dump_resolved
    from tunesmith.data.formats.messages import chat_messages
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
