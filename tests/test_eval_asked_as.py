"""Endpoint contenders asked as they were trained: a served fine-tune of ours gets its training prompt,
any local contender or ``plain`` may be named, and no ``ask_as`` crashes the evaluation."""

import json

import pytest

from .chat_server import serve
from .conftest import banking_recipe, banking_rows, running_server, write_jsonl, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")
LABEL_LIST = "Answer with exactly one of these labels"
FAST_TRAIN = {"max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 2, "max_seq_length": 96}
# a few steps at a high rate: an adapter whose greedy answers differ from row to row (a converged tiny model
# answers one label for every row, which would make "the same answers" an empty check)
DEMO_TRAIN = {"max_steps": 8, "batch_size": 8, "learning_rate": 0.05, "logging_steps": 10, "max_seq_length": 96}


def _recipe(tmp_path, model_dir, data, eval_, arms=(), train=FAST_TRAIN):
    doc = banking_recipe(tmp_path, model_dir, data, name="ev", seed=3, split={"train": 24, "val": 0, "test": 9},
                         data={"system_prompt": "Classify."}, train=train,
                         eval={"max_new_tokens": 6, "batch_size": 4, "bootstrap": 0, "baselines": [],
                               "perplexity": False, "label_scoring": False, **eval_})
    return write_recipe(tmp_path / "r.yaml", {**doc, "arms": list(arms)})


def _rows(ev):
    return [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_served_adapter_is_asked_as_trained_and_answers_as_it_does_locally(cli, tmp_path, tiny_model_dir):
    """The adapter trained here, scored locally (``finetuned``) and through ``tunesmith serve --adapter demo=…``
    with the default ``ask_as: auto``: the server lists ``demo`` with a parent model, so it is asked in the
    training format and gives the same free-generation answers on the same held-out rows."""
    from tunesmith.serve.app import ServeSettings, create_app
    from tunesmith.serve.engines.builtin import Engine

    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 11))
    code, out = cli(["train", str(_recipe(tmp_path, tiny_model_dir, data, {}, train=DEMO_TRAIN))])
    assert code == 0, out
    adapter = tmp_path / "runs" / "ev" / "train" / "adapter"
    engine = Engine(str(tiny_model_dir), {"demo": adapter}, max_batch=8, wait_ms=30)
    settings = ServeSettings(model=str(tiny_model_dir), data_dir=tmp_path / "serve")
    with running_server(create_app(settings, engine)) as url:
        ep = {"base_url": url, "model": "demo", "api_key_env": None, "max_retries": 0}
        recipe = _recipe(tmp_path, tiny_model_dir, data, {
            "endpoints": [{"name": "served", **ep}, {"name": "served_as_base", "ask_as": "base", **ep}]}, train=DEMO_TRAIN)
        code, out = cli(["eval", str(recipe)])
    assert code == 0, out
    assert f"served: asked as finetuned (the server lists it as a fine-tune of {tiny_model_dir})" in out
    ev = tmp_path / "runs" / "ev" / "eval"
    metrics = json.loads((ev / "metrics.json").read_text())
    assert list(metrics) == ["base", "finetuned", "served", "served_as_base"]
    assert metrics["served"]["asked_as"] == "finetuned" and metrics["served_as_base"]["asked_as"] == "base"
    rows = _rows(ev)
    by = {m: {r["id"]: r for r in rows if r["model"] == m} for m in metrics}
    assert len(by["served"]) == 9 and all("error" not in r for r in by["served"].values())
    assert {i: r["output"] for i, r in by["served"].items()} == {i: r["output"] for i, r in by["finetuned"].items()}
    assert not any(LABEL_LIST in r["prompt"] for r in by["served"].values())
    assert all(LABEL_LIST in r["prompt"] for r in by["served_as_base"].values())
    local = [r["output"] for r in by["finetuned"].values()]
    assert len(set(local)) > 1 and local != [r["output"] for r in by["base"].values()]  # answers depend on the row
    assert [r["output"] for r in by["served_as_base"].values()] != local  # asked like the base model: other answers


