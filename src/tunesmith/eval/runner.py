"""``tunesmith eval RECIPE``: every contender side by side on the same test split and prompts.

Contenders: the base model; each fine-tuned adapter or merged folder (the run's own
``train/adapter`` is added as ``finetuned`` when it exists); each OpenAI-compatible endpoint;
and the simple baselines that apply to the task. Then bootstrap intervals, the optional judge,
and ``eval/metrics.json``, ``predictions.jsonl``, plots, ``report.md`` and ``report.html``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from tunesmith.config import ContenderSpec, Recipe
from tunesmith.errors import DataError
from tunesmith.eval import baselines
from tunesmith.eval.bootstrap import diff_ci, mean_ci
from tunesmith.eval.classify import ContenderResult, evaluate_llm
from tunesmith.eval.tasks import Task, score_outputs
from tunesmith.records import Example


@dataclass
class EvalData:
    train: list[Example]
    test: list[Example]
    labels: list[str]
    summary: dict = field(default_factory=dict)


@dataclass
class EvalRun:
    eval_dir: Path
    task: Task
    results: list[ContenderResult]
    report_md: Path
    report_html: Path


def task_kind(recipe: Recipe) -> str:
    if recipe.eval.task != "auto":
        return recipe.eval.task
    return "classification" if recipe.data.task == "classification" else "generation"


def load_eval_data(recipe: Recipe, kind: str, console: Console) -> EvalData:
    """Test (and train, for baselines) examples; a SQuAD-style JSON file is read as QA examples."""
    from tunesmith.pipeline import prepare_data

    if (
        kind == "qa"
        and Path(recipe.data.path).suffix.lower() == ".json"
        and _is_squad(Path(recipe.data.path))
    ):
        from tunesmith.data.split import split_examples
        from tunesmith.eval.qa import squad_examples

        examples = squad_examples(Path(recipe.data.path), recipe.data.limit)
        splits = split_examples(
            examples, recipe.data.split.model_copy(update={"stratify": False}), recipe.seed
        )
        if not splits["test"]:
            raise DataError("the test split is empty; give data.split.test a size > 0")
        summary = {"questions": len(examples), **{k: len(v) for k, v in splits.items()}}
        return EvalData(splits["train"], splits["test"], [], summary)
    data = prepare_data(recipe, recipe.run_dir / "data", console)
    labels = data.labels if kind == "classification" else []
    return EvalData(data.splits["train"], data.splits["test"], labels, data.summary)


def _is_squad(path: Path) -> bool:
    with open(path, encoding="utf-8-sig") as fh:
        head = fh.read(4096)
    return '"data"' in head and ('"paragraphs"' in head or '"title"' in head)


def _adapter_specs(recipe: Recipe) -> list[ContenderSpec]:
    specs = list(recipe.eval.adapters)
    if not any(s.name == "finetuned" for s in specs):
        for sub in ("adapter", "model"):
            own = recipe.run_dir / "train" / sub
            if own.is_dir():
                specs.insert(0, ContenderSpec(name="finetuned", path=own))
                break
    return specs


def _load_contender(recipe: Recipe, spec: ContenderSpec, placement):
    """A PEFT adapter on a fresh base model, or a merged model folder."""
    from tunesmith.errors import ModelError
    from tunesmith.models.loading import load_model

    path = Path(spec.path)
    if not path.is_dir():
        raise ModelError(f"eval.adapters '{spec.name}': folder not found: {path}")
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_model(recipe.model.name, placement)
        return PeftModel.from_pretrained(base, str(path)).eval(), f"{recipe.model.name} + adapter {path.name}"
    return load_model(str(path), placement), f"merged model {path}"


def evaluate_recipe(recipe: Recipe, console: Console | None = None) -> EvalRun:
    """Evaluate all contenders of a recipe and write the eval folder."""
    from tunesmith.data.formatting import chat_messages, prompt_text
    from tunesmith.models.loading import load_tokenizer
    from tunesmith.progress import task_bar

    console = console or Console()
    bar = lambda d, t: task_bar(console, d, t)  # noqa: E731
    from tunesmith.eval.endpoint import EndpointClient

    clients = [EndpointClient(spec) for spec in recipe.eval.endpoints]  # a missing API key fails here, early
    judge_client = EndpointClient(recipe.eval.judge.endpoint) if recipe.eval.judge else None
    kind = task_kind(recipe)
    data = load_eval_data(recipe, kind, console)
    test = data.test[: recipe.eval.max_examples] if recipe.eval.max_examples else data.test
    task = Task(kind, data.labels, recipe.eval)
    console.print(f"task: {kind}; {len(test)} test example(s); headline metric: {task.headline}")
    show_labels = data.labels if kind == "classification" and recipe.eval.base_prompt_with_labels else None
    base_msgs = [chat_messages(e, recipe.data, show_labels) for e in test]
    tuned_msgs = [chat_messages(e, recipe.data) for e in test]
    tokenizer = load_tokenizer(recipe.model.name)
    base_prompts = [prompt_text(tokenizer, m) for m in base_msgs]
    tuned_prompts = [prompt_text(tokenizer, m) for m in tuned_msgs]
    results = _local_contenders(recipe, task, test, tokenizer, base_prompts, tuned_prompts, bar)
    for client in clients:
        results.append(_endpoint(recipe, task, client, base_msgs, test, bar))
    results += _baselines(recipe, task, data.train, test, console)

    add_intervals(results, task, recipe.eval.bootstrap, recipe.seed)
    judge_summary = _judge(recipe, task, judge_client, results, test, bar) if judge_client else None
    from tunesmith.eval.report import write_eval_outputs

    return write_eval_outputs(recipe, task, results, test, data.summary, judge_summary)


def _local_contenders(recipe, task: Task, test, tokenizer, base_prompts, tuned_prompts, bar) -> list[ContenderResult]:
    """The base model on ``base_prompts``, then each fine-tuned contender on ``tuned_prompts``, one model in memory at a time."""
    from tunesmith.data.formatting import end_of_turn
    from tunesmith.models.loading import load_model, pick_placement

    placement = pick_placement(recipe.model.precision, recipe.model.device)
    suffix = end_of_turn(tokenizer)
    model = load_model(recipe.model.name, placement)
    results = [_local(recipe, task, "base", f"{recipe.model.name}, no fine-tuning", model, tokenizer, base_prompts, test,
                      suffix, bar)]
    del model
    for spec in _adapter_specs(recipe):
        model, description = _load_contender(recipe, spec, placement)
        results.append(_local(recipe, task, spec.name, description, model, tokenizer, tuned_prompts, test, suffix, bar))
        del model
    return results


def evaluate_conversations(recipe: Recipe, rows: list[dict], console: Console | None = None) -> EvalRun:
    """Base vs the run's fine-tuned adapter on held-out chat rows (``prompt`` messages → ``completion``).

    Fine-tuning jobs use it on their validation file, which has no data section to prepare: the
    prompts are the conversations as uploaded, the task is free generation (chrF, ROUGE-L, answer loss)
    with room for the longest reference answer plus a few tokens.
    """
    from tunesmith.data.formatting import prompt_text
    from tunesmith.models.loading import load_tokenizer
    from tunesmith.progress import task_bar

    console = console or Console()
    if not rows:
        raise DataError("no conversations to evaluate")
    rows = rows[: recipe.eval.max_examples] if recipe.eval.max_examples else rows
    test = [
        Example(f"valid-{i + 1}", {"prompt": r["prompt"][-1]["content"] if r["prompt"] else ""}, r["completion"][-1]["content"])
        for i, r in enumerate(rows)
    ]
    tokenizer = load_tokenizer(recipe.model.name)
    prompts = [prompt_text(tokenizer, r["prompt"]) for r in rows]
    longest = max(len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) for e in test)
    cfg = recipe.eval.model_copy(update={"max_new_tokens": min(512, longest + 8)})  # room for the longest reference
    recipe = recipe.model_copy(update={"eval": cfg})
    task = Task("generation", [], cfg)
    results = _local_contenders(recipe, task, test, tokenizer, prompts, prompts, lambda d, t: task_bar(console, d, t))
    add_intervals(results, task, recipe.eval.bootstrap, recipe.seed)
    from tunesmith.eval.report import write_eval_outputs

    return write_eval_outputs(recipe, task, results, test, {"validation conversations": len(test)})


def _local(
    recipe, task: Task, name, description, model, tokenizer, prompts, test, suffix, bar
) -> ContenderResult:
    from tunesmith.eval.generation import generate_greedy
    from tunesmith.eval.perplexity import answer_losses, summarize

    cfg = recipe.eval
    if task.kind == "classification":
        res = evaluate_llm(
            name,
            description,
            model,
            tokenizer,
            prompts,
            [e.id for e in test],
            [e.target for e in test],
            task.labels,
            suffix,
            cfg,
            bar,
        )
        for row in res.predictions:
            row["parsed_generate"], row["parsed"] = row["parsed"], row["scored"] or row["parsed"]
    else:
        with bar(f"eval {name}: generate", len(prompts)) as advance:
            outputs = generate_greedy(
                model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, advance, stop=cfg.stop
            )
        res = score_outputs(task, name, description, "llm", test, prompts, outputs)
    if cfg.perplexity:
        answers = [(e.meta.get("answers") or [e.target])[0] + suffix for e in test]
        with bar(f"eval {name}: answer loss", len(prompts)) as advance:
            res.metrics |= summarize(
                answer_losses(model, tokenizer, prompts, answers, max(1, cfg.batch_size // 2), advance)
            )
    return res


def _endpoint(recipe, task: Task, client, messages, test, bar) -> ContenderResult:
    spec = client.spec
    with bar(f"eval {spec.name}: endpoint", len(messages)) as advance:
        replies = client.chat_many(messages, spec.max_tokens or recipe.eval.max_new_tokens, advance)
    prompts = [json.dumps(m, ensure_ascii=False) for m in messages]
    res = score_outputs(
        task,
        spec.name,
        f"{spec.model} at {spec.base_url}",
        "endpoint",
        test,
        prompts,
        [r.text for r in replies],
        [r.error for r in replies],
    )
    for row, r in zip(res.predictions, replies, strict=True):
        row["attempts"] = r.attempts
    return res


def _baselines(recipe, task: Task, train, test, console) -> list[ContenderResult]:
    """The LLM-free baselines that apply to this task; the others are named and skipped."""
    from tunesmith.data.task import render_prompt

    texts = [render_prompt(e, recipe.data.prompt) for e in test]
    train_texts = [render_prompt(e, recipe.data.prompt) for e in train]
    made: dict[str, tuple[str, Callable[[], list]]] = {}
    if task.kind == "classification":
        gold = [e.target for e in train]
        made = {
            "majority": ("most frequent training label", lambda: baselines.majority(gold, len(test))),
            "tfidf_logreg": (
                "TF-IDF + logistic regression on the train split",
                lambda: baselines.tfidf_logreg(train_texts, gold, texts, recipe.seed),
            ),
            "random": (
                "uniform random label (seeded)",
                lambda: baselines.random_guess(task.labels, len(test), recipe.seed),
            ),
        }
    elif task.kind == "regression":
        values = [task.gold(e) for e in train]
        made = {
            "mean": ("mean training value", lambda: baselines.mean_value(values, len(test))),
            "ridge": (
                "TF-IDF + ridge regression on log value",
                lambda: baselines.tfidf_ridge(train_texts, values, texts),
            ),
            "random": (
                "a random training value (seeded)",
                lambda: baselines.random_guess(values, len(test), recipe.seed),
            ),
        }
    out = []
    for name in recipe.eval.baselines:
        if name not in made:
            console.print(f"[dim]baseline '{name}' does not apply to a {task.kind} task; skipped[/]")
            continue
        if not train:
            console.print(f"[yellow]baseline '{name}' needs training examples; the train split is empty[/]")
            continue
        description, predict = made[name]
        outputs = [p if isinstance(p, str) else f"{p:.2f}" for p in predict()]
        out.append(score_outputs(task, name, description, "baseline", test, texts, outputs))
    return out


def add_intervals(results: list[ContenderResult], task: Task, resamples: int, seed: int) -> None:
    """95% bootstrap intervals on each headline and on each contender's difference from the first."""
    if resamples <= 0 or not results:
        return
    h = task.headline
    ref = results[0]
    for r in results:
        r.metrics[f"{h}_ci95"] = mean_ci(r.per_example, resamples, seed)
        if r is not ref and len(r.per_example) == len(ref.per_example):
            a = [
                None if x is None or y is None else x
                for x, y in zip(r.per_example, ref.per_example, strict=True)
            ]
            b = [
                None if x is None or y is None else y
                for x, y in zip(r.per_example, ref.per_example, strict=True)
            ]
            r.metrics[f"{h}_diff_vs_{ref.name}"] = _nanmean_diff(a, b)
            r.metrics[f"{h}_diff_vs_{ref.name}_ci95"] = diff_ci(a, b, resamples, seed)


