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
