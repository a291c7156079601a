"""``tunesmith run``: data → base eval → baselines → LoRA SFT → fine-tuned eval → report.

Each stage is a small function in its own module; this file only wires them together and
keeps the run directory layout in one place.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from tunesmith.config import Recipe, dump_resolved
from tunesmith.data.formatting import chat_messages, end_of_turn, prompt_text
from tunesmith.data.readers import read_records
from tunesmith.data.split import split_examples
from tunesmith.data.task import label_set, render_prompt, to_examples
from tunesmith.errors import DataError
from tunesmith.eval import baselines
from tunesmith.eval.classify import ContenderResult, evaluate_baseline, evaluate_llm
from tunesmith.progress import task_bar
from tunesmith.records import Example


@dataclass
class PreparedData:
    splits: dict[str, list[Example]]
    labels: list[str]
    summary: dict[str, int]
    rejected: int


@dataclass
class RunResult:
    run_dir: Path
    report: Path
    metrics: dict
    timings: dict[str, float] = field(default_factory=dict)


def _write_jsonl(path: Path, rows, mode: str = "w") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode, encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _append_jsonl(path: Path, rows) -> None:
    _write_jsonl(path, rows, mode="a")


def prepare_data(recipe: Recipe, data_dir: Path, console: Console) -> PreparedData:
    """Read, map and split; every rejected row goes to ``rejected.jsonl`` with its reason."""
    cfg = recipe.data
    records, rejected = read_records(cfg.path, cfg.format, cfg.on_error, cfg.limit)
    examples, dropped = to_examples(records, cfg)
    rejected += dropped
    _write_jsonl(data_dir / "rejected.jsonl", (r.to_json() for r in rejected))
    if rejected:
        console.print(f"[yellow]{len(rejected)} record(s) set aside[/] → {data_dir / 'rejected.jsonl'}")
    if not examples:
        raise DataError(f"{cfg.path}: no usable examples (read {len(records)}, rejected {len(rejected)})")
    labels = label_set(examples, cfg)
    splits = split_examples(examples, cfg.split, recipe.seed)
    if not splits["test"]:
        raise DataError("the test split is empty; give data.split.test a size > 0")
    for name in ("train", "val", "test"):
        rows = (
            {"id": e.id, "messages": chat_messages(e, cfg) + [{"role": "assistant", "content": e.target}]}
            for e in splits[name]
        )
        _write_jsonl(data_dir / f"{name}.jsonl", rows)
    summary = {
        "rows read": len(records) + sum(r.stage == "read" for r in rejected),
        "rejected (see data/rejected.jsonl)": len(rejected),
        "examples": len(examples),
        "labels": len(labels),
        "train": len(splits["train"]),
        "val": len(splits["val"]),
        "test": len(splits["test"]),
        "not used (split sizes smaller than the data)": len(splits["unused"]),
    }
    return PreparedData(splits, labels, summary, len(rejected))


def run(recipe: Recipe, console: Console | None = None) -> RunResult:
    """Run the whole recipe and return where its report is."""
    from tunesmith.models.loading import load_model, load_tokenizer, pick_placement
    from tunesmith.report import plot_confusions, plot_loss, write_report
    from tunesmith.train.sft import conversation_rows, prepare_model, split_by_length, train_sft

    console = console or Console()
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
        rows, too_long = split_by_length(
            conversation_rows([chat_messages(e, recipe.data) for e in train], train_gold),
            [e.id for e in train], tokenizer, recipe.train.max_seq_length,
        )
        if too_long:
            _append_jsonl(run_dir / "data" / "rejected.jsonl", (r.to_json() for r in too_long))
            data.summary["rejected (see data/rejected.jsonl)"] += len(too_long)
            console.print(f"[yellow]{len(too_long)} training example(s) longer than train.max_seq_length "
                          f"set aside[/] → {run_dir / 'data' / 'rejected.jsonl'}")
        if not rows:
            raise DataError("no training example fits train.max_seq_length; raise it")
        val_rows = conversation_rows([chat_messages(e, recipe.data) for e in val], [e.target for e in val])
        trained = train_sft(recipe, prepare_model(recipe, model), tokenizer, rows, val_rows, placement,
                            run_dir / "train", lambda total: bar("train", total))
        console.print(
            f"trained {trained.trainable_params:,} of {trained.total_params:,} parameters on {trained.tokens:,} tokens "
            f"in {trained.seconds:.0f}s ({trained.tokens_per_second:,.0f} tok/s) → {trained.output_dir}"
        )
        (run_dir / "train" / "summary.json").write_text(json.dumps({
            "seconds": trained.seconds, "tokens": trained.tokens, "tokens_per_second": trained.tokens_per_second,
            "trainable_params": trained.trainable_params, "total_params": trained.total_params,
            "trainable_tensors": trained.tensors_trainable, "trainable_tensors_changed": trained.tensors_changed,
            "examples": len(rows),
        }, indent=2), encoding="utf-8")
    with stage("evaluate fine-tuned model"):
        results.insert(
            1,
            evaluate_llm("finetuned", f"{recipe.model.name} + LoRA r={recipe.train.lora.r}"
                         if recipe.train.method == "lora" else f"{recipe.model.name}, full fine-tune",
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
            "Training loss": plot_loss(trained.rows, run_dir / "train" / "loss.png", f"{recipe.name}: loss"),
            "Confusion matrices (test split)": plot_confusions(llm, gold, data.labels, eval_dir / "confusion.png"),
        }
        first = next((r["train_loss"] for r in trained.rows if r["train_loss"] is not None), None)
        last = next((r["train_loss"] for r in reversed(trained.rows) if r["train_loss"] is not None), None)
        train_summary = {
            "method": recipe.train.method + (f" (r={recipe.train.lora.r}, alpha={recipe.train.lora.alpha})"
                                             if recipe.train.method == "lora" else ""),
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
