"""The one evaluation path, used by ``tunesmith eval``, ``tunesmith run`` (every arm) and fine-tuning jobs.

Contenders: the base model; each trained arm (an adapter, a merged model or a classifier head),
each ``eval.adapters`` folder; each OpenAI-compatible endpoint; and the LLM-free baselines that
apply to the task kind. All are scored by the task kind's one parser and scorer on the same
prepared test examples, each asked the way it was trained (its arm's prompt and system prompt).
Then bootstrap intervals, the optional judge, and the eval folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from tunesmith.config import DataSection, Recipe, arm_recipe
from tunesmith.data.steps.split import sample_examples
from tunesmith.errors import ConfigError, DataError, ModelError
from tunesmith.eval.graded import add_grader_metrics, checked_graders
from tunesmith.kinds import TaskKind, make_task, score_outputs
from tunesmith.kinds.base import BaselineInputs
from tunesmith.records import Example
from tunesmith.scoring.bootstrap import mean_ci, paired_difference
from tunesmith.scoring.result import ContenderResult, EvalRun, Source
from tunesmith.train.result import Artefact, trained_output


@dataclass
class LocalContender:
    """A local model, loaded only when its turn comes (one model in memory at a time)."""

    name: str
    description: str
    path: Path | None  # None: the base model; else an adapter, merged-model or classifier folder
    data: DataSection  # how it is asked: prompt template and system prompt of the arm it was trained with
    with_labels: bool = False  # append the label list (a base model has never seen it)
    loads: Artefact = Artefact.MODEL  # what its folder holds: a language model, a classifier or another head
    model: str | None = None  # the arm's own base model (e.g. an encoder) when it is not the recipe's


def arm_recipes(recipe: Recipe) -> list[Recipe]:
    """One recipe per arm (the recipe itself, named ``finetuned``, when it lists none)."""
    if not recipe.arms:
        return [recipe]
    return [arm_recipe(recipe, arm) for arm in recipe.arms]


def arm_name(recipe: Recipe, arm: Recipe) -> str:
    return "finetuned" if arm is recipe else arm.name


def describe_arm(arm: Recipe, model_name: str) -> str:
    """What the arm trained, e.g. 'm + SFT LoRA r=16, ...' or 'm + LoRA r=16 + classifier head, ...' (a head
    is trained on its own loss, not by SFT or DPO, so the method is not named for it)."""
    t = arm.train
    length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epoch(s)"
    return f"{model_name} + {t.describe()}, {length}, lr {t.learning_rate:g}"


def contenders_of(recipe: Recipe, console: Console) -> list[LocalContender]:
    """Base, every arm that has been trained, and every ``eval.adapters`` folder."""
    base = LocalContender("base", f"{recipe.model.name}, no fine-tuning", None, recipe.data,
                          with_labels=recipe.eval.base_prompt_with_labels)
    from tunesmith.models.encoders import is_encoder

    out = [] if is_encoder(recipe.model.name) else [base]  # an encoder with no head has no answers to score
    for arm in arm_recipes(recipe):
        name = arm_name(recipe, arm)
        found = trained_output(arm.run_dir)
        if found is None:
            console.print(f"[dim]{name}: not trained yet ({arm.run_dir / 'train'}); left out[/]")
            continue
        out.append(LocalContender(name, describe_arm(arm, arm.model.name), found[0], arm.data, loads=found[1],
                                  model=arm.model.name))
    for spec in recipe.eval.adapters:
        path = Path(spec.path)
        if not path.is_dir():
            raise ModelError(f"eval.adapters '{spec.name}': folder not found: {path}")
        out.append(LocalContender(spec.name, f"{recipe.model.name} + {path.name}", path, recipe.data,
                                  loads=Artefact.of_folder(path)))
    return out


def evaluate_recipe(recipe: Recipe, console: Console | None = None) -> EvalRun:
    """``tunesmith eval``: the prepared splits of the recipe (the same ones training read) and every contender."""
    from tunesmith.data.prepare import prepare

    console = console or Console()
    if recipe.data is None:
        raise ConfigError("data: required to evaluate (the test split comes from it)")
    recipe.refuse_folds("tunesmith eval")
    check_endpoints(recipe)
    data = prepare(recipe, recipe.run_dir / "data", console)
    return evaluate(recipe, data.splits["train"], data.splits["test"], data.labels, contenders_of(recipe, console),
                    data.summary, console)


def check_endpoints(recipe: Recipe) -> list:
    """Endpoint clients (a missing API key or an unknown ``ask_as`` fails here, before any data or model work)."""
    from tunesmith.clients.endpoint import EndpointClient

    if recipe.eval.endpoints and recipe.data is not None:
        known = ask_formats(recipe)
        for i, spec in enumerate(recipe.eval.endpoints):
            if spec.ask_as != "auto" and spec.ask_as not in known:
                raise ConfigError(
                    f"eval.endpoints[{i}] ({spec.name}).ask_as: '{spec.ask_as}' is not auto, base, plain or a local "
                    f"contender of this recipe (an arm or an eval.adapters name); choose one of "
                    f"{['auto', *known]}")
    clients = [EndpointClient(spec) for spec in recipe.eval.endpoints]
    if recipe.eval.judge:
        EndpointClient(recipe.eval.judge.endpoint)
    return clients


def ask_formats(recipe: Recipe) -> dict[str, tuple[DataSection, bool]]:
    """How an endpoint may be asked: ``(data section, with the label list)`` per name. ``base`` as the base
    model, ``plain`` the recipe's prompt and system prompt without the label list, each arm as it trains
    (``finetuned`` without arms), each ``eval.adapters`` contender as the recipe prompts it. An arm's
    format is known from the recipe, trained or not (its model may be served from elsewhere)."""
    out = {"base": (recipe.data, recipe.eval.base_prompt_with_labels), "plain": (recipe.data, False)}
    for arm in arm_recipes(recipe):
        out[arm_name(recipe, arm)] = (arm.data, False)
    for spec in recipe.eval.adapters:
        out.setdefault(spec.name, (recipe.data, False))
    return out


def resolve_ask_as(recipe: Recipe, spec, client, known: dict) -> tuple[str, str]:
    """Which format an endpoint is asked in, and why. ``auto``: a model of ours is asked as trained —
    its id names a local contender (``tunesmith serve --adapter NAME=…`` with the same name), it is a
    jobs-API fine-tune (``ft:…``, our jobs API's and OpenAI's ids), or the server lists it with a
    ``parent`` model (``tunesmith serve`` and vLLM do for every adapter); any other model is asked like
    the base model."""
    if spec.ask_as != "auto":
        return spec.ask_as, "set by ask_as"
    if spec.model in known and spec.model not in ("base", "plain"):
        return spec.model, "the model id names that contender"
    if spec.model.startswith("ft:"):
        why = "a fine-tuned model id (ft:…)"
    else:
        parent = client.served_parent()
        if not parent:
            return "base", "not a fine-tune of ours (no ft: id, no parent model in the server's model list)"
        why = f"the server lists it as a fine-tune of {parent}"
    return trained_format(recipe, known), why


def trained_format(recipe: Recipe, known: dict) -> str:
    """The format the recipe's fine-tunes were trained in: ``finetuned`` (or the arm, when every arm asks
    alike); ``plain`` when arms differ in prompt or system prompt (``ask_as`` then names the arm)."""
    names = [arm_name(recipe, a) for a in arm_recipes(recipe)]
    asked = {(known[n][0].prompt, known[n][0].system_prompt) for n in names}
    return names[0] if len(asked) == 1 else "plain"


def evaluate(recipe: Recipe, train: list[Example], test: list[Example], labels: list[str],
             contenders: list[LocalContender], summary: dict, console: Console) -> EvalRun:
    """Score every contender on ``test`` and write the eval folder."""
    task, test, scored, results = score_contenders(recipe, train, test, labels, contenders, console)
    return finish_evaluation(recipe, task, results, test, {**summary, "test examples scored": scored}, console)


def score_contenders(recipe: Recipe, train: list[Example], test: list[Example], labels: list[str],
                     contenders: list[LocalContender], console: Console):
    """``(task, test examples scored, how they were chosen, results)``: every local contender, endpoint and
    baseline (fitted on ``train``) scored on ``test`` (or its ``eval.max_examples`` sample); no intervals yet."""
    from tunesmith.progress import task_bar

    bar = lambda d, t: task_bar(console, d, t)  # noqa: E731
    if not test:
        raise DataError("the test split is empty; give data.split.test a size > 0")
    if contenders and not recipe.eval.allow_random_model:
        from tunesmith.models.random_weights import refuse_random

        refuse_random(recipe.model.name, "evaluate", "eval.allow_random_model: true")
    checked_graders(recipe)  # a bad grader fails before any model runs
    task = make_task(recipe.task_kind, recipe.eval, labels, recipe.data.task_options)
    test, scored = sample_examples(test, recipe.eval.max_examples, task.stratify, recipe.seed)
    from tunesmith.eval.headline import choose

    why = choose(task, recipe.eval.metric, test)
    console.print(f"task: {task.name}; test examples scored: {scored}; headline metric: {task.headline}"
                  + (f" ({why})" if why else ""))
    endpoints = asked_endpoints(recipe, console)  # before the local models: a wrong ask_as fails at once
    from tunesmith.generation import remote

    with remote.using(spec=recipe.eval.engine, base_model=recipe.model.name, log_dir=recipe.run_dir / "eval" / "engine",
                      use="eval", device=recipe.model.device, say=console.print):
        results = [reused_or_scored(recipe, task, c, test, bar, console) for c in contenders]
    for client, ask_as, (data_cfg, with_labels) in endpoints:
        results.append(_endpoint(recipe, task, client, ask_as, data_cfg, with_labels, test, bar))
    results += _baselines(recipe, task, train, test, console)
    return task, test, scored, results


def finish_evaluation(recipe: Recipe, task: TaskKind, results: list[ContenderResult], test: list[Example],
                      summary: dict, console: Console) -> EvalRun:
    """Bootstrap intervals, the optional judge, and the eval folder (metrics, predictions, charts, report)."""
    from tunesmith.clients.endpoint import EndpointClient
    from tunesmith.eval.report import write_eval_outputs
    from tunesmith.progress import task_bar

    bar = lambda d, t: task_bar(console, d, t)  # noqa: E731
    add_intervals(results, task, recipe.eval.bootstrap, recipe.seed)
    add_grader_metrics(recipe, results, test)
    judge = _judge(recipe, EndpointClient(recipe.eval.judge.endpoint), results, test, bar) if recipe.eval.judge else None
    return write_eval_outputs(recipe, task, results, test, summary, judge)


def asked_endpoints(recipe: Recipe, console: Console) -> list[tuple]:
    """Each endpoint's client, the format it is asked in and that format's ``(data section, with labels)``."""
    from tunesmith.clients.endpoint import EndpointClient

    known = ask_formats(recipe) if recipe.eval.endpoints else {}
    out = []
    for i, spec in enumerate(recipe.eval.endpoints):
        client = EndpointClient(spec)
        ask_as, why = resolve_ask_as(recipe, spec, client, known)
        if ask_as not in known:
            raise ConfigError(f"eval.endpoints[{i}] ({spec.name}).ask_as: '{ask_as}' is not one of {['auto', *known]}")
        console.print(f"{spec.name}: asked as {ask_as} ({why})")
        out.append((client, ask_as, known[ask_as]))
    return out


def reused_or_scored(recipe: Recipe, task: TaskKind, c: LocalContender, test: list[Example], bar,
                     console: Console) -> ContenderResult:
    """One local contender's result: reused from ``eval/contenders/<name>.json`` when it was scored before with
    the same model files, test examples and settings (an interrupted or repeated run does not generate again),
    else scored now and saved there."""
    from tunesmith.scoring.result import load_result, save_result

    path = recipe.run_dir / "eval" / "contenders" / f"{c.name}.json"
    key = contender_key(recipe, task, c, test)
    cached = load_result(path, key)
    if cached is not None:
        console.print(f"{c.name}: scored before with the same model, test examples and settings; reused ({path})")
        return cached
    res = timed(lambda: evaluate_local(recipe, task, c, test, bar))
    save_result(path, key, res)
    return res


def contender_key(recipe: Recipe, task: TaskKind, c: LocalContender, test: list[Example]) -> str:
    """A digest of everything a local contender's answers depend on: its folder's files (name, size, time), how
    it is asked, the test examples, the evaluation and placement settings and the tunesmith version."""
    import hashlib

    from tunesmith import __version__

    stats = [(p, p.stat()) for p in c.path.rglob("*") if p.is_file()] if c.path is not None else []
    files = sorted((str(p.relative_to(c.path)), st.st_size, st.st_mtime_ns) for p, st in stats)
    settings = recipe.eval.model_dump(mode="json", exclude={"bootstrap", "baselines", "endpoints", "judge", "adapters"})
    doc = {"version": __version__, "contender": [c.name, c.description, str(c.path), c.model, c.loads.value,
                                                 c.with_labels, c.data.model_dump(mode="json")],
           "files": files, "model": recipe.model.model_dump(mode="json"), "eval": settings, "task": task.name,
           "labels": list(task.labels or []), "options": recipe.data.task_options,
           "test": [[e.id, e.inputs, e.target, e.meta.get("answers"), e.meta.get("messages")] for e in test]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()


def timed(evaluate_one) -> ContenderResult:
    """Run one contender's evaluation and record its wall time in its metrics (``seconds``)."""
    import time

    t0 = time.time()
    res = evaluate_one()
    res.metrics["seconds"] = round(time.time() - t0, 1)
    return res


