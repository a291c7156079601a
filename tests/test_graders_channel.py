"""A python grader cannot forge or flood the answers its sandbox gives the server.

The grader's code writes its own lines on every descriptor it has (and, through libc, tries the relay's
descriptors under /proc): each such row gets reward 0 with the error, the rows after it are graded in a
fresh process, and the server's memory stays bounded. The server's own reader is checked too, against a
sandbox process that misbehaves entirely (a stand-in for the relay, at the seam), and the whole path
through the official client: graders.run, an eval run and a reinforcement job.
"""

from __future__ import annotations

import json
import textwrap

import openai
import pytest

from tunesmith.graders import Limits, check, grade_batch, sandbox
from tunesmith.graders.run import Context
from tunesmith.graders.sandbox import landlock_abi, run_python

ATTACKS = textwrap.dedent('''
    import ctypes, gc, json, os

    def everywhere(data):
        for fd in range(64):
            try:
                os.write(fd, data)
            except OSError:
                pass

    def grade(sample, item):
        kind = item["attack"]
        if kind == "not_json":
            everywhere(b"this is not json\\n")
        elif kind == "string":
            everywhere(b'{"reward": "pwned"}\\n')
        elif kind == "huge_number":
            everywhere(b'{"reward": 1e999}\\n')
        elif kind == "nan":
            everywhere(b'{"reward": NaN}\\n')
        elif kind == "flood":  # 100 MB without a line end on every descriptor but stderr
            chunk = b"x" * (1 << 20)
            for fd in range(3, 64):
                try:
                    for _ in range(100):
                        os.write(fd, chunk)
                except OSError:
                    pass
        elif kind == "imitate":  # the server's own format, with every token this process can find
            tokens = [o["token"] for o in gc.get_objects() if isinstance(o, dict) and "token" in o]
            for token in tokens + ["0" * 32]:
                everywhere(json.dumps({"token": token, "reward": 1.0, "seconds": 0.0}).encode() + b"\\n")
        elif kind == "relay_fds":  # the relay's descriptors through /proc, below the audit hook
            libc = ctypes.CDLL(None)
            line = json.dumps({"token": "0" * 32, "reward": 1.0}).encode() + b"\\n"
            opened = 0
            for fd in range(64):
                f = libc.open(f"/proc/{os.getppid()}/fd/{fd}".encode(), 1)
                if f >= 0:
                    opened += 1
                    libc.write(f, line, len(line))
            return 1.0 if opened else 0.5
        elif kind == "ptrace":  # attach to the relay (allowed between processes of one Landlock layer)
            return 1.0 if ctypes.CDLL(None).ptrace(16, os.getppid(), 0, 0) == 0 else 0.5
        elif kind == "out_of_range":
            return 3.0
        return 0.25
''')
FORGED = ("not_json", "string", "huge_number", "nan", "flood", "imitate")


def _grade(kinds: list[str]):
    return run_python(ATTACKS, [({"output_text": "x"}, {"attack": k}) for k in kinds], Limits(wall_s=20))


@pytest.mark.parametrize("kind", FORGED)
def test_a_forged_line_is_the_rows_error_and_the_next_row_is_graded(kind):
    forged, honest = _grade([kind, "honest"])
    assert forged.reward == 0.0 and forged.error, forged
    assert (honest.reward, honest.error) == (0.25, None)


@pytest.mark.skipif(landlock_abi() < 1, reason="this kernel offers no Landlock: the relay is then guarded by the "
                    "namespaces and the audit hook only (docs/serve.md says so)")
def test_the_relay_is_out_of_reach():
    fds, ptrace = _grade(["relay_fds", "ptrace"])
    assert (fds.reward, fds.error) == (0.5, None)  # not one /proc/<relay>/fd/N opened
    assert (ptrace.reward, ptrace.error) == (0.5, None)  # the nested Landlock layer refuses to trace the relay


def test_a_reward_outside_0_1_is_an_error():
    [row] = _grade(["out_of_range"])
    assert row.reward == 0.0 and "[0, 1]" in row.error


# --- the server's reader against a sandbox process that misbehaves entirely ---------------------------------

HOSTILE = {
    "flood": "out.write(b'x' * (100 * 1024 * 1024))",
    "not_json": "out.write(b'<html>oops</html>\\n')",
    "string": "out.write(json.dumps({'token': row['token'], 'reward': 'pwned'}).encode() + b'\\n')",
    "huge_number": "out.write(b'{\"token\": \"' + row['token'].encode() + b'\", \"reward\": 1e999}\\n')",
    "nan": "out.write(b'{\"token\": \"' + row['token'].encode() + b'\", \"reward\": NaN}\\n')",
    "wrong_token": "out.write(json.dumps({'token': 'f' * 32, 'reward': 1.0}).encode() + b'\\n')",
    "above_one": "out.write(json.dumps({'token': row['token'], 'reward': 7.0}).encode() + b'\\n')",
    "not_a_dict": "out.write(b'[1, 2, 3]\\n')",
}


def _hostile_child(tmp_path, behaviour: str):
    script = tmp_path / "hostile.py"
    script.write_text(textwrap.dedent(f'''
        import json, sys
        out = sys.stdout.buffer
        out.write(b'{{"ready": true}}\\n'); out.flush()
        row = json.loads(sys.stdin.readline())
        {HOSTILE[behaviour]}
        out.flush()
    '''))
    return script


