"""``/v1/fine_tuning/alpha/graders`` and ``/v1/evals`` through the official `openai` client against a live server."""

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
           "reference": "{{item.answer}}", "evaluation_metric": "rouge_1"}


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    engine = Engine(str(tiny_model_dir), {}, wait_ms=5)
    settings = ServeSettings(model=str(tiny_model_dir), api_keys=frozenset({"k1", "k2"}),
                             data_dir=tmp_path_factory.mktemp("graders-data"))
    app = create_app(settings, engine)
    with running_server(app) as url:
        yield {"url": url, "base": str(tiny_model_dir), "settings": settings}


def client(live, key="k1"):
    return openai.OpenAI(base_url=live["url"], api_key=key, max_retries=0)


def test_validate_and_run_a_string_check(live):
    graders = client(live).fine_tuning.alpha.graders
    assert graders.validate(grader=EXACT).grader.operation == "eq"
    run = graders.run(grader=EXACT, model_sample="Paris", item={"answer": "Paris"})
    assert run.reward == 1.0 and run.metadata.name == "exact" and run.metadata.type == "string_check"
    assert not any(v for k, v in run.metadata.errors.model_dump().items() if not k.endswith(("details", "type")))
    assert graders.run(grader=EXACT, model_sample="Lyon", item={"answer": "Paris"}).reward == 0.0
    missing = graders.run(grader=EXACT, model_sample="Paris", item={})
    assert missing.reward == 0.0 and missing.metadata.errors.invalid_variable_error


def test_run_a_multi_grader_reports_sub_rewards(live):
    multi = {"type": "multi", "name": "mix", "calculate_output": "0.5 * exact + 0.5 * overlap",
             "graders": {"exact": EXACT, "overlap": OVERLAP}}
    run = client(live).fine_tuning.alpha.graders.run(grader=multi, model_sample="the cat sat",
                                                      item={"answer": "the cat ran"})
    assert run.sub_rewards == {"exact": 0.0, "overlap": pytest.approx(2 / 3)}
    assert run.reward == pytest.approx(1 / 3)


@pytest.mark.parametrize(("grader", "param"), [
    ({**EXACT, "operation": "startswith"}, "grader.operation"),
    ({**EXACT, "type": "regex_check"}, "grader.type"),
    ({**EXACT, "input": "{{output_text}}"}, "grader.input"),
    ({**OVERLAP, "evaluation_metric": "bertscore"}, "grader.evaluation_metric"),
    ({"type": "multi", "name": "m", "calculate_output": "exact +", "graders": {"exact": EXACT}},
     "grader.calculate_output"),
    ({"type": "score_model", "name": "s", "model": "gpt-9", "input": [{"role": "user", "content": "hi"}]},
     "grader.model"),
])
def test_bad_graders_are_400_naming_the_field(live, grader, param):
    with pytest.raises(openai.BadRequestError) as err:
        client(live).fine_tuning.alpha.graders.validate(grader=grader)
    assert err.value.body["param"] == param


def test_python_graders_are_off_with_api_keys_until_allowed(live):
    python = {"type": "python", "name": "len",
              "source": "def grade(sample, item):\n    return len(sample['output_text']) / 10\n"}
    graders = client(live).fine_tuning.alpha.graders
    with pytest.raises(openai.BadRequestError) as err:
        graders.run(grader=python, model_sample="abcde")
    assert "--allow-python-graders" in err.value.body["message"]
    live["settings"].allow_python_graders = True
    try:
        assert graders.run(grader=python, model_sample="abcde").reward == 0.5
        broken = {**python, "source": "def grade(sample, item):\n    return 1 / 0\n"}
        run = graders.run(grader=broken, model_sample="x")
        assert run.reward == 0.0 and run.metadata.errors.python_grader_runtime_error
        assert run.metadata.errors.python_grader_runtime_error_details.startswith("ZeroDivisionError")
    finally:
        live["settings"].allow_python_graders = None


