"""``tunesmith distill --recipe`` writes the teacher as an ``eval.endpoints`` entry. The teacher's name comes from the
server, and a fine-tune's name carries its job's ``suffix`` (``ft:<base>:<suffix>:<job>``), which any key chooses:
whatever it holds must end as the value of ``model``, never as a key of the entry (a second ``base_url`` would
send the ``api_key_env`` key elsewhere when the recipe runs)."""

from __future__ import annotations

import json

import pytest
import yaml

from tunesmith.cli.distill import recipe_with_teacher
from tunesmith.config import load_recipe

SERVER = "http://127.0.0.1:8000/v1"
HOSTILE = [
    "gpt-4o', base_url: 'http://evil.example/v1",  # closes a single-quoted value, adds a key on the same line
    "ft:smollm2-135m-instruct:\nbase_url: http://evil.example/v1:ftjob-1",  # a job suffix with a line break
    "x'\n    base_url: http://evil.example/v1\n    api_key_env: HF_TOKEN",  # a quote, then keys on new lines
    "{base_url: http://evil.example/v1} &a *a !!python/object/apply:os.system ['id'] # -",  # YAML markup
]


def distilled(folder):
    """A distilled fine-tuning file as ``tunesmith distill`` writes it: user → assistant conversations."""
    rows = [{"messages": [{"role": "user", "content": f"How do I unblock my card ({i})?"},
                          {"role": "assistant", "content": f"Open Cards, choose the card, then Unblock ({i})."}]}
            for i in range(24)]
    path = folder / "distilled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("teacher", HOSTILE)
def test_a_teacher_name_carrying_yaml_stays_the_model_value(tmp_path, teacher):
    recipe = recipe_with_teacher(distilled(tmp_path), teacher, SERVER, "TEACHER_KEY")
    [endpoint] = yaml.safe_load(recipe.read_text(encoding="utf-8"))["eval"]["endpoints"]
    assert endpoint == {"name": "teacher", "base_url": SERVER, "model": teacher, "api_key_env": "TEACHER_KEY",
                        "ask_as": "plain"}
    [loaded] = load_recipe(recipe).eval.endpoints
    assert (loaded.base_url, loaded.model, loaded.api_key_env) == (SERVER, teacher, "TEACHER_KEY")
    assert "evil" not in loaded.base_url


def test_a_teacher_without_a_key_variable_is_written_as_null(tmp_path):
    recipe = recipe_with_teacher(distilled(tmp_path), "smollm2-135m-instruct", SERVER, None)
    [loaded] = load_recipe(recipe).eval.endpoints
    assert (loaded.model, loaded.api_key_env, loaded.ask_as) == ("smollm2-135m-instruct", None, "plain")
    assert "# endpoints: the model whose stored answers" in recipe.read_text(encoding="utf-8")


def test_a_jobs_suffix_carrying_yaml_reaches_the_recipe_only_as_the_teachers_name(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    """The path a key controls end to end: a job whose ``suffix`` holds a line break and ``base_url: …`` trains,
    its fine-tune (a model id with dots, which the built-in engine serves) answers with ``store: true``, and
    ``tunesmith distill --recipe`` on those answers writes a recipe whose only base_url is the server's."""
    import openai
    from typer.testing import CliRunner

    from tunesmith.cli import app
    from tunesmith.serve.jobs.worker import work

    from .conftest import tiny_server
    from .test_serve_jobs import chat_jsonl

    suffix = "x\nbase_url: http://evil.example/v1"
    data_dir = tmp_path / "data"
    with tiny_server(tiny_model_dir, data_dir, api_keys=frozenset({"k1"})) as url:
        c = openai.OpenAI(base_url=url, api_key="k1", max_retries=0)
        f = c.files.create(file=("t.jsonl", chat_jsonl(8)), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, seed=1, suffix=suffix,
                                        method={"type": "supervised", "supervised": {"hyperparameters": {
                                            "n_epochs": 1, "batch_size": 4}}})
        work(data_dir, once=True)
        model = c.fine_tuning.jobs.retrieve(job.id).fine_tuned_model
        assert model and suffix in model
        kept = 0
        for i in range(40):  # tunesmith init needs 10 rows to train, validate and test
            # a stop string ends the random model's answer, so that distill keeps it (answers cut by max_tokens,
            # and empty ones, cut at a stop string at their start, are left out)
            answer = c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Where is card {i}?"}], max_tokens=64,
                stop=["e", "a", "o", "i"], store=True, metadata={"task": "suffix"}).choices[0]
            kept += answer.finish_reason == "stop" and bool(answer.message.content)
            if kept == 10:
                break
        monkeypatch.setenv("K1", "k1")
        monkeypatch.chdir(tmp_path)
        out = tmp_path / "distilled.jsonl"
        result = CliRunner().invoke(app, ["distill", str(out), "--base-url", url, "--api-key-env", "K1",
                                          "--metadata", "task=suffix", "--recipe"])
    assert result.exit_code == 0, result.output
    [endpoint] = yaml.safe_load(out.with_suffix(".yaml").read_text(encoding="utf-8"))["eval"]["endpoints"]
    assert endpoint == {"name": "teacher", "base_url": url, "model": model, "api_key_env": "K1", "ask_as": "plain"}
    assert load_recipe(out.with_suffix(".yaml")).eval.endpoints[0].base_url == url
