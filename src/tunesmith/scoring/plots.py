"""Charts of the eval stage: the headline metric per contender, and the task kinds' own (confusion
matrices for classification, prediction against truth for regression)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.plotting import pyplot
from tunesmith.records import Example
from tunesmith.scoring.display import num
from tunesmith.scoring.metrics import confusion
from tunesmith.scoring.result import ContenderResult, Source

if TYPE_CHECKING:
    from tunesmith.kinds import TaskKind


def plot_confusions(results: list[ContenderResult], gold: list[str], labels: list[str], path: Path) -> Path:
    """One confusion matrix per contender, side by side; the last column counts unparseable answers."""
    plt = pyplot()
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


SOURCE_COLOURS = {Source.LOCAL: "#4c72b0", Source.ENDPOINT: "#dd8452", Source.BASELINE: "#999999"}


def plot_headline(task: TaskKind, results: list[ContenderResult], path: Path) -> Path:
    """One bar per contender with its 95% bootstrap interval."""
    plt = pyplot()
    h = task.headline
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(results) + 2), 4))
    vals = [r.metrics.get(h) or 0 for r in results]
    ax.bar(range(len(results)), vals, color=[SOURCE_COLOURS[r.source] for r in results])
    for i, r in enumerate(results):
        ci = r.metrics.get(f"{h}_ci95")
        if ci:
            ax.errorbar(i, vals[i], yerr=[[vals[i] - ci[0]], [ci[1] - vals[i]]], color="black", capsize=4)
    ax.set_xticks(range(len(results)), [r.name for r in results], rotation=20, ha="right")
    ax.set_ylabel(h + (" (higher is better)" if task.higher_is_better else " (lower is better)"))
    ax.set_title(f"{h} per contender, 95% bootstrap intervals")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


BAND_COLOURS = {"green": "#2ca02c", "orange": "#ff7f0e", "red": "#d62728"}


def plot_scatter(
    task: TaskKind, results: list[ContenderResult], test: list[Example], path: Path, log: bool
) -> Path:
    """Prediction vs truth per contender, coloured by hit band; the title counts unparseable answers."""
    from tunesmith.scoring.metrics import band

    plt = pyplot()
    n = len(results)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.3 * rows), squeeze=False)
    truth = [task.gold(e) for e in test]
    for ax, r in zip(axes.flat, results, strict=False):
        pts = [
            (g, p, band(p, g, task.cfg.bands))
            for g, p in zip(truth, r.headline, strict=True)
            if p is not None
        ]
        for colour in ("green", "orange", "red"):
            sel = [(g, p) for g, p, c in pts if c == colour]
            if sel:
                ax.scatter(
                    *zip(*sel, strict=True), s=12, color=BAND_COLOURS[colour], label=f"{colour} ({len(sel)})"
                )
        lo = max(min(truth), 1) if log else min(truth)
        hi = max(truth)
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, linestyle="--")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        mae = r.metrics.get("mae")
        ax.set_title(
            f"{r.name}: MAE {num(mae, '{:,.0f}')}, unparseable {r.metrics.get('unparseable', 0)}", fontsize=9
        )
        ax.set_xlabel("truth")
        ax.set_ylabel("prediction")
        if pts:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_grouped_bars(groups: dict[str, list[float]], categories: list[str], ylabel: str, title: str,
                      path: Path) -> Path:
    """One group of bars per category, one bar per contender (e.g. accuracy per field)."""
    plt = pyplot()
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(categories) * max(1, len(groups)) ** 0.5 + 2), 4))
    for j, (name, values) in enumerate(groups.items()):
        ax.bar([i + j * width for i in range(len(categories))], values, width, label=name)
    ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(categories))], categories)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_plots(task: TaskKind, results, test, eval_dir: Path) -> dict[str, Path]:
    """The report's charts by caption: the headline bars, then the task kind's own."""
    images = {"Headline metric with 95% intervals": plot_headline(task, results, eval_dir / "headline.png")}
    return images | task.plots(results, test, eval_dir)
