"""Profile records before training: counts, missing values, lengths, labels, numbers, duplicates.

Writes ``report.md`` and PNG plots (token-length histograms with the chosen limits drawn,
a label bar chart, numeric histograms) into one folder.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from tunesmith.data.steps.curation import number_value
from tunesmith.data.tokens import token_counts
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


SAMPLE_ROWS = 20_000


class Stat:
    """Count, min, mean and max of a stream of numbers, exactly; percentiles come from the row sample."""

    def __init__(self):
        self.n, self.total, self.lo, self.hi = 0, 0, float("inf"), float("-inf")

    def add(self, values: np.ndarray) -> None:
        if len(values):
            self.n += len(values)
            self.total += int(values.sum()) if values.dtype.kind in "iu" else math.fsum(values.tolist())
            self.lo, self.hi = min(self.lo, float(values.min())), max(self.hi, float(values.max()))

    def merge(self, other: Stat) -> None:
        self.n, self.total = self.n + other.n, self.total + other.total
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)

    def row(self, sample: list) -> dict:
        if not self.n:
            return {"min": 0, "mean": 0, "p50": 0, "p95": 0, "max": 0}
        v = np.asarray(sample, dtype=float)
        return {"min": self.lo, "mean": self.total / self.n, "p50": np.percentile(v, 50),
                "p95": np.percentile(v, 95), "max": self.hi}


class ProfileSketch:
    """The profile of a stream of records in bounded memory: exact counts, sums, extremes, label counts and
    exact duplicates (one 8-byte hash per distinct row), plus a uniform sample of ``SAMPLE_ROWS`` rows (those
    whose ``file:line`` hashes lowest) for the percentiles, the plots and the near-duplicate count. With no more
    rows than the sample holds, every figure is the one computed over all rows. Sketches of parts of a stream
    merge (:meth:`merge`) into the sketch of the whole, as the Ray engine's workers make them."""

    def __init__(self, fields: list[str], label: str | None, numeric: list[str], tokenizer,
                 near_threshold: float = 0.8, sample_rows: int = SAMPLE_ROWS):
        from tunesmith.data.dedup.index import SortedRuns

        self.fields, self.label, self.numeric, self.tokenizer = fields, label, numeric, tokenizer
        self.near_threshold, self.sample_rows = near_threshold, sample_rows
        self.n, self.seen, self.missing = 0, Counter(), Counter()
        self.chars = {f: Stat() for f in fields}
        self.tokens = {f: Stat() for f in fields}
        self.labels: Counter = Counter()
        self.nums = {f: Stat() for f in numeric}
        self.not_number = Counter()
        self.distinct, self.rows = SortedRuns(), 0
        self.sample: list[dict] = []
        self.sample_hash = np.empty(0, dtype=np.uint64)

    def add(self, records: list[Record]) -> None:
        from tunesmith.data.dedup.index import text_hash

        for r in records:
            self.seen.update(r.data.keys())
            self.missing.update(k for k, v in r.data.items() if v in (None, "", []))
        rows = [{} for _ in records]
        for f in self.fields:
            texts = ["" if r.data.get(f) is None else str(r.data[f]) for r in records]
            chars = np.array([len(t) for t in texts], dtype=np.int64)
            self.chars[f].add(chars)
            toks = token_counts(texts, self.tokenizer) if self.tokenizer is not None else None
            if toks is not None:
                self.tokens[f].add(toks)
            for k, row in enumerate(rows):
                row[("chars", f)] = int(chars[k])
                if toks is not None:
                    row[("tokens", f)] = int(toks[k])
        if self.label:
            self.labels.update(str(r.data.get(self.label)) for r in records)
        for f in self.numeric:
            good = []
            for k, r in enumerate(records):
                v = r.data.get(f)
                x = number_value(v) if v not in (None, "") else None
                if x is not None:
                    good.append(x)
                    rows[k][("num", f)] = x
                elif v not in (None, ""):
                    self.not_number[f] += 1
            self.nums[f].add(np.array(good, dtype=float))
        keys = ["\n".join(str(r.data.get(f) or "") for f in self.fields) for r in records]
        self._count_exact(text_hash([" ".join(t.lower().split()) for t in keys]))
        for row, key in zip(rows, keys, strict=True):
            row["key"] = key
        self.n += len(records)
        self._offer(text_hash([r.source for r in records]), rows)

    @property
    def exact(self) -> int:
        """Rows whose normalised text repeats an earlier row's."""
        return self.rows - len(self.distinct)

    def _count_exact(self, h: np.ndarray) -> None:
        from tunesmith.data.dedup.minhash import distinct

        uniq = distinct(h)
        self.rows += len(h)
        self.distinct.add(uniq[self.distinct.first(uniq) < 0])

    def _offer(self, hashes: np.ndarray, rows: list[dict]) -> None:
        """Keep the ``sample_rows`` rows whose ``file:line`` hashes lowest (a uniform sample, the same however the
        stream was cut), in hash order."""
        if len(self.sample) >= self.sample_rows:
            take = np.flatnonzero(hashes < self.sample_hash[-1])
            hashes, rows = hashes[take], [rows[k] for k in take.tolist()]
        both = np.concatenate([self.sample_hash, hashes])
        keep = np.argsort(both, kind="stable")[: self.sample_rows]
        pool = self.sample + rows
        self.sample, self.sample_hash = [pool[k] for k in keep.tolist()], both[keep]

    def merge(self, other: ProfileSketch) -> None:
        """Add the sketch of another part of the stream (same fields)."""
        self.n += other.n
        self.seen.update(other.seen)
        self.missing.update(other.missing)
        for mine, theirs in ((self.chars, other.chars), (self.tokens, other.tokens), (self.nums, other.nums)):
            for f, stat in theirs.items():
                mine[f].merge(stat)
        self.labels.update(other.labels)
        self.not_number.update(other.not_number)
        self.rows += other.rows
        for keys, _ in other.distinct.runs:
            self.distinct.add(keys[self.distinct.first(keys) < 0])
        self._offer(other.sample_hash, other.sample)

    def _of(self, kind: str, f: str) -> list:
        return [row[(kind, f)] for row in self.sample if (kind, f) in row]

    def write(self, out_dir: Path, limits: tuple[int | None, int | None] = (None, None),
              title: str = "Data profile") -> Path:
        """Write ``out_dir/report.md`` and its plots; returns the report path."""
        from tunesmith.data.dedup.minhash import near_matches

        out_dir.mkdir(parents=True, exist_ok=True)
        n, sampled = self.n, len(self.sample) < self.n
        lines = [f"# {title}", "", f"- records: **{n:,}**", f"- fields: {', '.join(sorted(self.seen))}"]
        if sampled:
            lines.append(f"- percentiles, plots and near duplicates: a uniform sample of {len(self.sample):,} rows")
        lines += ["", "## Missing values", "", "| field | missing or empty | share |", "|---|---:|---:|"]
        for f in sorted(self.seen):
            miss = self.missing[f] + n - self.seen[f]
            lines.append(f"| {f} | {miss:,} | {miss / max(n, 1):.1%} |")
        lines += ["", "## Text lengths", "", "| field | unit | min | mean | p50 | p95 | max |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        tok_lengths: dict[str, list[int]] = {}
        for f in self.fields:
            stats = self.chars[f].row(self._of("chars", f))
            lines.append(f"| {f} | characters | " + " | ".join(_fmt(v) for v in stats.values()) + " |")
            if self.tokenizer is not None:
                tok_lengths[f] = self._of("tokens", f)
                stats = self.tokens[f].row(tok_lengths[f])
                lines.append(f"| {f} | tokens | " + " | ".join(_fmt(v) for v in stats.values()) + " |")
        images: dict[str, Path] = {}
        if tok_lengths:
            images["Token lengths"] = plot_token_hist(tok_lengths, limits, out_dir / "token_lengths.png")
        if self.label:
            counts = self.labels
            lines += ["", f"## Labels (`{self.label}`)", "",
                      f"{len(counts)} distinct; largest/smallest = "
                      f"{max(counts.values()) / max(min(counts.values()), 1):.1f}",
                      "", "| label | records | share |", "|---|---:|---:|"]
            lines += [f"| {k} | {v:,} | {v / n:.1%} |" for k, v in counts.most_common(30)]
            if len(counts) > 30:
                lines.append(f"| … {len(counts) - 30} more | | |")
            images["Labels"] = plot_labels(counts, self.label, out_dir / "labels.png")
        for f in self.numeric:
            arr = np.array(self._of("num", f), dtype=float)
            stats = self.nums[f].row(arr)
            lines += ["", f"## Numeric field `{f}`", "", "| count | not a number | min | mean | p50 | p95 | max |",
                      "|---:|---:|---:|---:|---:|---:|---:|",
                      f"| {self.nums[f].n:,} | {self.not_number[f]:,} | "
                      + " | ".join(_fmt(v) for v in stats.values()) + " |"]
            if len(arr):
                images[f"Numeric: {f}"] = plot_numeric(arr, f, out_dir / f"numeric_{f}.png")
        key_texts = [row["key"] for row in self.sample]
        m = len(key_texts)
        near = len(near_matches(key_texts, self.near_threshold)[1]) if m > 1 else 0
        of_sample = f" in the sample of {m:,}" if sampled else ""
        lines += ["", "## Duplicates", "",
                  f"- exact (lower-cased, whitespace collapsed): **{self.exact:,}** records repeat an earlier one",
                  f"- near (MinHash, word bigram Jaccard ≥ {self.near_threshold}, includes exact){of_sample}: "
                  f"**{near:,}** records have an earlier near duplicate", ""]
        for name, path in images.items():
            lines += [f"## {name}", "", f"![{name}]({path.name})", ""]
        report = out_dir / "report.md"
        report.write_text("\n".join(lines), encoding="utf-8")
        return report


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
    """Write ``out_dir/report.md`` and its plots for ``records``; returns the report path."""
    sketch = ProfileSketch(fields, label, numeric, tokenizer, near_threshold)
    sketch.add(records)
    return sketch.write(out_dir, limits, title)


def sketch_for(cfg, load_tokenizer) -> ProfileSketch:
    """A profile sketch with the recipe's data section (fields, label, numeric fields, tokenizer)."""
    p = cfg.profile
    return ProfileSketch(p.fields or list(cfg.input_fields), p.label or cfg.target_field, p.numeric,
                         load_tokenizer(), p.near_dup_threshold)