def test_an_eval_with_a_python_criterion_runs_only_while_allowed(live):
    c = client(live)
    python = {"type": "python", "name": "has_answer", "pass_threshold": 1.0,
              "source": "def grade(sample, item):\n    return float(item['answer'] in sample['output_text'])\n"}
    content = [{"item": {"question": "q", "answer": "Paris"}, "sample": {"output_text": "It is Paris."}},
               {"item": {"question": "q", "answer": "Rome"}, "sample": {"output_text": "It is Paris."}}]
    source = {"type": "jsonl", "source": {"type": "file_content", "content": content}}
    live["settings"].allow_python_graders = True
    try:
        ev = c.evals.create(data_source_config={"type": "custom", "item_schema": SCHEMA}, testing_criteria=[python])
        run = finished_eval_run(c, ev.id, c.evals.runs.create(ev.id, data_source=source).id)
        assert run.result_counts.passed == 1 and run.result_counts.failed == 1
    finally:
        live["settings"].allow_python_graders = None
    with pytest.raises(openai.BadRequestError) as err:
        c.evals.runs.create(ev.id, data_source=source)
    assert "--allow-python-graders" in err.value.body["message"]


def test_score_model_asks_a_served_model(live):
    grader = {"type": "score_model", "name": "judge", "model": live["base"],
              "input": [{"role": "user", "content": "Rate: {{sample.output_text}}"}],
              "sampling_params": {"max_completions_tokens": 3}}
    run = client(live).fine_tuning.alpha.graders.run(grader=grader, model_sample="a fine answer")
    assert run.metadata.token_usage > 0 and run.metadata.sampled_model_name == live["base"]
    assert run.model_grader_token_usage_per_model[live["base"]]["completion_tokens"] >= 1
    # random weights rarely answer a number in [0, 1]; either way the reply was read, never an HTTP error
    assert run.reward == 0.0 or not run.metadata.errors.model_grader_parse_error


SCHEMA = {"type": "object", "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
          "required": ["question", "answer"]}