def _peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident size


def _peak_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("behaviour", sorted(HOSTILE))
def test_the_server_reads_the_sandbox_as_data(tmp_path, monkeypatch, behaviour):
    monkeypatch.setattr(sandbox, "CHILD", _hostile_child(tmp_path, behaviour))
    monkeypatch.setattr(sandbox, "NAMESPACED", False)
    _peak_reset()
    before = _peak_mb()
    [row] = run_python("def grade(s, i):\n    return 1.0\n", [({"output_text": "x"}, {})], Limits(wall_s=20))
    assert row.reward == 0.0 and row.error, row
    assert _peak_mb() - before < 50, "the server buffered what the sandbox wrote"


# --- through the official client ----------------------------------------------------------------------------

def _python_grader():
    return check({"type": "python", "name": "attacks", "source": ATTACKS})


def test_graders_run_answers_200_and_the_connection_goes_on(graders_live):
    c = openai.OpenAI(base_url=graders_live["url"], api_key="k1", max_retries=0)
    grader = {"type": "python", "name": "attacks", "source": ATTACKS}
    for kind in FORGED:
        run = c.fine_tuning.alpha.graders.run(grader=grader, model_sample="x", item={"attack": kind})
        assert run.reward == 0.0 and run.metadata.errors.python_grader_runtime_error, kind
        assert run.metadata.errors.python_grader_runtime_error_details
        honest = c.fine_tuning.alpha.graders.run(grader=grader, model_sample="x", item={"attack": "honest"})
        assert honest.reward == 0.25 and not honest.metadata.errors.python_grader_runtime_error
    assert c.fine_tuning.alpha.graders.validate(grader=grader).grader.type == "python"


def test_an_eval_run_records_the_forged_rows_as_errors(graders_live):
    from .conftest import finished_eval_run

    c = openai.OpenAI(base_url=graders_live["url"], api_key="k1", max_retries=0)
    schema = {"type": "object", "properties": {"attack": {"type": "string"}}, "required": ["attack"]}
    ev = c.evals.create(data_source_config={"type": "custom", "item_schema": schema},
                        testing_criteria=[{"type": "python", "name": "attacks", "source": ATTACKS,
                                           "pass_threshold": 0.2}])
    kinds = [*FORGED, "honest"]
    content = [{"item": {"attack": k}, "sample": {"output_text": "x"}} for k in kinds]
    run = c.evals.runs.create(ev.id, data_source={"type": "jsonl",
                                                  "source": {"type": "file_content", "content": content}})
    run = finished_eval_run(c, ev.id, run.id)
    assert run.status == "completed"
    assert run.result_counts.total == len(kinds) and run.result_counts.passed == 1
    items = c.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100).data
    scores = {i.datasource_item["attack"]: i.results[0].score for i in items}
    assert scores == {**dict.fromkeys(FORGED, 0.0), "honest": 0.25}


def test_grade_batch_marks_forged_rows_with_the_runtime_error_flag():
    rows = grade_batch(_python_grader(), ["x"] * 3, [{"attack": "string"}, {"attack": "honest"},
                                                     {"attack": "nan"}], Context())
    assert [r.reward for r in rows] == [0.0, 0.25, 0.0]
    assert rows[0].metadata["errors"]["python_grader_runtime_error"] and not rows[1].errored
    json.dumps([r.metadata for r in rows], allow_nan=False)  # what the API returns is valid JSON


def test_a_reinforcement_job_trains_on_rewards_a_grader_cannot_forge(graders_live):
    from tunesmith.serve.jobs.worker import work

    from .conftest import banking_rows

    c = openai.OpenAI(base_url=graders_live["url"], api_key="k1", max_retries=0)
    forging = {"type": "python", "name": "forger", "source": ATTACKS.replace(
        'kind = item["attack"]', 'kind = "string"')}  # every row: a string reward on the channel, then 0.25
    rows = banking_rows(("card_arrival", "pin_blocked"), 2)
    lines = "".join(json.dumps({"messages": [{"role": "user", "content": r["text"]}], "category": r["category"]})
                    + "\n" for r in rows).encode()
    train = c.files.create(file=("train.jsonl", lines), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=graders_live["base"], training_file=train.id, seed=1, method={
        "type": "reinforcement", "reinforcement": {"grader": forging, "hyperparameters": {
            "n_epochs": 1, "batch_size": 2, "compute_multiplier": 0.5}}})
    work(graders_live["data_dir"], once=True)
    job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    events = c.fine_tuning.jobs.list_events(job.id, limit=100).data
    means = [e.data["train_reward_mean"] for e in events if e.type == "metrics" and "train_reward_mean" in (e.data or {})]
    assert means and all(m == 0.0 for m in means)


@pytest.fixture(scope="module")
def graders_live(tiny_model_dir, tmp_path_factory):
    from tunesmith.serve.app import ServeSettings, create_app
    from tunesmith.serve.engines.builtin import Engine

    from .conftest import running_server

    engine = Engine(str(tiny_model_dir), {}, wait_ms=5)
    settings = ServeSettings(model=str(tiny_model_dir), api_keys=frozenset({"k1"}),
                             data_dir=tmp_path_factory.mktemp("channel-data"), allow_python_graders=True)
    with running_server(create_app(settings, engine)) as url:
        yield {"url": url, "settings": settings, "data_dir": settings.data_dir, "base": str(tiny_model_dir)}
