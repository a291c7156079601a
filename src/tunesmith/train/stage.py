"""The train stage, shared by ``tunesmith train`` and ``tunesmith run``.

It sets aside examples longer than ``train.max_seq_length`` (with their reason), trains,
and writes ``train/metrics.csv``, ``train/loss.png`` and ``train/summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from tunesmith.config import Recipe
from tunesmith.data.formatting import chat_messages
from tunesmith.errors import DataError
from tunesmith.records import Example


def append_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def sft_rows(recipe: Recipe, examples: list[Example]) -> list[dict]:
    from tunesmith.train.sft import conversation_rows

    return conversation_rows([chat_messages(e, recipe.data) for e in examples], [e.target for e in examples])


def train_stage(
    recipe: Recipe,
    train: list[Example],
    val: list[Example],
    model,
    tokenizer,
    placement,
    console: Console,
    bar,
    resume: bool = False,
):
    """Train on ``train`` (validating on ``val``); returns the TrainResult. ``model`` is not yet wrapped."""
    from tunesmith.report import plot_loss
    from tunesmith.train.sft import prepare_model, split_by_length, train_sft

    run_dir = recipe.run_dir
    rows, too_long = split_by_length(
        sft_rows(recipe, train), [e.id for e in train], tokenizer, recipe.train.max_seq_length
    )
    if too_long:
        append_jsonl(run_dir / "data" / "rejected.jsonl", (r.to_json() for r in too_long))
        console.print(
            f"[yellow]{len(too_long)} training example(s) longer than train.max_seq_length "
            f"set aside[/] → {run_dir / 'data' / 'rejected.jsonl'}"
        )
    if not rows:
        raise DataError("no training example fits train.max_seq_length; raise it")
    trained = train_sft(
        recipe,
        prepare_model(recipe, model),
        tokenizer,
        rows,
        sft_rows(recipe, val),
        placement,
        run_dir / "train",
        lambda total: bar("train", total),
        resume=resume,
    )
    trained.too_long = len(too_long)
    console.print(
        f"trained {trained.trainable_params:,} of {trained.total_params:,} parameters "
        f"on {trained.tokens:,} tokens "
        f"in {trained.seconds:.0f}s ({trained.tokens_per_second:,.0f} tok/s) → {trained.output_dir}"
    )
    plot_loss(trained.rows, run_dir / "train" / "loss.png", f"{recipe.name}: loss")
    peak = max((r.get("peak_memory_mb") or 0 for r in trained.rows), default=0)
    (run_dir / "train" / "summary.json").write_text(
        json.dumps(
            {
                "seconds": trained.seconds,
                "tokens": trained.tokens,
                "tokens_per_second": trained.tokens_per_second,
                "peak_memory_mb": peak,
                "trainable_params": trained.trainable_params,
                "total_params": trained.total_params,
                "trainable_tensors": trained.tensors_trainable,
                "trainable_tensors_changed": trained.tensors_changed,
                "examples": len(rows),
                "resumed": resume,
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    return trained
