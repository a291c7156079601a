"""The eval folder: metrics.json, predictions.jsonl, charts, report.md and a self-contained report.html.

Both reports are rendered from the same rows, comparison table first; the HTML embeds its
charts as base64 PNGs so that the one file can be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.kinds import TaskKind
from tunesmith.records import Example
from tunesmith.scoring.display import num
from tunesmith.scoring.plots import make_plots
from tunesmith.scoring.result import ContenderResult, EvalRun, baseline_comparison, best_contender


def _ci(v, fmt: Callable = lambda x: f"{x:.3g}") -> str:
    return "" if not v else f" [{fmt(v[0])}, {fmt(v[1])}]"


def columns(task: TaskKind, ref: str) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, cell) pairs for the comparison table: headline and Δ, the task kind's own, then the common ones."""
    h, fmt, diff = task.headline, task.fmt, task.diff_fmt
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
        *task.columns(),
        ("failed calls", lambda m: str(m.get("failed_calls", "–"))),
        (
            "answer loss / ppl",
            lambda m: (
                f"{m['mean_loss']:.3f} / {m['perplexity']:.2f}" if m.get("perplexity") is not None else "–"
            ),
        ),
        ("scored by", lambda m: m.get("scoring", "–")),
        ("parameters", lambda m: _millions(m.get("parameters"))),
        ("train time", lambda m: f"{m['train_seconds']:,.0f} s" if m.get("train_seconds") is not None else "–"),
        ("ms / example", lambda m: f"{m['latency_ms']:,.1f}" if m.get("latency_ms") is not None else "–"),
    ]
    return cols


def _millions(n) -> str:
    return "–" if not n else f"{n / 1e6:,.1f}M" if n >= 1e5 else f"{n:,}"


def table_rows(task: TaskKind, results: list[ContenderResult]) -> tuple[list[str], list[list[str]]]:
    cols = columns(task, results[0].name)
    extra = sorted({k for r in results for k in r.metrics if k.startswith("judge_")})
    graded = grader_columns(results)
    headers = ["contender", *[c for c, _ in cols], *[c for c, _ in graded], *extra]
    rows = [
        [
            f"{r.name} — {r.description}",
            *[f(r.metrics) for _, f in cols],
            *[f(r.metrics) for _, f in graded],
            *[num(r.metrics.get(k)) for k in extra],
        ]
        for r in results
    ]
    return headers, rows


def grader_columns(results: list[ContenderResult]) -> list[tuple[str, Callable[[dict], str]]]:
    """Two columns per ``eval.graders`` entry: its mean reward (95% CI) and Δ vs the first contender."""
    if not results:
        return []
    ref = results[0].name
    keys = [k for k in results[0].metrics if k.startswith("grader_") and not k.endswith(("_ci95", "_errored"))
            and "_diff_vs_" not in k]
    fmt = lambda x: f"{x:.3f}"  # noqa: E731
    cols = []
    for k in keys:
        cols.append((f"{k[7:]} (95% CI)", lambda m, k=k: num(m.get(k)) + _ci(m.get(f"{k}_ci95"), fmt)))
        cols.append((f"{k[7:]} Δ vs {ref}", lambda m, k=k: (
            f"{m[f'{k}_diff_vs_{ref}']:+.3f}" + _ci(m.get(f"{k}_diff_vs_{ref}_ci95"), lambda x: f"{x:+.3f}")
            if m.get(f"{k}_diff_vs_{ref}") is not None else "–")))
    return cols


def best(task: TaskKind, results: list[ContenderResult]) -> ContenderResult | None:
    """The result with the best headline value (the first on a tie), or None."""
    name = best_contender(task, {r.name: r.metrics for r in results}, [r.name for r in results])
    return next((r for r in results if r.name == name), None)


