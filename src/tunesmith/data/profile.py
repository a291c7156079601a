"""Profile records before training: counts, missing values, lengths, labels, numbers, duplicates.

Writes ``report.md`` and PNG plots (token-length histograms with the chosen limits drawn,
a label bar chart, numeric histograms) into one folder.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from tunesmith.data.steps import number_value, token_counts
from tunesmith.plotting import pyplot
from tunesmith.records import Record


def _stats(values: list[int] | np.ndarray) -> dict:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {"min": 0, "mean": 0, "p50": 0, "p95": 0, "max": 0}
    return {
        "min": v.min(),
        "mean": v.mean(),
        "p50": np.percentile(v, 50),
        "p95": np.percentile(v, 95),
        "max": v.max(),
    }


def _fmt(x) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 or float(x).is_integer() else f"{x:,.2f}"


def plot_token_hist(lengths: dict[str, list[int]], limits: tuple[int | None, int | None], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 3.8), squeeze=False)
    lo, hi = limits
    for ax, (name, vals) in zip(axes[0], lengths.items(), strict=True):
        ax.hist(vals, bins=min(50, max(5, len(set(vals)))), color="#4C72B0", edgecolor="white")
        for x, label, color in ((lo, f"min {lo}", "#C44E52"), (hi, f"max {hi}", "#C44E52")):
            if x:
                ax.axvline(x, color=color, linestyle="--", linewidth=1.5)
                ax.text(x, ax.get_ylim()[1] * 0.95, f" {label}", color=color, va="top")
        over = sum(v > hi for v in vals) if hi else 0
        ax.set_title(f"{name}: tokens per record" + (f" ({over} over max)" if hi else ""))
        ax.set_xlabel("tokens")
        ax.set_ylabel("records")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_labels(counts: Counter, name: str, path: Path, top: int = 40) -> Path:
    plt = pyplot()
    items = counts.most_common(top)[::-1]  # largest at the top
    fig, ax = plt.subplots(figsize=(7, 0.24 * len(items) + 1.4))
    ax.barh([str(k) for k, _ in items], [v for _, v in items], color="#55A868")
    ax.set_title(
        f"{name}: records per label" + (f" (top {top} of {len(counts)})" if len(counts) > top else "")
    )
    ax.set_xlabel("records")
    ax.tick_params(axis="y", labelsize=8)
    ax.margins(y=0.01)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_numeric(values: np.ndarray, name: str, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    skewed = values.min() > 0 and np.percentile(values, 99) > 20 * np.median(values)
    bins = np.geomspace(values.min(), values.max(), 40) if skewed else 40
    ax.hist(values, bins=bins, color="#8172B2", edgecolor="white")
    if skewed:  # prices and counts span orders of magnitude
        ax.set_xscale("log")
    ax.set_title(f"{name}: distribution (n={len(values):,})")
    ax.set_xlabel(name + (" (log scale)" if skewed else ""))
    ax.set_ylabel("records")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def profile(
    records: list[Record],
    fields: list[str],
    label: str | None,
    numeric: list[str],
    tokenizer,
    out_dir: Path,
    limits: tuple[int | None, int | None] = (None, None),
    near_threshold: float = 0.8,
    title: str = "Data profile",
) -> Path:
    """Write ``out_dir/report.md`` and its plots; returns the report path."""
    from tunesmith.data.minhash import clusters, near_duplicate_pairs

    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(records)
    seen = Counter(k for r in records for k in r.data)
    lines = [f"# {title}", "", f"- records: **{n:,}**", f"- fields: {', '.join(sorted(seen))}", ""]
    lines += ["## Missing values", "", "| field | missing or empty | share |", "|---|---:|---:|"]
    for f in sorted(seen):
        miss = sum(1 for r in records if r.data.get(f) in (None, "", []))
        lines.append(f"| {f} | {miss:,} | {miss / max(n, 1):.1%} |")
    lines += [
        "",
        "## Text lengths",
        "",
        "| field | unit | min | mean | p50 | p95 | max |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    tok_lengths: dict[str, list[int]] = {}
    for f in fields:
        texts = ["" if r.data.get(f) is None else str(r.data[f]) for r in records]
        chars = [len(t) for t in texts]
        lines.append(f"| {f} | characters | " + " | ".join(_fmt(v) for v in _stats(chars).values()) + " |")
        if tokenizer is not None:
            tok_lengths[f] = token_counts(texts, tokenizer).tolist()
            lines.append(
                f"| {f} | tokens | " + " | ".join(_fmt(v) for v in _stats(tok_lengths[f]).values()) + " |"
            )
    images: dict[str, Path] = {}
    if tok_lengths:
        images["Token lengths"] = plot_token_hist(tok_lengths, limits, out_dir / "token_lengths.png")
    if label:
        counts = Counter(str(r.data.get(label)) for r in records)
        lines += [
            "",
            f"## Labels (`{label}`)",
            "",
            f"{len(counts)} distinct; largest/smallest = "
            f"{max(counts.values()) / max(min(counts.values()), 1):.1f}",
            "",
            "| label | records | share |",
            "|---|---:|---:|",
        ]
        lines += [f"| {k} | {v:,} | {v / n:.1%} |" for k, v in counts.most_common(30)]
        if len(counts) > 30:
            lines.append(f"| … {len(counts) - 30} more | | |")
        images["Labels"] = plot_labels(counts, label, out_dir / "labels.png")
    for f in numeric:
        raw = [r.data.get(f) for r in records]
        vals = [number_value(v) for v in raw if v not in (None, "")]
        bad = sum(v is None for v in vals)
        arr = np.array([v for v in vals if v is not None], dtype=float)
        lines += [
            "",
            f"## Numeric field `{f}`",
            "",
            "| count | not a number | min | mean | p50 | p95 | max |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {len(arr):,} | {bad:,} | " + " | ".join(_fmt(v) for v in _stats(arr).values()) + " |",
        ]
        if len(arr):
            images[f"Numeric: {f}"] = plot_numeric(arr, f, out_dir / f"numeric_{f}.png")
    key_texts = ["\n".join(str(r.data.get(f) or "") for f in fields) for r in records]
    exact = n - len({" ".join(t.lower().split()) for t in key_texts})
    pairs, _ = near_duplicate_pairs(key_texts, near_threshold) if n > 1 else (np.empty((0, 2), int), None)
    near = int((clusters(n, pairs) != np.arange(n)).sum()) if n else 0
    lines += [
        "",
        "## Duplicates",
        "",
        f"- exact (lower-cased, whitespace collapsed): **{exact:,}** records repeat an earlier one",
        f"- near (MinHash, word bigram Jaccard ≥ {near_threshold}, includes exact): "
        f"**{near:,}** records ({len(pairs):,} pairs)",
        "",
    ]
    for name, path in images.items():
        lines += [f"## {name}", "", f"![{name}]({path.name})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def profile_records(
    records: list[Record],
    cfg,
    load_tokenizer,
    out_dir: Path,
    limits: tuple[int | None, int | None] = (None, None),
) -> Path:
    """Profile with the recipe's data section (fields, label, numeric fields, tokenizer)."""
    p = cfg.profile
    fields = p.fields or list(cfg.input_fields)
    return profile(
        records,
        fields,
        p.label or cfg.target_field,
        p.numeric,
        load_tokenizer(),
        out_dir,
        limits,
        p.near_dup_threshold,
    )
