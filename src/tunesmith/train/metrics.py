"""Training metrics in the columns of OpenAI's fine-tuning results file, and the loss curve drawn from them."""

from __future__ import annotations

import csv
from pathlib import Path

from tunesmith.plotting import pyplot

COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
EXTRA = [
    "tokens_per_second",
    "peak_memory_mb",
    "num_tokens",
]  # after OpenAI's columns, so readers of theirs work
# reinforcement (GRPO): the mean reward of a step's completions and its spread (standard deviation), and the same
# for a validation pass; written only by methods that have rewards
REWARD = ["train_reward_mean", "train_reward_std", "valid_reward_mean", "valid_reward_std"]


def columns_of(rows: list[dict]) -> list[str]:
    """The columns a metrics file of ``rows`` has: OpenAI's, ours, and the reward columns where rows have rewards."""
    return COLUMNS + EXTRA + [c for c in REWARD if any(r.get(c) is not None for r in rows)]


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


def train_losses(rows: list[dict]) -> list[float]:
    """The logged training losses of metrics rows, in step order (steps with only a validation pass left out)."""
    return [r["train_loss"] for r in rows if r.get("train_loss") is not None]


def write_metrics_csv(rows: list[dict], path: Path) -> None:
    """Write rows; empty cells where a step had no validation pass (as OpenAI's file does)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        fields = columns_of(rows)
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if row.get(c) is None else row[c]) for c in fields})


def read_metrics_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [
            {k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
            for row in csv.DictReader(fh)
        ]


def plot_loss(rows: list[dict], path: Path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    valid = [(r["step"], r["valid_loss"]) for r in rows if r.get("valid_loss") is not None]
    if train:
        ax.plot(*zip(*train, strict=True), marker=".", label="train loss")
    if valid:
        ax.plot(*zip(*valid, strict=True), marker="o", linestyle="--", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or valid:
        ax.legend(loc="upper left")
    _plot_rewards(ax, rows)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_rewards(ax, rows: list[dict]) -> None:
    """A reinforcement training's mean reward per step (± its spread) on a second axis."""
    logged = [r for r in rows if r.get("train_reward_mean") is not None]
    if not logged:
        return
    steps = [r["step"] for r in logged]
    mean = [r["train_reward_mean"] for r in logged]
    spread = [r.get("train_reward_std") or 0.0 for r in logged]
    right = ax.twinx()
    right.plot(steps, mean, color="tab:green", marker=".", label="mean reward")
    right.fill_between(steps, [m - s for m, s in zip(mean, spread, strict=True)],
                       [m + s for m, s in zip(mean, spread, strict=True)], color="tab:green", alpha=0.15)
    right.set_ylabel("reward (mean ± spread of the step's completions)")
    right.legend(loc="upper right")