def comparisons(task: TaskKind, results: list[ContenderResult], resamples: int, seed: int) -> list[dict]:
    """Paired differences that answer the run's questions: every fine-tuned arm against the best baseline
    and against each other arm (paired bootstrap over the same test examples)."""
    from tunesmith.eval import headline
    from tunesmith.scoring.bootstrap import paired_difference

    if headline.is_set_metric(task):  # macro-F1: computed again on each resample
        paired_difference = lambda a, b, n, s: headline.paired(task, a, b, n, s)  # noqa: E731
    arms = [r for r in results if r.is_fine_tuned]
    top = best(task, [r for r in results if r.is_baseline])
    pairs = [(a, top) for a in arms] if top else []
    pairs += [(a, b) for i, a in enumerate(arms) for b in arms[i + 1 :]]
    out = []
    for a, b in pairs:
        mean, ci = paired_difference(a, b, resamples, seed)
        if mean is None:
            continue
        sure = ci is not None and (ci[0] > 0 or ci[1] < 0)
        wins = (mean > 0) == task.higher_is_better
        verdict = ("better" if wins else "worse") if sure else "no clear difference"
        out.append({"a": a.name, "b": b.name, "diff": mean, "ci95": ci, "verdict": verdict,
                    "b_is_baseline": b.is_baseline})
    return out


def comparison_lines(task: TaskKind, comps: list[dict]) -> list[str]:
    """One sentence per comparison, e.g. 'finetuned vs best baseline tfidf_svm: +2.1% [−0.5%, +4.8%] → no clear difference'."""
    lines = []
    for c in comps:
        who = f"best baseline {c['b']}" if c["b_is_baseline"] else c["b"]
        lines.append(f"{c['a']} vs {who}: {task.diff_fmt(c['diff'])}{_ci(c['ci95'], task.diff_fmt)} → **{c['verdict']}**")
    return lines