def messages_for(task: TaskKind, data_cfg: DataSection, with_labels: bool, test: list[Example]) -> list[list[dict]]:
    from tunesmith.data.formats.messages import chat_messages

    labels = task.labels if with_labels and task.uses_labels else None
    return [e.meta["messages"] if "messages" in e.meta else chat_messages(e, data_cfg, labels) for e in test]


def evaluate_local(recipe: Recipe, task: TaskKind, c: LocalContender, test: list[Example], bar) -> ContenderResult:
    """One local contender, asked as what its folder holds is asked (see ``LOCAL_EVALUATORS``)."""
    from tunesmith.machine.placement import pick_placement

    placement = pick_placement(recipe.model.precision, recipe.model.device)
    return LOCAL_EVALUATORS[c.loads](recipe, task, c, test, placement, bar)


def _language_model(recipe, task: TaskKind, c: LocalContender, test, placement, bar) -> ContenderResult:
    """A generating model (the base, an adapter or a merged model), scored by the task kind's own way; with an
    engine (``eval.engine``), its answers are generated there (an adapter loaded there for the time)."""
    from tunesmith.data.formats.messages import prompt_text
    from tunesmith.generation import remote
    from tunesmith.models.loading import load_tokenizer

    tokenizer = load_tokenizer(c.model or recipe.model.name)
    prompts = [prompt_text(tokenizer, m) for m in messages_for(task, c.data, c.with_labels, test)]
    server = remote.active() if (c.model or recipe.model.name) == recipe.model.name else None
    with remote.served(server, c.path, lambda: load_local(recipe, c, placement)) as model:
        return _scored_model(recipe, task, c, test, bar, tokenizer, prompts, model)


