"""Reinforcement fine-tuning jobs (OpenAI's ``method: reinforcement``) through the official `openai` client:
a GRPO job on the tiny model reaches "succeeded" with rewards in its events, checkpoints and results file, and
what it cannot run is refused at creation with a 400 naming the parameter or the file's line."""

import base64
import json

import openai
import pytest

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.jobs.worker import work

from .conftest import banking_rows, running_server

LABELS = ("card_arrival", "pin_blocked", "age_limit")
GRADER = {"type": "text_similarity", "name": "intent", "input": "{{sample.output_text}}",
          "reference": "{{item.category}}", "evaluation_metric": "fuzzy_match"}


def prompts_jsonl(rows: list[dict]) -> bytes:
    """OpenAI's reinforcement rows: a developer and a user message, and the field the grader reads."""
    return "".join(json.dumps({"messages": [{"role": "developer", "content": "Name the intent."},
                                            {"role": "user", "content": r["text"]}],
                               "category": r["category"]}) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("rft-data")
    engine = Engine(str(tiny_model_dir), {}, wait_ms=5)
    settings = ServeSettings(model=str(tiny_model_dir), api_keys=frozenset({"k1"}), data_dir=data_dir)
    with running_server(create_app(settings, engine)) as url:
        yield {"url": url, "base": str(tiny_model_dir), "data_dir": data_dir,
               "client": openai.OpenAI(base_url=url, api_key="k1", max_retries=0)}


def _method(grader=GRADER, **hyper):
    return {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hyper}}


def test_reinforcement_job_succeeds_with_rewards_per_step(live):
    c = live["client"]
    rows = banking_rows(LABELS, 2)
    train = c.files.create(file=("train.jsonl", prompts_jsonl(rows[:4])), purpose="fine-tune")
    val = c.files.create(file=("val.jsonl", prompts_jsonl(rows[4:])), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=live["base"], training_file=train.id, validation_file=val.id, seed=1,
                                    method=_method(n_epochs=1, batch_size=2, compute_multiplier=0.5,
                                                   learning_rate_multiplier=5, eval_interval=2, eval_samples=2,
                                                   reasoning_effort="default"))
    assert job.method.type == "reinforcement" and job.method.reinforcement.grader.type == "text_similarity"
    assert job.method.reinforcement.hyperparameters.compute_multiplier == 0.5
    work(live["data_dir"], once=True)
    job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    events = c.fine_tuning.jobs.list_events(job.id, limit=100).data
    train_steps = [e.data for e in events if e.type == "metrics" and "train_reward_mean" in (e.data or {})]
    assert sorted(d["step"] for d in train_steps) == [1, 2]  # 4 prompts, 2 per step, one epoch
    assert all(0 <= d["train_reward_mean"] <= 1 and d["train_reward_std"] >= 0 for d in train_steps)
    assert any("train reward mean=" in e.message for e in events)
    valid = [e.data for e in events if e.type == "metrics" and "valid_reward_mean" in (e.data or {})]
    assert sorted(d["step"] for d in valid) == [2]
    checkpoints = c.fine_tuning.jobs.checkpoints.list(job.id).data
    last = checkpoints[0].metrics.model_dump()  # the newest: training and validation rewards of its step
    assert last["step"] == 2 and last["train_reward_mean"] is not None and last["valid_reward_mean"] is not None
    csv_text = base64.b64decode(c.files.content(job.result_files[0]).read()).decode()
    header, *lines = csv_text.strip().splitlines()
    assert header.split(",")[5:] == ["train_reward_mean", "train_reward_std", "valid_reward_mean", "valid_reward_std"]
    assert len(lines) == 2 and all(line.split(",")[5] for line in lines)
    assert job.fine_tuned_model in [m.id for m in c.models.list().data]
    assert job.trained_tokens > 0


@pytest.mark.parametrize(("method", "param", "says"), [
    (_method(reasoning_effort="high"), "method.reinforcement.hyperparameters.reasoning_effort", "no reasoning mode"),
    (_method(compute_multiplier=100), "method.reinforcement.hyperparameters.compute_multiplier", "2 to 64"),
    (_method(eval_interval=5), "method.reinforcement.hyperparameters.eval_interval", "no validation_file"),
    (_method(n_epochs=0), "method.reinforcement.hyperparameters.n_epochs", "at least 1"),
    (_method(beta=0.1), "method.reinforcement.hyperparameters.beta", "Extra inputs"),
    (_method({**GRADER, "evaluation_metric": "bleurt"}), "method.reinforcement.grader.evaluation_metric", ""),
    (_method({"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"}),
     "method.reinforcement.grader.type", "--allow-python-graders"),
    ({"type": "reinforcement"}, "method", "method.reinforcement"),
])
def test_what_a_reinforcement_job_cannot_run_is_a_400(live, method, param, says):
    c = live["client"]
    train = c.files.create(file=("t.jsonl", prompts_jsonl(banking_rows(LABELS, 1))), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as exc:
        c.fine_tuning.jobs.create(model=live["base"], training_file=train.id, method=method)
    assert exc.value.body["param"] == param and says in exc.value.body["message"], exc.value.body


def test_rows_without_the_graders_field_and_mismatched_files_are_refused(live):
    c = live["client"]
    rows = banking_rows(LABELS, 1)
    text = prompts_jsonl(rows).decode().splitlines()
    text[1] = json.dumps({"messages": json.loads(text[1])["messages"]})  # line 2 lacks "category"
    train = c.files.create(file=("t.jsonl", "\n".join(text).encode()), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as exc:
        c.fine_tuning.jobs.create(model=live["base"], training_file=train.id, method=_method())
    assert exc.value.body["param"] == "training_file"
    assert "line 2: no field 'category'" in exc.value.body["message"] and "{{item.category}}" in exc.value.body["message"]
    # a supervised job on prompts without answers is refused, naming what each method reads
    with pytest.raises(openai.BadRequestError) as exc:
        c.fine_tuning.jobs.create(model=live["base"], training_file=train.id)
    assert "holds prompts" in exc.value.body["message"] and "supervised job needs chat examples" in exc.value.body["message"]
    # a prompt file whose later row ends with an answer is no reinforcement file: the upload names the line
    bad = text[:1] + [json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})]
    with pytest.raises(openai.BadRequestError) as exc:
        c.files.create(file=("b.jsonl", "\n".join(bad).encode()), purpose="fine-tune")
    assert "final_message_is_assistant: 1 (lines 2)" in exc.value.body["message"]