def test_an_eval_created_and_run_through_the_client(live):
    c = client(live)
    ev = c.evals.create(name="capitals", data_source_config={"type": "custom", "item_schema": SCHEMA},
                        testing_criteria=[EXACT, {**OVERLAP, "pass_threshold": 0.5}], metadata={"team": "geo"})
    assert ev.object == "eval" and ev.data_source_config.type == "custom"
    assert ev.data_source_config.schema_["properties"]["item"] == SCHEMA
    rows = [({"question": "France?", "answer": "Paris"}, "Paris"),  # both pass
            ({"question": "Korea?", "answer": "Seoul city"}, "Seoul"),  # exact fails, rouge_1 2/3 passes
            ({"question": "Japan?", "answer": "Tokyo"}, "Kyoto")]  # both fail
    content = [{"item": item, "sample": {"output_text": out}} for item, out in rows]
    run = c.evals.runs.create(ev.id, name="given answers",
                              data_source={"type": "jsonl", "source": {"type": "file_content", "content": content}})
    run = finished_eval_run(c, ev.id, run.id)
    assert run.status == "completed"
    assert run.result_counts.model_dump() == {"total": 3, "passed": 1, "failed": 2, "errored": 0}
    per = {r.testing_criteria: (r.passed, r.failed) for r in run.per_testing_criteria_results}
    assert per == {"exact": (1, 2), "overlap": (2, 1)}
    items = c.evals.runs.output_items.list(run.id, eval_id=ev.id).data
    assert [i.status for i in items] == ["pass", "fail", "fail"]
    assert [(r.name, r.passed) for r in items[1].results] == [("exact", False), ("overlap", True)]
    assert items[1].results[1].score == pytest.approx(2 / 3)
    one = c.evals.runs.output_items.retrieve(items[0].id, eval_id=ev.id, run_id=run.id)
    assert one.datasource_item == rows[0][0]
    assert c.evals.update(ev.id, name="capitals v2").name == "capitals v2"
    assert ev.id in [e.id for e in c.evals.list().data]
    assert [r.id for r in c.evals.runs.list(ev.id).data] == [run.id]
    with pytest.raises(openai.NotFoundError):
        client(live, "k2").evals.retrieve(ev.id)
    with pytest.raises(openai.NotFoundError):
        client(live, "k2").evals.runs.retrieve(run.id, eval_id=ev.id)
    assert c.evals.runs.delete(run.id, eval_id=ev.id).deleted
    assert c.evals.delete(ev.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.evals.retrieve(ev.id)


def test_evals_list_in_the_order_a_script_asks_for(live):
    c = client(live, "k2")
    config = {"type": "custom", "item_schema": SCHEMA}
    first = c.evals.create(name="first", data_source_config=config, testing_criteria=[EXACT])
    second = c.evals.create(name="second", data_source_config=config, testing_criteria=[EXACT])
    c.evals.update(first.id, metadata={"touched": "yes"})
    newest_update = c.evals.list(order_by="updated_at", order="desc").data
    assert [e.id for e in newest_update][:2] == [first.id, second.id]
    newest_created = c.evals.list(order_by="created_at", order="desc").data
    assert [e.id for e in newest_created][:2] == [second.id, first.id]
    assert [e.id for e in c.evals.list(order_by="updated_at", order="asc").data][-2:] == [second.id, first.id]
    with pytest.raises(openai.BadRequestError):
        c.evals.list(extra_query={"order_by": "name"})


def test_a_run_from_a_file_answered_by_a_served_model(live):
    c = client(live)
    ev = c.evals.create(name="served", data_source_config={"type": "custom", "item_schema": SCHEMA},
                        testing_criteria=[{**EXACT, "operation": "ne", "reference": "{{item.answer}} (never)"}])
    lines = "".join(json.dumps({"item": {"question": q, "answer": "x"}}) + "\n" for q in ("one?", "two?"))
    f = c.files.create(file=("items.jsonl", lines.encode()), purpose="evals")
    run = c.evals.runs.create(ev.id, data_source={
        "type": "completions", "model": live["base"], "source": {"type": "file_id", "id": f.id},
        "input_messages": {"type": "template", "template": [{"role": "user", "content": "Q: {{item.question}}"}]},
        "sampling_params": {"max_completion_tokens": 4}})
    run = finished_eval_run(c, ev.id, run.id)
    assert run.status == "completed" and run.result_counts.passed == 2
    assert run.per_model_usage[0].invocation_count == 2
    items = c.evals.runs.output_items.list(run.id, eval_id=ev.id).data
    assert items[0].sample.input[0].content == "Q: one?" and items[0].sample.output[0].role == "assistant"


def test_bad_evals_and_runs_are_400(live):
    c = client(live)
    config = {"type": "custom", "item_schema": SCHEMA}
    with pytest.raises(openai.BadRequestError) as err:
        c.evals.create(data_source_config=config, testing_criteria=[{**EXACT, "reference": "{{item.nope}}"}])
    assert err.value.body["param"] == "testing_criteria.0" and "item_schema" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        c.evals.create(data_source_config=config, testing_criteria=[{**EXACT, "operation": "contains"}])
    assert err.value.body["param"] == "testing_criteria.0.operation"
    with pytest.raises(openai.BadRequestError) as err:
        c.evals.create(data_source_config=config, testing_criteria=[OVERLAP])
    assert err.value.body["param"] == "testing_criteria.0.pass_threshold"
    ev = c.evals.create(data_source_config=config, testing_criteria=[EXACT])
    with pytest.raises(openai.BadRequestError) as err:
        c.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": [
            {"item": {"question": "q", "answer": "a"}}, {"item": {"question": "q"}}]}})
    assert "content.1" in err.value.body["message"] and "answer" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        c.files.create(file=("items.jsonl", b'{"question": "q"}\n'), purpose="evals")
    assert "line 1" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        c.evals.runs.create(ev.id, data_source={"type": "responses", "source": {"type": "responses"}})
    assert err.value.body["param"] == "data_source.type"
    for source, param in [({"type": "jsonl", "source": "file-1"}, "data_source.source.type"),
                          ({"type": "jsonl", "source": {"type": "file_content", "content": "x"}},
                           "data_source.source.content"),
                          ({"type": "completions", "model": live["base"], "input_messages": "hi",
                            "source": {"type": "file_content", "content": []}}, "data_source.input_messages")]:
        with pytest.raises(openai.BadRequestError) as err:
            c.evals.runs.create(ev.id, data_source=source)
        assert err.value.body["param"] == param