def _scored_model(recipe, task: TaskKind, c: LocalContender, test, bar, tokenizer, prompts, model) -> ContenderResult:
    """The task kind's scoring of ``model`` (in this process, or generating on the engine), its latency,
    parameters and, with ``eval.perplexity``, the gold answers' loss."""
    import time

    t0 = time.perf_counter()
    res = task.evaluate_local(c.name, c.description, model, tokenizer, prompts, test, bar)
    res.metrics["latency_ms"] = round(1000 * (time.perf_counter() - t0) / max(1, len(test)), 2)  # all of its scoring
    res.metrics["parameters"] = parameter_count(model, c.model or recipe.model.name)
    if recipe.eval.perplexity and "mean_loss" not in res.metrics:  # label scoring may have measured it already
        from tunesmith.data.formats.messages import end_of_turn
        from tunesmith.scoring.perplexity import answer_losses, summarize

        suffix = end_of_turn(tokenizer)
        answers = [(e.meta.get("answers") or [e.target])[0] + suffix for e in test]
        with bar(f"eval {c.name}: answer loss", len(prompts)) as advance:
            res.metrics |= summarize(
                answer_losses(model, tokenizer, prompts, answers, max(1, recipe.eval.batch_size // 2), advance)
            )
    return res


def parameter_count(model, name: str) -> int:
    """The model's parameters; for a model generating on an engine and not loaded here, read from its files."""
    if getattr(type(model), "remote", False) and "local" not in vars(model):
        from tunesmith.machine.estimate import model_shape
        from tunesmith.models.names import resolve

        return model_shape(Path(resolve(name))).params
    return sum(p.numel() for p in model.parameters())


def _head_contender(recipe, task: TaskKind, c: LocalContender, test, placement, bar) -> ContenderResult:
    """A trained head (classifier, regression or span) answers through its HeadPredictor, as served."""
    from tunesmith.eval.heads import evaluate_head

    return evaluate_head(task, c.name, c.description, c.path, test, c.data.prompt, placement, bar,
                         c.model or recipe.model.name)


def load_local(recipe: Recipe, c: LocalContender, placement):
    """The base model, a PEFT adapter on it (merged for base-model speed), or a merged model folder."""
    from tunesmith.models.loading import load_model, load_trained

    name = c.model or recipe.model.name
    if c.path is None:
        return load_model(name, placement)
    return load_trained(name, c.path, placement)


LOCAL_EVALUATORS = {Artefact.MODEL: _language_model, Artefact.CLASSIFIER: _head_contender, Artefact.HEAD: _head_contender}


def _endpoint(recipe, task: TaskKind, client, ask_as: str, data_cfg, with_labels, test, bar) -> ContenderResult:
    spec = client.spec
    messages = messages_for(task, data_cfg, with_labels, test)
    with bar(f"eval {spec.name}: endpoint", len(messages)) as advance:
        replies = client.chat_many(messages, spec.max_tokens or recipe.eval.max_new_tokens, advance)
    prompts = [json.dumps(m, ensure_ascii=False) for m in messages]
    res = score_outputs(task, spec.name, f"{spec.model} at {spec.base_url}, asked as {ask_as}", Source.ENDPOINT, test,
                        prompts, [r.text for r in replies], [r.error for r in replies])
    res.metrics["asked_as"] = ask_as
    for row, r in zip(res.predictions, replies, strict=True):
        row["attempts"] = r.attempts
    return res


def chosen_baselines(recipe: Recipe, task: TaskKind) -> list:
    """The recipe's baselines that apply to this task kind (``auto``: all of them but random)."""
    offered = {b.name: b for b in task.baselines()}
    names = recipe.eval.baselines
    if "auto" in names:
        names = [n for n in offered if n != "random"] + [n for n in names if n != "auto"]
    return [offered[n] for n in dict.fromkeys(names) if n in offered]


def _baselines(recipe, task: TaskKind, train, test, console) -> list[ContenderResult]:
    """The LLM-free baselines that apply to this task; the others are named and skipped."""
    import importlib.util

    from tunesmith.records import render_prompt

    for name in recipe.eval.baselines:
        if name != "auto" and name not in task.baseline_names():
            console.print(f"[dim]baseline '{name}' does not apply to a {task.name} task; skipped[/]")
    chosen = chosen_baselines(recipe, task)
    if chosen and not train:
        console.print("[yellow]baselines need training examples; the train split is empty[/]")
        return []
    inputs = BaselineInputs([render_prompt(e, recipe.data.prompt) for e in train], train,
                            [render_prompt(e, recipe.data.prompt) for e in test], recipe.seed)
    out = []
    for b in chosen:
        if b.needs and importlib.util.find_spec(b.needs) is None:
            console.print(f"[yellow]baseline '{b.name}' needs the package {b.needs} (pip install 'tunesmith[semantic]'); "
                          "skipped[/]")
            continue
        outputs = [task.format_baseline(p) for p in b.predict(task, inputs)]
        out.append(score_outputs(task, b.name, b.description, Source.BASELINE, test, inputs.test_texts, outputs))
    return out


def add_intervals(results: list[ContenderResult], task: TaskKind, resamples: int, seed: int) -> None:
    """95% bootstrap intervals on each headline and on each contender's paired difference from the first."""
    if resamples <= 0 or not results:
        return
    from tunesmith.eval import headline

    h = task.headline
    ref = results[0]
    whole = headline.is_set_metric(task)  # macro-F1: computed again on each resample, not a mean over examples
    for r in results:
        r.metrics[f"{h}_ci95"] = (headline.interval(task, r, resamples, seed) if whole
                                  else mean_ci(r.per_example, resamples, seed))
        if r is not ref:
            d = (headline.paired if whole else lambda _t, *a: paired_difference(*a))(task, r, ref, resamples, seed)
            r.metrics[f"{h}_diff_vs_{ref.name}"], r.metrics[f"{h}_diff_vs_{ref.name}_ci95"] = d


def _judge(recipe, client, results, test, bar) -> dict:
    """Pairwise win rate of ``judge.pair[0]`` over ``pair[1]``, or a rubric score per generating contender."""
    from tunesmith.eval import judge
    from tunesmith.records import render_prompt

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
        if r.is_baseline:  # LLM-free baselines answer with a label, a number or fields: nothing for a rubric
            continue
        with bar(f"judge {r.name}", len(test)) as advance:
            summary, scores = judge.rubric(client, spec.rubric, questions, refs, answers(r), advance)
        r.metrics["judge_score"] = summary["mean_score"]
        for row, s in zip(r.predictions, scores, strict=True):
            row["judge_score"] = s
        out[r.name] = summary
    return out


def evaluate_conversations(recipe: Recipe, rows: list[dict], console: Console | None = None) -> EvalRun:
    """Base vs the job's fine-tuned adapter on held-out chat rows (``prompt`` messages → ``completion``).

    Fine-tuning jobs use it on their validation file: the prompts are the conversations as uploaded,
    the task is free generation with room for the longest reference answer plus a few tokens.
    """
    from tunesmith.models.loading import load_tokenizer

    console = console or Console()
    if not rows:
        raise DataError("no conversations to evaluate")
    test = [Example(f"valid-{i + 1}", {"prompt": r["prompt"][-1]["content"] if r["prompt"] else ""},
                    r["completion"][-1]["content"], {"messages": r["prompt"]}) for i, r in enumerate(rows)]
    test, scored = sample_examples(test, recipe.eval.max_examples, False, recipe.seed)
    tokenizer = load_tokenizer(recipe.model.name)
    longest = max(len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) for e in test)
    cfg = recipe.eval.model_copy(update={"max_new_tokens": min(512, longest + 8), "baselines": []})
    data_cfg = DataSection(path=Path("."), task="generation", input_fields=["prompt"], target_field="completion",
                           prompt="{prompt}", system_prompt=None)
    recipe = recipe.model_copy(update={"eval": cfg, "data": data_cfg})
    found = trained_output(recipe.run_dir)
    contenders = [LocalContender("base", f"{recipe.model.name}, no fine-tuning", None, data_cfg)]
    if found:
        contenders.append(LocalContender("finetuned", f"{recipe.model.name} + {found[0].name}", found[0], data_cfg,
                                          loads=found[1]))
    return evaluate(recipe, [], test, [], contenders, {"validation conversations": scored}, console)

