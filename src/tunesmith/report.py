"""Plots and the run's report.md (the before/after table comes first)."""

from __future__ import annotations

from pathlib import Path

from tunesmith.eval.classify import ContenderResult
from tunesmith.eval.metrics import confusion


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(rows: list[dict], path: Path, title: str) -> Path:
    plt = _plt()
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
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusions(results: list[ContenderResult], gold: list[str], labels: list[str], path: Path) -> Path:
    """One confusion matrix per contender, side by side; the last column counts unparseable answers."""
    plt = _plt()
    n = len(results)
    size = max(4.5, 0.45 * len(labels) + 2.5)
    fig, axes = plt.subplots(1, n, figsize=(size * n, size), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        m = confusion(gold, res.headline, labels)
        ax.imshow(m, cmap="Blues")
        ax.set_xticks(range(len(labels) + 1), [*labels, "(unparseable)"], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        acc = res.metrics.get("accuracy") or 0
        ax.set_title(f"{res.name}: accuracy {acc:.1%}")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] > m.max() / 2 else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _pct(v) -> str:
    return "–" if v is None else f"{v:.1%}"


def _ci(v) -> str:
    return f" [{v[0]:.1%}, {v[1]:.1%}]" if v else ""


def comparison_table(results: list[ContenderResult]) -> str:
    head = "| contender | accuracy (95% CI) | macro-F1 | how scored | free-generation accuracy "
    head += "| unparseable answers |\n"
    head += "|---|---|---|---|---|---|\n"
    lines = []
    for r in results:
        m = r.metrics
        gen = _pct(m.get("accuracy_generate")) if "accuracy_generate" in m else "–"
        unp = f"{m['unparseable_generate']}/{m['n']}" if "unparseable_generate" in m else "–"
        lines.append(
            f"| **{r.name}** — {r.description} | {_pct(m['accuracy'])}{_ci(m.get('accuracy_ci95'))} | "
            f"{_pct(m['macro_f1'])} | "
            f"{m['scoring']} | {gen} | {unp} |"
        )
    return head + "\n".join(lines) + "\n"


def write_report(path: Path, *, recipe, results, data_summary, train_summary, timings, images) -> Path:
    by_name = {r.name: r for r in results}
    base, ft = by_name.get("base"), by_name.get("finetuned")
    out = [f"# {recipe.name}: fine-tuning report\n\n"]
    if base and ft:
        gain = (ft.metrics["accuracy"] - base.metrics["accuracy"]) * 100
        out.append(
            f"Fine-tuned **{ft.metrics['accuracy']:.1%}** vs base **{base.metrics['accuracy']:.1%}** accuracy "
            f"on {ft.metrics['n']} held-out test examples ({gain:+.1f} points).\n\n"
        )
    out.append(comparison_table(results))
    out.append(
        "\n*accuracy* uses the same method for every LLM: the label with the highest mean token "
        "log-likelihood after the prompt (fair to a base model that never learned the answer format). "
        "*free-generation accuracy* parses greedy output strictly: an answer that is not exactly one "
        "label counts as unparseable and wrong. The base model's prompt lists the labels"
        + (" " if recipe.eval.base_prompt_with_labels else " (disabled in this recipe) ")
        + "so that it can answer with one; the fine-tuned model's prompt does not.\n"
    )
    out.append("\n## Data\n")
    out.append("| | count |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in data_summary.items()))
    out.append("\n## Training\n")
    out.append("| | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in train_summary.items()))
    out.append("\n## Time per stage\n")
    rows = "".join(f"| {k} | {v:.1f} |\n" for k, v in timings.items())
    out.append("| stage | seconds |\n|---|---|\n" + rows)
    out.append("\n## Plots\n")
    for title, img in images.items():
        out.append(f"\n### {title}\n\n![{title}]({img.relative_to(path.parent).as_posix()})\n")
    out.append(
        "\n## Files\n\n- `config.resolved.yaml` — the recipe as run, with package versions\n"
        "- `data/` — train/val/test splits as chat JSONL, `rejected.jsonl` with reasons\n"
        "- `train/` — `adapter/`, `metrics.csv` (OpenAI results-file columns), `loss.png`\n"
        "- `eval/` — `metrics.json`, `predictions.jsonl`, `confusion.png`, `report.md`, `report.html`\n"
    )
    path.write_text("".join(out), encoding="utf-8")
    return path