def test_answers_validate_against_the_clients_types(live):
    """The client builds its objects without validating; here every answer is validated against its type."""
    from openai.types import EvalCreateResponse
    from openai.types.evals import RunRetrieveResponse
    from openai.types.evals.runs import OutputItemListResponse
    from openai.types.fine_tuning.alpha import GraderRunResponse, GraderValidateResponse

    c = client(live)
    raw = c.fine_tuning.alpha.graders.with_raw_response.run(grader=EXACT, model_sample="a", item={"answer": "a"})
    GraderRunResponse.model_validate(json.loads(raw.text))
    GraderValidateResponse.model_validate(json.loads(c.fine_tuning.alpha.graders.with_raw_response.validate(
        grader=EXACT).text))
    raw = c.evals.with_raw_response.create(data_source_config={"type": "custom", "item_schema": SCHEMA},
                                           testing_criteria=[EXACT, {**OVERLAP, "pass_threshold": 0.5}])
    ev = EvalCreateResponse.model_validate(json.loads(raw.text))
    run = c.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": [
        {"item": {"question": "q", "answer": "a"}, "sample": {"output_text": "a"}}]}})
    finished_eval_run(c, ev.id, run.id)
    RunRetrieveResponse.model_validate(json.loads(c.evals.runs.with_raw_response.retrieve(run.id, eval_id=ev.id).text))
    page = json.loads(c.evals.runs.output_items.with_raw_response.list(run.id, eval_id=ev.id).text)
    OutputItemListResponse.model_validate(page["data"][0])


def test_runs_a_stopped_server_left_run_again_from_their_rows_on_restart(tmp_path):
    from tunesmith.serve.evals import resume
    from tunesmith.serve.evals.store import EvalStore
    from tunesmith.serve.store import Store

    store = Store(tmp_path)
    evals = EvalStore(store)
    ev = evals.add_eval("k1", name="e", data_source_config={}, testing_criteria=[], metadata=None)
    kept, lost = (evals.add_run("k1", ev["id"], "the-stopped-server", name=f"r{i}", model="m", data_source={},
                                metadata=None)[0] for i in range(2))
    resume.keep_rows(tmp_path, kept["id"], [{"item": {"q": "a"}, "sample": None}])
    for run in (kept, lost):
        evals.update_run(run["id"], status="in_progress")
    evals.add_output_items(kept["id"], ev["id"], [{"item_index": 0, "status": "pass", "datasource_item": {},
                                                    "results": [], "sample": {}}])  # written before the stop
    store.claims.close()  # the server stops: its claims are no longer renewed
    claimed = dict((r["id"], c) for r, c in resume.claim_abandoned(store, "restarted", everyone=True))
    assert sorted(claimed) == sorted([kept["id"], lost["id"]])  # alone on its SQLite store: every run is its own
    _, rows = resume.prepared(store, evals.get_run(ev["id"], kept["id"]), claimed[kept["id"]])
    assert rows == [{"item": {"q": "a"}, "sample": None}] and evals.output_items(kept["id"]) == ([], False)
    assert evals.get_run(ev["id"], kept["id"])["status"] == "queued"
    assert resume.prepared(store, evals.get_run(ev["id"], lost["id"]), claimed[lost["id"]]) is None  # rows not kept
    failed = evals.get_run(ev["id"], lost["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_restarted"