@dataclass
class Report:
    """Everything one report shows; rendered as Markdown (eval/report.md, the run's report.md) and HTML."""

    title: str
    task: TaskKind
    results: list[ContenderResult]
    summary: dict
    judge: dict | None
    images: dict[str, Path]
    comparisons: list[dict]
    sections: dict[str, dict] = field(default_factory=dict)  # extra tables (training, time per stage)
    notice: str | None = None  # the first line, above the title (a model with random weights)
    recommended: tuple[str, str] | None = None  # (arm, why): the arm chosen on the validation split

    def lead(self) -> str:
        """Why the headline metric is the one leading (eval.metric, or a majority label), and the recommended arm."""
        why = getattr(self.task, "headline_reason", None)
        lines = [why] if why else []
        if self.recommended:
            lines.append(f"Recommended: **{self.recommended[0]}**, {self.recommended[1]}.")
        return "".join(line + "\n\n" for line in lines)

    def headline(self) -> str:
        """The sentence at the top: the best fine-tuned model against base and the best baseline."""
        t, h = self.task, self.task.headline
        by = {r.name: r for r in self.results}
        arm = by.get(self.recommended[0]) if self.recommended else None
        arm = arm or best(t, [r for r in self.results if r.is_fine_tuned])
        base = by.get("base")
        if arm is None:
            return ""
        text = f"**{arm.name}** {h} {t.fmt(arm.metrics.get(h))}"
        if base is not None:  # a run whose model is an encoder has no base contender
            text += f" vs base {t.fmt(base.metrics.get(h))}"
        baseline = best(t, [r for r in self.results if r.is_baseline])
        top = baseline_comparison(self.comparisons, arm.name, baseline and baseline.name)
        if top:
            b = by[top["b"]]
            said = {"better": "beats the baseline", "worse": "is below the baseline",
                    "no clear difference": "is not clearly different from the baseline"}[top["verdict"]]
            text += (f" and best baseline {b.name} {t.fmt(b.metrics.get(h))}: {arm.name} **{said}** "
                     f"({t.diff_fmt(top['diff'])}{_ci(top['ci95'], t.diff_fmt)}, paired)")
        return text + f" on {len(self.results[0].per_example)} held-out test examples{self.test_rows()}."

    def test_rows(self) -> str:
        """What the verdict's test examples are of: a sample of the test split, and the test file's rows set aside
        (how many, why), so that no test row leaves the verdict unsaid."""
        from tunesmith.data.prepare import TEST_SET_ASIDE

        scored, total = len(self.results[0].per_example), self.summary.get("test")
        out = f" (a seeded sample of the {total:,} in the test split)" if isinstance(total, int) and scored < total \
            else ""
        if self.summary.get(TEST_SET_ASIDE):
            out += f"; test rows set aside: {self.summary[TEST_SET_ASIDE]} (data/rejected.jsonl)"
        return out

    def markdown(self, base_dir: Path) -> str:
        headers, rows = table_rows(self.task, self.results)
        out = ([self.notice + "\n\n"] if self.notice else []) + [f"# {self.title}\n\n"]
        out.append(self.lead())
        if self.headline():
            out.append(self.headline() + "\n\n")
        out += ["| " + " | ".join(headers) + " |\n", "|" + "---|" * len(headers) + "\n"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |\n" for row in rows]
        out.append(f"\n{self.task.notes()} {INTERVALS}\n")
        if self.comparisons:
            lines = comparison_lines(self.task, self.comparisons)
            out.append("\n## Paired differences\n\n" + "".join(f"- {line}\n" for line in lines))
        if self.judge:
            out.append("\n## Judge\n\n```json\n" + json.dumps(self.judge, indent=2) + "\n```\n")
        for name, table in {"Data": self.summary, **self.sections}.items():
            out.append(f"\n## {name}\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in table.items()))
        for name, img in self.images.items():
            out.append(f"\n## {name}\n\n![{name}]({os.path.relpath(img, base_dir)})\n")
        return "".join(out)

    def html(self) -> str:
        e = html.escape
        headers, rows = table_rows(self.task, self.results)
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'><title>", e(self.title), "</title><style>",
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;"
            "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px}th{background:#f3f3f3}"
            "img{max-width:100%;border:1px solid #eee}</style></head><body>",
            f"<p><b>{e(self.notice.replace('**', ''))}</b></p>" if self.notice else "",
            f"<h1>{e(self.title)}</h1>",
            "".join(f"<p>{e(x)}</p>" for x in self.lead().replace("**", "").split("\n\n") if x),
            f"<p>{e(self.headline().replace('**', ''))}</p><table><tr>" if self.headline() else "<table><tr>",
            "".join(f"<th>{e(h)}</th>" for h in headers), "</tr>",
        ]
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append(f"</table><p>{e(self.task.notes())} {INTERVALS}</p>")
        if self.comparisons:
            lines = comparison_lines(self.task, self.comparisons)
            items = "".join(f"<li>{e(x.replace('**', ''))}</li>" for x in lines)
            parts.append(f"<h2>Paired differences</h2><ul>{items}</ul>")
        if self.judge:
            parts.append(f"<h2>Judge</h2><pre>{e(json.dumps(self.judge, indent=2))}</pre>")
        for name, img in self.images.items():
            data = base64.b64encode(img.read_bytes()).decode("ascii")
            parts.append(f"<h2>{e(name)}</h2><img alt='{e(name)}' src='data:image/png;base64,{data}'>")
        for name, table in {"Data": self.summary, **self.sections}.items():
            parts.append(f"<h2>{e(name)}</h2><table>"
                         + "".join(f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in table.items())
                         + "</table>")
        parts.append("</body></html>")
        return "".join(parts)


INTERVALS = ("Intervals: seeded percentile bootstrap over test examples; Δ and the paired differences resample the "
             "same examples for both sides.")


def write_eval_outputs(recipe, task: TaskKind, results: list[ContenderResult], test: list[Example], summary: dict,
                       judge: dict | None = None):
    """eval/metrics.json, predictions.jsonl, comparisons.json, plots, report.md and report.html."""
    eval_dir = recipe.run_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    metrics = {r.name: {**r.metrics, "contender": r.kind} for r in results}
    (eval_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    with open(eval_dir / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for r in results:
            for row in r.predictions:
                fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    comps = comparisons(task, results, recipe.eval.bootstrap, recipe.seed) if recipe.eval.bootstrap else []
    (eval_dir / "comparisons.json").write_text(json.dumps(comps, indent=2), encoding="utf-8")
    from tunesmith.eval.headline import save

    save(eval_dir, task)
    report = Report(f"{recipe.name}: evaluation ({task.name}, {len(test)} test examples)", task, results, summary,
                    judge, make_plots(task, results, test, eval_dir), comps)
    from tunesmith.models.random_weights import report_line

    report.notice = report_line(recipe.model.name)
    md = eval_dir / "report.md"
    md.write_text(report.markdown(eval_dir), encoding="utf-8")
    page = eval_dir / "report.html"
    page.write_text(report.html(), encoding="utf-8")
    return EvalRun(eval_dir, task, results, md, page, summary, report)
