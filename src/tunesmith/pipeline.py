"""``tunesmith run``: data → base eval → baselines → LoRA SFT → fine-tuned eval → report.

Each stage is a small function in its own module; this file only wires them together and
keeps the run directory layout in one place.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from tunesmith.config import Recipe, dump_resolved
from tunesmith.data.formatting import chat_messages, end_of_turn, prompt_text
from tunesmith.data.prepare import PreparedData, prepare
from tunesmith.data.task import render_prompt
from tunesmith.errors import ConfigError
from tunesmith.eval import baselines
from tunesmith.eval.classify import ContenderResult, evaluate_baseline, evaluate_llm
from tunesmith.progress import task_bar


@dataclass
class RunResult:
    run_dir: Path
    report: Path
    metrics: dict
    timings: dict[str, float] = field(default_factory=dict)


def prepare_data(recipe: Recipe, data_dir: Path, console: Console) -> PreparedData:
    """Read, curate, map and split (cached); every rejected row goes to ``rejected.jsonl`` with its reason."""
    return prepare(recipe, data_dir, console)


def run(recipe: Recipe, console: Console | None = None) -> RunResult:
    """Run the whole recipe and return where its report is."""
    from tunesmith.models.loading import check_adapter_device, load_model, load_tokenizer, pick_placement
    from tunesmith.report import plot_confusions, write_report
    from tunesmith.train.stage import train_stage

    console = console or Console()
    if recipe.data is None:
        raise ConfigError("this recipe has no data section; `tunesmith run` needs one (see examples/banking77.yaml)")
    if recipe.train.method != "sft" or recipe.train.head != "generative":
        raise ConfigError("tunesmith run fine-tunes with generative SFT; use `tunesmith train` for "
                          "train.method dpo or train.head classifier")
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_resolved(recipe, run_dir / "config.resolved.yaml")
    timings: dict[str, float] = {}

    @contextmanager
    def stage(name: str):
        console.rule(f"[bold]{name}")
        t0 = time.time()
        yield
        timings[name] = time.time() - t0

    def bar(desc: str, total: int):
        return task_bar(console, desc, total)

    with stage("data"):
        data = prepare_data(recipe, run_dir / "data", console)
        console.print(", ".join(f"{k}: {v}" for k, v in data.summary.items()))
    train, val, test = data.splits["train"], data.splits["val"], data.splits["test"]
    if recipe.eval.max_examples:
        test = test[: recipe.eval.max_examples]
    gold = [e.target for e in test]
    ids = [e.id for e in test]
    results: list[ContenderResult] = []

    with stage("load model"):
        placement = pick_placement(recipe.model.precision, recipe.model.device)
        check_adapter_device(recipe.train.adapter, placement)
        tokenizer = load_tokenizer(recipe.model.name)
        model = load_model(recipe.model.name, placement)
        console.print(f"{recipe.model.name} on {placement.device} in {placement.dtype}")
    suffix = end_of_turn(tokenizer)
    labels_for_base = data.labels if recipe.eval.base_prompt_with_labels else None
    base_prompts = [prompt_text(tokenizer, chat_messages(e, recipe.data, labels_for_base)) for e in test]
    ft_prompts = [prompt_text(tokenizer, chat_messages(e, recipe.data)) for e in test]

    with stage("evaluate base model"):
        results.append(
            evaluate_llm("base", f"{recipe.model.name}, no fine-tuning", model, tokenizer, base_prompts, ids, gold,
                         data.labels, suffix, recipe.eval, bar)
        )
    with stage("baselines"):
        texts = [render_prompt(e, recipe.data.prompt) for e in test]
        train_texts = [render_prompt(e, recipe.data.prompt) for e in train]
        train_gold = [e.target for e in train]
        if "majority" in recipe.eval.baselines:
            pred = baselines.majority(train_gold, len(test))
            results.append(evaluate_baseline("majority", "most frequent training label", pred, ids, texts, gold,
                                             data.labels))
        if "tfidf_logreg" in recipe.eval.baselines:
            pred = baselines.tfidf_logreg(train_texts, train_gold, texts, recipe.seed)
            results.append(evaluate_baseline("tfidf_logreg", "TF-IDF + logistic regression on the train split",
                                             pred, ids, texts, gold, data.labels))

    with stage("train"):
        trained = train_stage(recipe, train, val, model, tokenizer, placement, console, bar)
        data.summary["rejected (see data/rejected.jsonl)"] += trained.too_long
    with stage("evaluate fine-tuned model"):
        if hasattr(trained.model, "merge_adapter"):
            trained.model.merge_adapter()  # fold LoRA into the weights: evaluation runs at base-model speed
        results.insert(
            1,
            evaluate_llm("finetuned", f"{recipe.model.name} + LoRA r={recipe.train.lora.r}"
                         if recipe.train.adapter != "full" else f"{recipe.model.name}, full fine-tune",
                         trained.model, tokenizer, ft_prompts, ids, gold, data.labels, suffix, recipe.eval, bar),
        )

    with stage("report"):
        eval_dir = run_dir / "eval"
        eval_dir.mkdir(parents=True, exist_ok=True)
        from tunesmith.eval.report import write_eval_outputs
        from tunesmith.eval.runner import add_intervals
        from tunesmith.eval.tasks import Task

        task = Task("classification", data.labels, recipe.eval)  # bootstrap CIs, metrics.json, predictions,
        add_intervals(results, task, recipe.eval.bootstrap, recipe.seed)  # eval/report.md and report.html
        write_eval_outputs(recipe, task, results, test, data.summary)
        metrics = {r.name: r.metrics for r in results}
        llm = [r for r in results if r.name in ("base", "finetuned")]
        images = {
            "Training loss": run_dir / "train" / "loss.png",
            "Confusion matrices (test split)": plot_confusions(llm, gold, data.labels, eval_dir / "confusion.png"),
        }
        for png in sorted((run_dir / "data" / "profile").glob("*.png")):  # the data stage's profile plots
            images[f"Data profile: {png.stem.replace('_', ' ')}"] = png
        first = next((r["train_loss"] for r in trained.rows if r["train_loss"] is not None), None)
        last = next((r["train_loss"] for r in reversed(trained.rows) if r["train_loss"] is not None), None)
        train_summary = {
            "method": recipe.train.adapter + (f" (r={recipe.train.lora.r}, alpha={recipe.train.lora.alpha})"
                                              if recipe.train.adapter != "full" else ""),
            "device / precision": f"{placement.device} / {placement.dtype}",
            "trainable parameters": f"{trained.trainable_params:,} of {trained.total_params:,}",
            "epochs / steps": f"{recipe.train.epochs} / {trained.rows[-1]['step'] if trained.rows else 0}",
            "tokens trained (no padding)": f"{trained.tokens:,}",
            "training time": f"{trained.seconds:.0f} s ({trained.tokens_per_second:,.0f} tokens/s)",
            "train loss first → last logged": f"{first:.3f} → {last:.3f}" if first is not None else "–",
            "trainable tensors that changed": f"{trained.tensors_changed} of {trained.tensors_trainable}",
        }
        report = write_report(run_dir / "report.md", recipe=recipe, results=results, data_summary=data.summary,
                              train_summary=train_summary, timings=timings, images=images)
    return RunResult(run_dir, report, metrics, timings)
