"""``tunesmith evals save`` / ``load``: an account's evals (definitions, runs, graded output items, data files)
kept in a folder and recreated under another key of a live server, through the official client; a second load
creates nothing twice; what cannot be recreated is listed with its reason."""

from __future__ import annotations

import json

import openai
import pytest

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine

from .conftest import finished_eval_run, running_server

EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
         "operation": "eq"}
OVERLAP = {"type": "text_similarity", "name": "overlap", "input": "{{sample.output_text}}",
           "reference": "{{item.answer}}", "evaluation_metric": "rouge_1", "pass_threshold": 0.5}
SCHEMA = {"type": "object", "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
          "required": ["question", "answer"]}
ROWS = [({"question": "France?", "answer": "Paris"}, "Paris"), ({"question": "Korea?", "answer": "Seoul city"}, "Seoul"),
        ({"question": "Japan?", "answer": "Tokyo"}, "Kyoto")]


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    settings = ServeSettings(model=str(tiny_model_dir), api_keys=frozenset({"old", "new"}),
                             data_dir=tmp_path_factory.mktemp("evals-transfer"))
    with running_server(create_app(settings, Engine(str(tiny_model_dir), {}, wait_ms=5))) as url:
        yield url


def _client(url, key):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0)


def _graded_eval(c):
    """An eval with two criteria and one finished run over an uploaded file of items and answers."""
    ev = c.evals.create(name="capitals", data_source_config={"type": "custom", "item_schema": SCHEMA,
                                                             "include_sample_schema": True},
                        testing_criteria=[EXACT, OVERLAP], metadata={"team": "geo"})
    lines = "".join(json.dumps({"item": i, "sample": {"output_text": o}}) + "\n" for i, o in ROWS)
    f = c.files.create(file=("answers.jsonl", lines.encode()), purpose="evals")
    run = c.evals.runs.create(ev.id, name="given answers",
                              data_source={"type": "jsonl", "source": {"type": "file_id", "id": f.id}})
    return ev, f, finished_eval_run(c, ev.id, run.id, timeout=60)


def test_saved_evals_load_under_another_key_and_grade_the_same(live, tmp_path, cli, monkeypatch):
    old, new = _client(live, "old"), _client(live, "new")
    ev, f, run = _graded_eval(old)
    assert run.result_counts.passed == 1 and run.result_counts.failed == 2

    monkeypatch.setenv("OLD_KEY", "old")
    code, out = cli(["evals", "save", str(tmp_path / "kept"), "--base-url", live, "--api-key-env", "OLD_KEY"])
    assert code == 0, out
    assert "saved 1 evals, 1 runs, 3 output items, 1 files, 0 skipped" in out
    kept = tmp_path / "kept"
    saved = json.loads((kept / "evals.jsonl").read_text().splitlines()[0])
    assert saved["id"] == ev.id and saved["testing_criteria"][1]["pass_threshold"] == 0.5
    items = [json.loads(line) for line in (kept / "output_items" / f"{run.id}.jsonl").read_text().splitlines()]
    assert [i["status"] for i in items] == ["pass", "fail", "fail"]  # the results outlive the source
    assert (kept / "files" / f"{f.id}.jsonl").read_text().count("\n") == 3

    monkeypatch.setenv("NEW_KEY", "new")
    code, out = cli(["evals", "load", str(kept), "--base-url", live, "--api-key-env", "NEW_KEY"])
    assert code == 0, out
    assert "loaded 1 evals, 1 files, 0 already, 0 skipped" in out
    mapping = json.loads((kept / "loaded.json").read_text())
    copy = new.evals.retrieve(mapping[ev.id])
    assert copy.name == "capitals" and copy.metadata == {"team": "geo", "source_eval_id": ev.id}
    assert copy.data_source_config.schema_ == old.evals.retrieve(ev.id).data_source_config.schema_
    assert [c.name for c in copy.testing_criteria] == ["exact", "overlap"]
    again = new.evals.runs.create(copy.id, data_source={"type": "jsonl",
                                                        "source": {"type": "file_id", "id": mapping[f.id]}})
    again = finished_eval_run(new, copy.id, again.id, timeout=60)
    assert again.result_counts.model_dump() == run.result_counts.model_dump()
    per = lambda r: sorted((p.testing_criteria, p.passed, p.failed) for p in r.per_testing_criteria_results)  # noqa: E731
    assert per(again) == per(run)

    code, out = cli(["evals", "load", str(kept), "--base-url", live, "--api-key-env", "NEW_KEY"])
    assert code == 0 and "loaded 0 evals, 0 files, 1 already, 0 skipped" in out, out
    assert [e.id for e in new.evals.list().data] == [copy.id]  # nothing created twice


def test_what_cannot_be_recreated_is_listed_with_its_reason(live, tmp_path):
    from tunesmith.clients.evals_transfer import load_evals

    folder = tmp_path / "kept"
    folder.mkdir()
    logs = {"id": "eval_logs", "name": "from logs", "data_source_config": {"type": "logs", "schema": {}},
            "testing_criteria": [EXACT]}
    (folder / "evals.jsonl").write_text(json.dumps(logs) + "\n")
    counts = load_evals(_client(live, "new"), folder)
    assert counts == {"evals": 0, "files": 0, "already": 0, "skipped": 1}
    skipped = json.loads((folder / "skipped.jsonl").read_text())
    assert skipped["id"] == "eval_logs" and "'logs' cannot be recreated" in skipped["why"]


def test_an_empty_folder_is_a_clear_error(cli, tmp_path):
    code, out = cli(["evals", "load", str(tmp_path), "--base-url", "http://127.0.0.1:9/v1"])
    assert code == 3 and "no saved evals here" in out and "tunesmith evals save" in out
