"""The eval folder: metrics.json, predictions.jsonl, charts, report.md and a self-contained report.html.

Both reports are rendered from the same rows, comparison table first; the HTML embeds its
charts as base64 PNGs so that the one file can be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from pathlib import Path

from tunesmith.eval.classify import ContenderResult
from tunesmith.eval.tasks import Task
from tunesmith.records import Example


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(v, fmt="{:.3f}") -> str:
    return "–" if v is None else fmt.format(v)


def _pct(v) -> str:
    return "–" if v is None else f"{v:.1%}"


def _ci(v, fmt: Callable = lambda x: f"{x:.3g}") -> str:
    return "" if not v else f" [{fmt(v[0])}, {fmt(v[1])}]"


def _signed(v: float) -> str:
    """A difference with its sign: whole numbers from 100 up (+1,140, not +1.14e+03), else 3 digits."""
    return f"{v:+,.0f}" if abs(v) >= 100 else f"{v:+.3g}"


def headline_fmt(task: Task) -> Callable:
    """How the task's headline metric is printed (a percentage, or two decimals)."""
    return _pct if task.kind == "classification" else (lambda v: _num(v, "{:.2f}"))


def columns(task: Task, ref: str) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, cell) pairs for the comparison table of this task kind."""
    h, fmt = task.headline, headline_fmt(task)
    diff = (lambda v: f"{v:+.1%}") if task.kind == "classification" else _signed
    cols = [
        (f"{h} (95% CI)", lambda m: fmt(m.get(h)) + _ci(m.get(f"{h}_ci95"), fmt)),
        (
            f"Δ vs {ref} (95% CI)",
            lambda m: (
                diff(m[f"{h}_diff_vs_{ref}"]) + _ci(m.get(f"{h}_diff_vs_{ref}_ci95"), diff)
                if m.get(f"{h}_diff_vs_{ref}") is not None
                else "–"
            ),
        ),
    ]
    if task.kind == "classification":
        cols += [("macro-F1", lambda m: _pct(m.get("macro_f1")))]
        if _ordinal(task):
            cols += [
                ("star MAE", lambda m: _num(m.get("ordinal_mae"))),
                ("within one", lambda m: _pct(m.get("within_one"))),
            ]
        cols += [
            ("free-generation accuracy", lambda m: _pct(m.get("accuracy_generate", m.get("accuracy")))),
            (
                "unparseable or no answer",
                lambda m: str(m.get("unparseable_generate", m.get("unparseable", "–"))),
            ),
        ]
    elif task.kind == "regression":
        cols += [
            ("RMSLE", lambda m: _num(m.get("rmsle"))),
            ("R²", lambda m: _num(m.get("r2"))),
            (
                "green / orange / red",
                lambda m: " / ".join(_pct(m.get(f"hit_{c}")) for c in ("green", "orange", "red")),
            ),
            ("unparseable or no answer", lambda m: str(m.get("unparseable", "–"))),
        ]
    elif task.kind == "qa":
        cols += [
            ("exact match", lambda m: _num(m.get("exact_match"), "{:.2f}")),
            ("unanswered", lambda m: str(m.get("unanswered", "–"))),
        ]
    else:
        cols += [
            ("ROUGE-L", lambda m: _num(m.get("rouge_l"), "{:.2f}")),
            ("exact answer", lambda m: _pct(m.get("exact"))),
        ]
    cols += [
        ("failed calls", lambda m: str(m.get("failed_calls", "–"))),
        (
            "answer loss / ppl",
            lambda m: (
                f"{m['mean_loss']:.3f} / {m['perplexity']:.2f}" if m.get("perplexity") is not None else "–"
            ),
        ),
        ("scored by", lambda m: m.get("scoring", "–")),
    ]
    return cols


def _ordinal(task: Task) -> bool:
    from tunesmith.eval.metrics import is_ordinal

    return is_ordinal(task.labels)


def table_rows(task: Task, results: list[ContenderResult]) -> tuple[list[str], list[list[str]]]:
    cols = columns(task, results[0].name)
    extra = sorted({k for r in results for k in r.metrics if k.startswith("judge_")})
    headers = ["contender", *[c for c, _ in cols], *extra]
    rows = [
        [
            f"{r.name} — {r.description}",
            *[f(r.metrics) for _, f in cols],
            *[_num(r.metrics.get(k)) for k in extra],
        ]
        for r in results
    ]
    return headers, rows


def plot_headline(task: Task, results: list[ContenderResult], path: Path) -> Path:
    """One bar per contender with its 95% bootstrap interval."""
    plt = _plt()
    h = task.headline
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(results) + 2), 4))
    vals = [r.metrics.get(h) or 0 for r in results]
    colours = [
        "#4c72b0" if r.kind == "llm" else "#dd8452" if r.kind == "endpoint" else "#999999" for r in results
    ]
    ax.bar(range(len(results)), vals, color=colours)
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
    task: Task, results: list[ContenderResult], test: list[Example], path: Path, log: bool
) -> Path:
    """Prediction vs truth per contender, coloured by hit band; the title counts unparseable answers."""
    from tunesmith.eval.metrics import band

    plt = _plt()
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
            f"{r.name}: MAE {_num(mae, '{:,.0f}')}, unparseable {r.metrics.get('unparseable', 0)}", fontsize=9
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


def make_plots(task: Task, results, test, eval_dir: Path) -> dict[str, Path]:
    from tunesmith.report import plot_confusions

    images = {"Headline metric with 95% intervals": plot_headline(task, results, eval_dir / "headline.png")}
    if task.kind == "classification":
        shown = [r for r in results if r.kind != "baseline"] or results
        images["Confusion matrices (test split)"] = plot_confusions(
            shown, [e.target for e in test], task.labels, eval_dir / "confusion.png"
        )
    if task.kind == "regression":
        images["Prediction vs truth, coloured by hit band"] = plot_scatter(
            task, results, test, eval_dir / "scatter.png", task.cfg.log_axes
        )
    return images


def _notes(task: Task) -> str:
    if task.kind == "classification":
        return (
            "Local models are scored by label log-likelihood (fair to a base model that never learned the "
            "answer format) unless eval.label_scoring is off; endpoints and the free-generation column use "
            "one strict "
            "parser: an answer that is not exactly one label is unparseable and wrong."
        )
    if task.kind == "regression":
        b = task.cfg.bands
        return (
            f"Green: error under {b.green_abs:g} or under {b.green_rel:.0%} of the truth; orange: under "
            f"{b.orange_abs:g} or {b.orange_rel:.0%}; red otherwise. The first number in an answer is its "
            "prediction; an answer without a number is unparseable: red in the bands and left out of "
            "MAE/RMSLE/R² (so compare those together with the unparseable count)."
        )
    if task.kind == "qa":
        rule = "KorQuAD v1.0 (character F1)" if task.cfg.qa_lang == "ko" else "SQuAD v1.1 (word F1)"
        return f"Exact match and F1 ×100 with {rule} normalisation, best over the gold answers."
    return "chrF (sacrebleu) and ROUGE-L (word LCS F1) against the reference answer, ×100."


def render_markdown(title, task, headers, rows, summary, judge, images, eval_dir) -> str:
    out = [f"# {title}\n\n", "| " + " | ".join(headers) + " |\n", "|" + "---|" * len(headers) + "\n"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |\n" for row in rows]
    out.append(f"\n{_notes(task)} Intervals: seeded percentile bootstrap over test examples; Δ is paired.\n")
    if judge:
        out.append("\n## Judge\n\n```json\n" + json.dumps(judge, indent=2) + "\n```\n")
    out.append(
        "\n## Data\n\n| | count |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in summary.items())
    )
    for name, img in images.items():
        out.append(f"\n## {name}\n\n![{name}]({img.relative_to(eval_dir).as_posix()})\n")
    return "".join(out)


def render_html(title, task, headers, rows, summary, judge, images) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>",
        e(title),
        "</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px}th{background:#f3f3f3}"
        "img{max-width:100%;border:1px solid #eee}</style></head><body>",
        f"<h1>{e(title)}</h1><table><tr>",
        "".join(f"<th>{e(h)}</th>" for h in headers),
        "</tr>",
    ]
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
    parts.append(
        f"</table><p>{e(_notes(task))} Intervals: seeded percentile bootstrap over test examples; "
        "Δ is paired.</p>"
    )
    if judge:
        parts.append(f"<h2>Judge</h2><pre>{e(json.dumps(judge, indent=2))}</pre>")
    for name, img in images.items():
        data = base64.b64encode(img.read_bytes()).decode("ascii")
        parts.append(f"<h2>{e(name)}</h2><img alt='{e(name)}' src='data:image/png;base64,{data}'>")
    parts.append(
        "<h2>Data</h2><table>"
        + "".join(f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in summary.items())
        + "</table></body></html>"
    )
    return "".join(parts)


def write_eval_outputs(
    recipe,
    task: Task,
    results: list[ContenderResult],
    test: list[Example],
    summary: dict,
    judge: dict | None = None,
):
    from tunesmith.eval.runner import EvalRun

    eval_dir = recipe.run_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    metrics = {r.name: r.metrics for r in results}
    (eval_dir / "metrics.json").write_text(
        json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    with open(eval_dir / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for r in results:
            for row in r.predictions:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    images = make_plots(task, results, test, eval_dir)
    headers, rows = table_rows(task, results)
    title = f"{recipe.name}: evaluation ({task.kind}, {len(test)} test examples)"
    md = eval_dir / "report.md"
    md.write_text(
        render_markdown(title, task, headers, rows, summary, judge, images, eval_dir), encoding="utf-8"
    )
    page = eval_dir / "report.html"
    page.write_text(render_html(title, task, headers, rows, summary, judge, images), encoding="utf-8")
    return EvalRun(eval_dir, task, results, md, page)
