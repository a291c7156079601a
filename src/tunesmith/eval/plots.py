"""Charts of the eval stage: confusion matrices."""

from __future__ import annotations

from pathlib import Path

from tunesmith.eval.metrics import confusion
from tunesmith.eval.result import ContenderResult
from tunesmith.plotting import pyplot


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