def test_ask_as_names_any_contender_or_plain_and_never_crashes(cli, tmp_path, tiny_model_dir):
    """Without a trained arm ``ask_as: finetuned`` asks in the recipe's training format (known from the recipe);
    an ``eval.adapters`` name and ``plain`` are accepted; ``ft:`` ids are asked as trained; other models like
    the base; an unknown name is a configuration error naming the field."""
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 11))
    with serve(lambda content, n: (200, "card_arrival", 0)) as url:
        def ep(name, **kw):
            return {"name": name, "base_url": url, "model": "m", "api_key_env": None, **kw}

        endpoints = [ep("as_ft", ask_as="finetuned"), ep("as_adapter", ask_as="merged"), ep("as_plain", ask_as="plain"),
                     ep("ft_id", model="ft:tiny:demo:abc"), ep("other")]
        recipe = _recipe(tmp_path, tiny_model_dir, data, {
            "endpoints": endpoints, "adapters": [{"name": "merged", "path": str(tiny_model_dir)}]})
        code, out = cli(["eval", str(recipe)])
    assert code == 0, out
    ev = tmp_path / "runs" / "ev" / "eval"
    metrics = json.loads((ev / "metrics.json").read_text())
    assert "finetuned" not in metrics  # not trained: left out as a local contender, still a format to ask in
    asked = {n: metrics[n]["asked_as"] for n in ("as_ft", "as_adapter", "as_plain", "ft_id", "other")}
    assert asked == {"as_ft": "finetuned", "as_adapter": "merged", "as_plain": "plain", "ft_id": "finetuned",
                     "other": "base"}
    prompts = {}
    for r in _rows(ev):
        prompts.setdefault(r["model"], []).append(r["prompt"])
    assert all(LABEL_LIST in p for p in prompts["other"])
    for name in ("as_ft", "as_adapter", "as_plain", "ft_id"):
        assert prompts[name] == prompts["as_ft"] and not any(LABEL_LIST in p for p in prompts[name])
    assert '"content": "Classify."' in prompts["as_ft"][0]

    recipe = _recipe(tmp_path, tiny_model_dir, data, {"endpoints": [ep("api", ask_as="finetunde")]})
    code, out = cli(["eval", str(recipe)])
    assert code == 2 and "eval.endpoints[0] (api).ask_as: 'finetunde' is not auto, base, plain" in out
    assert "'finetuned'" in out


def test_arms_with_different_prompts_are_asked_by_name(cli, tmp_path, tiny_model_dir):
    """With arms that prompt differently, ``ask_as: ARM`` asks in that arm's format; ``auto`` on a fine-tune
    id falls back to the recipe's own prompt without the label list and says so."""
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 11))
    arms = [{"name": "short", "data": {"system_prompt": "Be brief."}}, {"name": "plainer"}]
    with serve(lambda content, n: (200, "card_arrival", 0)) as url:
        def ep(name, **kw):
            return {"name": name, "base_url": url, "model": "ft:x:y:z", "api_key_env": None, **kw}

        recipe = _recipe(tmp_path, tiny_model_dir, data, {"endpoints": [ep("a", ask_as="short"), ep("b")]}, arms=arms)
        code, out = cli(["eval", str(recipe)])
    assert code == 0, out
    ev = tmp_path / "runs" / "ev" / "eval"
    metrics = json.loads((ev / "metrics.json").read_text())
    assert (metrics["a"]["asked_as"], metrics["b"]["asked_as"]) == ("short", "plain")
    rows = _rows(ev)
    assert all('"content": "Be brief."' in r["prompt"] for r in rows if r["model"] == "a")
    assert all('"content": "Classify."' in r["prompt"] and LABEL_LIST not in r["prompt"] for r in rows if r["model"] == "b")