def _nanmean_diff(a, b) -> float | None:
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None]
    return sum(x - y for x, y in pairs) / len(pairs) if pairs else None


def _judge(recipe, task: Task, client, results, test, bar) -> dict:
    """Pairwise win rate of ``judge.pair[0]`` over ``pair[1]``, or a rubric score per generating contender."""
    from tunesmith.data.task import render_prompt
    from tunesmith.errors import ConfigError
    from tunesmith.eval import judge

    spec = recipe.eval.judge
    questions = [render_prompt(e, recipe.data.prompt) for e in test]
    refs = [e.target for e in test]
    by_name = {r.name: r for r in results}

    def answers(r: ContenderResult) -> list[str]:
        return [row["output"] or "" for row in r.predictions]

    if spec.mode == "pairwise":
        missing = [n for n in spec.pair if n not in by_name]
        if missing:
            raise ConfigError(f"eval.judge.pair names {missing}, which are not contenders: {sorted(by_name)}")
        x, y = by_name[spec.pair[0]], by_name[spec.pair[1]]
        with bar(f"judge {x.name} vs {y.name}", len(test)) as advance:
            summary, verdicts = judge.pairwise(client, questions, refs, answers(x), answers(y), advance)
        x.metrics[f"judge_win_rate_vs_{y.name}"] = summary["win_rate"]
        for row, v in zip(x.predictions, verdicts, strict=True):
            row["judge_vs_" + y.name] = v
        return {"mode": "pairwise", "pair": spec.pair, **summary}
    out = {"mode": "rubric"}
    for r in results:
        if r.kind == "baseline" and task.kind != "generation":
            continue
        with bar(f"judge {r.name}", len(test)) as advance:
            summary, scores = judge.rubric(client, spec.rubric, questions, refs, answers(r), advance)
        r.metrics["judge_score"] = summary["mean_score"]
        for row, s in zip(r.predictions, scores, strict=True):
            row["judge_score"] = s
        out[r.name] = summary
    return out
