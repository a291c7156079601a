"""Training metrics in the columns of OpenAI's fine-tuning results file."""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
EXTRA = [
    "tokens_per_second",
    "peak_memory_mb",
    "num_tokens",
]  # after OpenAI's columns, so readers of theirs work


def rows_from_log_history(history: list[dict]) -> list[dict]:
    """Merge the trainer's train and eval log entries into one row per logged step."""
    rows: dict[int, dict] = {}
    for entry in history:
        step = entry.get("step")
        if step is None:
            continue
        row = rows.setdefault(step, {c: None for c in COLUMNS + EXTRA} | {"step": step})
        if "loss" in entry:
            row["train_loss"] = entry["loss"]
            row["train_accuracy"] = entry.get("mean_token_accuracy")
            for key in EXTRA:
                row[key] = entry.get(key)
        if "eval_loss" in entry:
            row["valid_loss"] = entry["eval_loss"]
            row["valid_mean_token_accuracy"] = entry.get("eval_mean_token_accuracy")
    return [rows[s] for s in sorted(rows) if any(rows[s][c] is not None for c in COLUMNS[1:])]


def write_metrics_csv(rows: list[dict], path: Path) -> None:
    """Write rows; empty cells where a step had no validation pass (as OpenAI's file does)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS + EXTRA)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if row.get(c) is None else row[c]) for c in COLUMNS + EXTRA})


def read_metrics_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [
            {k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
            for row in csv.DictReader(fh)
        ]
