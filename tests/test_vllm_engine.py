"""`tunesmith serve --engine vllm`: tunesmith's API in front of a real vLLM server (vLLM's CPU build, `make vllm`)
on the embedded SmolLM2-135M-Instruct. Each test skips with what to run when vLLM or the model is absent.

The same requests go to the built-in engine for comparison: greedy answers must agree character for character,
with the base model and with an adapter a job trained."""

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from tunesmith.data.formats.chat_rows import last_turn_pair
from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.engines.interface import GenParams
from tunesmith.serve.errors import APIError
from tunesmith.serve.jobs.worker import evaluate_job, work
from tunesmith.serve.store import Store

from .conftest import EMBEDDED, REPO, banking_rows, running_server, vllm_engine, vllm_or_skip

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
QUESTIONS = [r["text"] for r in banking_rows(("card_arrival", "pin_blocked", "age_limit"), 3)]
SYSTEM = "Classify the customer message. Answer with one label: card_arrival, pin_blocked, age_limit."


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """tunesmith on vLLM (keys k1, k2) and tunesmith on the built-in engine, over the same model."""
    vllm_or_skip()
    data_dir = tmp_path_factory.mktemp("vllm-serve")
    with vllm_engine(data_dir / "vllm") as engine:
        settings = ServeSettings(model=EMBEDDED, api_keys=frozenset({"k1", "k2"}), data_dir=data_dir, engine="vllm")
        builtin = Engine(EMBEDDED, {}, wait_ms=5)
        builtin_settings = ServeSettings(model=EMBEDDED, data_dir=tmp_path_factory.mktemp("builtin-serve"))
        with running_server(create_app(settings, engine)) as url, \
                running_server(create_app(builtin_settings, builtin)) as builtin_url:
            yield {"url": url, "engine": engine, "data_dir": data_dir, "builtin_url": builtin_url, "builtin": builtin}


def client(url: str, key: str = "k1") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)


def greedy(url: str, model: str, questions: list[str], key: str = "k1") -> list[str]:
    c = client(url, key)
    return [c.chat.completions.create(model=model, temperature=0, max_tokens=40, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]).choices[0].message.content
            for q in questions]


def vllm_models(engine) -> set[str]:
    """The model ids vLLM itself serves (asked directly on its socket, with tunesmith's private key)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=engine.server.socket_path), timeout=30) as c:
        r = c.get("http://vllm/v1/models", headers=engine.server.headers)
    return {m["id"] for m in r.json()["data"]}


def test_greedy_answers_match_the_builtin_engine(served):
    assert greedy(served["url"], EMBEDDED, QUESTIONS) == greedy(served["builtin_url"], EMBEDDED, QUESTIONS, key="any")


def test_stream_n_seed_stop_and_logprobs_pass_through(served):
    c = client(served["url"])
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = c.chat.completions.create(model=EMBEDDED, messages=messages, temperature=0, max_tokens=30)
    chunks = list(c.chat.completions.create(model=EMBEDDED, messages=messages, temperature=0, max_tokens=30,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    def sampled():
        reply = c.chat.completions.create(model=EMBEDDED, messages=messages, temperature=1.0, max_tokens=20, n=3,
                                          seed=7)
        return [ch.message.content for ch in reply.choices]

    first = sampled()
    assert len(first) == 3 and first == sampled()  # seeded: the same draws again
    assert len(set(first)) > 1  # each choice its own seed
    text = whole.choices[0].message.content
    cut = text.split()[1]
    stopped = c.chat.completions.create(model=EMBEDDED, messages=messages, temperature=0, max_tokens=30, stop=[cut])
    assert stopped.choices[0].message.content == text[: text.index(cut)]
    raw = c.chat.completions.with_raw_response.create(model=EMBEDDED, messages=messages, temperature=0, max_tokens=8,
                                                      logprobs=True, top_logprobs=2)
    reply = ChatCompletion.model_validate_json(raw.text)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-4 for t in content)


def test_scoring_requests_answer_as_on_the_builtin_engine(served):
    """Token-id prompts, echo with logprobs (the prompt's entries, the first None), max_tokens 0, and an answer ended
    by its end of sequence (listed last): the same tokens and logprobs as the built-in engine, within 1e-4."""
    from transformers import AutoTokenizer

    from tunesmith.models import registry

    tok = AutoTokenizer.from_pretrained(registry.cached_path(EMBEDDED))
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Message: my card has not arrived\nIntent: card",
                                                                    chat + "The capital of France is Paris.")]
    kinds = [{"prompt": ids, "echo": True, "logprobs": 2, "max_tokens": 1},
             {"prompt": ids[0], "echo": True, "logprobs": 1, "max_tokens": 0},
             {"prompt": ids[0], "echo": True, "logprobs": 0, "max_tokens": 3}]
    for kw in kinds:
        ours, theirs = (client(url, key).completions.create(model=EMBEDDED, temperature=0, **kw)
                        for url, key in ((served["url"], "k1"), (served["builtin_url"], "any")))
        for a, b in zip(ours.choices, theirs.choices, strict=True):
            assert a.text == b.text and a.finish_reason == b.finish_reason and a.logprobs.tokens == b.logprobs.tokens
            assert a.logprobs.token_logprobs[0] is None is b.logprobs.token_logprobs[0]
            assert a.logprobs.top_logprobs[0] is None is b.logprobs.top_logprobs[0]
            assert a.logprobs.token_logprobs[1:] == pytest.approx(b.logprobs.token_logprobs[1:], rel=1e-4, abs=1e-5)
        if kw["max_tokens"] == 0:
            assert ours.usage.completion_tokens == 0 and len(ours.choices[0].logprobs.tokens) == len(ids[0])
    ended = client(served["url"]).completions.create(model=EMBEDDED, prompt=ids[1], echo=True, logprobs=1, max_tokens=1,
                                                     temperature=0).choices[0]
    assert ended.finish_reason == "stop" and ended.logprobs.tokens[-1] == tok.eos_token
    assert len(ended.logprobs.tokens) == len(ids[1]) + 1


def test_vllm_errors_become_openai_errors(served):
    engine = served["engine"]

    async def ask(model: str):
        return await engine.submit(model, engine.text_prompt_ids("Hello"), [GenParams(4)]).results()

    with pytest.raises(APIError) as err:  # a model id vLLM does not know (the routes never send one)
        asyncio.run(ask("no-such-adapter"))
    assert err.value.status == 404 and "no-such-adapter" in err.value.body["message"]
    assert err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):  # through the API, the ownership check answers first
        client(served["url"]).chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "x"}])


def test_a_jobs_fine_tune_is_evaluated_on_vllm_and_served_by_it_to_its_owner_only(served, monkeypatch):
    """Told to (``--jobs-engine vllm``), the job's post-training evaluation generates on the server's vLLM (its
    adapter loaded there): the same scores as the built-in engine's on the same adapter and conversations."""
    from tunesmith.eval.runner import evaluate_conversations
    from tunesmith.serve.jobs import worker

    c = client(served["url"])
    data = REPO / "examples" / "data" / "banking_chat_12.jsonl"
    upload = c.files.create(file=open(data, "rb"), purpose="fine-tune")
    lines = data.read_bytes().splitlines(keepends=True)
    valid = c.files.create(file=("valid.jsonl", b"".join(lines[:6])), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=EMBEDDED, training_file=upload.id, validation_file=valid.id, suffix="vllm",
                                    method={"type": "supervised",
                                            "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4}}})
    asked = []
    monkeypatch.setattr(worker, "evaluate_job", lambda store, job_id, recipe, rows: asked.append((recipe, rows)) or
                        evaluate_job(store, job_id, recipe, rows))
    log = served["engine"].server.log_path
    before = log.read_text().count("Loaded new LoRA adapter: name 'tunesmith-")
    work(served["data_dir"], once=True, vllm_endpoint=served["engine"].server.endpoint_file, jobs_engine="vllm")
    job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    report = [e for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data if "Evaluation report" in e.message]
    assert report, [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert log.read_text().count("Loaded new LoRA adapter: name 'tunesmith-") > before  # the evaluation's, on vLLM
    recipe, rows = asked[0]
    builtin = evaluate_conversations(recipe, [last_turn_pair(r) for r in rows])  # no engine here: this process
    here = {r.name: {k: r.metrics.get(k) for k in ("chrf", "rouge_l", "exact")} for r in builtin.results}
    on_vllm = {n: {k: m.get(k) for k in ("chrf", "rouge_l", "exact")} for n, m in report[0].data["metrics"].items()}
    assert on_vllm == here and set(here) == {"base", "finetuned"}
    name, engine = job.fine_tuned_model, served["engine"]
    succeeded = time.monotonic()
    while name not in vllm_models(engine):  # loaded by the server's watcher, before anyone asks for it
        assert time.monotonic() - succeeded < 60, "the fine-tune did not reach vLLM within a minute"
        time.sleep(1)
    run_dir = Store(served["data_dir"]).job_by_model(name)["run_dir"]
    served["builtin"].add_adapter(name, Path(run_dir) / "train" / "adapter")
    assert greedy(served["url"], name, QUESTIONS) == greedy(served["builtin_url"], name, QUESTIONS, key="any")
    with pytest.raises(openai.NotFoundError):
        client(served["url"], "k2").chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
    assert name not in [m.id for m in client(served["url"], "k2").models.list()]
    c.models.delete(name)
    assert name not in vllm_models(engine)


def test_a_forced_tool_call_decodes_under_vllms_structured_outputs(served):
    import json

    tools = [{"type": "function", "function": {"name": "report_card", "parameters": {
        "type": "object", "properties": {"reason": {"type": "string", "enum": ["lost", "stolen"]}},
        "required": ["reason"]}}}]
    reply = client(served["url"]).chat.completions.create(
        model=EMBEDDED, tools=tools, tool_choice={"type": "function", "function": {"name": "report_card"}},
        messages=[{"role": "user", "content": "someone stole my card"}], temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "report_card"
    assert json.loads(call.function.arguments)["reason"] in ("lost", "stolen")


def vllm_routes(log_path: Path) -> list[tuple[str, list[str]]]:
    """The routes the running vLLM serves, as its own start-up log lists them (the installed version's app)."""
    text = log_path.read_text(errors="replace")
    text = text[text.rindex("--- tunesmith starts vLLM"):]
    return [(path, [m.strip() for m in methods.split(",")])
            for path, methods in re.findall(r"Route: (\S+), Methods: ([A-Z, ]+)", text)]


def tcp_listeners(pids: list[int]) -> list[str]:
    """The TCP sockets in LISTEN state, in this host's network, that belong to any of ``pids``."""
    inodes = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir() if fd_dir.exists() else ():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    rows = [line.split() for name in ("tcp", "tcp6") for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]]
    return [row[1] for row in rows if row[3] == "0A" and row[9] in inodes]


def test_nothing_reaches_vllm_without_its_key_and_no_key_is_on_a_command_line(served):
    """A new user's attack from another process: every route vLLM serves, without the key and with a wrong one,
    is refused; another user cannot even connect; no process shows the key; nothing listens on the host's TCP."""
    from tunesmith.serve.engines.vllm.server import own_network_prefix

    server = served["engine"].server
    routes = vllm_routes(server.log_path)
    paths = {p for p, _ in routes}
    assert len(routes) >= 20 and {"/invocations", "/tokenize", "/metrics", "/v1/load_lora_adapter"} <= paths
    attack = subprocess.run([sys.executable, str(REPO / "tests" / "vllm_attack.py")], capture_output=True, text=True,
                            input=json.dumps({"socket": server.socket_path, "routes": routes}), timeout=300, check=True)
    found = json.loads(attack.stdout)
    assert found["statuses"] and {k: v for k, v in found["statuses"].items() if v != [401, 401]} == {}
    assert os.stat(server.endpoint.folder).st_mode & 0o777 == 0o700
    if os.geteuid() == 0:  # root can try as another user; any other user is that other user already
        assert found["other_user"].startswith("refused"), found["other_user"]
    key, pids = server.endpoint.key, server.processes()
    assert len(pids) >= 2 and key in Path(f"/proc/{server.proc.pid}/environ").read_bytes().decode(errors="replace")
    for pid in pids:
        assert key not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert key not in subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    if own_network_prefix():
        assert tcp_listeners(pids) == []  # the engine's internal listeners live in vLLM's own network namespace
    assert vllm_models(served["engine"]) >= {EMBEDDED}  # and tunesmith itself still gets in


def test_a_recipes_evaluation_on_vllm_scores_as_on_builtin(served, tmp_path):
    """``eval.engine`` on vLLM: the demo's kind of evaluation (BANKING77 intents, label scoring, an adapter
    contender) gives the same predictions and scores as on the built-in engine."""
    from tunesmith.config import validate_recipe
    from tunesmith.eval.runner import evaluate_recipe
    from tunesmith.generation import remote

    from .conftest import write_jsonl
    from .test_vllm_faults import random_adapters

    adapter = random_adapters(tmp_path / "adapters", names=["lora"])["lora"]
    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(("card_arrival", "pin_blocked", "age_limit"), 8))

    def run(out: str, engine=None):
        recipe = validate_recipe({
            "name": "ev", "output_dir": str(tmp_path / out), "seed": 3, "model": {"name": EMBEDDED},
            "data": {"path": str(data), "input_fields": ["text"], "target_field": "category", "system_prompt": SYSTEM,
                     "split": {"train": 12, "val": 0, "test": 12}},
            "eval": {"max_new_tokens": 12, "bootstrap": 0, "baselines": [], "perplexity": False,
                     "adapters": [{"name": "lora", "path": str(adapter)}]}})
        with remote.using(engine):
            evaluate_recipe(recipe)
        folder = tmp_path / out / "ev" / "eval"
        metrics = json.loads((folder / "metrics.json").read_text())
        drop = ("seconds", "latency_ms")
        return ({m: {k: v for k, v in d.items() if k not in drop} for m, d in metrics.items()},
                (folder / "predictions.jsonl").read_text())

    assert run("on-vllm", served["engine"].server.completions()) == run("builtin")


# --- a generation as token ids (submit(token_ids=True)), top_k and stop_token_ids -----------------------------------

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def generations(engine, prompt: list[int], params: list[GenParams], **kw) -> list:
    """The Generations of one request on ``engine`` (vLLM or built-in), submitted from an event loop of its own."""
    async def run():
        return await engine.submit(engine.base_name, prompt, params, **kw).results()

    return asyncio.run(run())


def ids_of(engine, prompt: list[int], params: GenParams, **kw):
    return generations(engine, prompt, [params], token_ids=True, **kw)[0]


def same_answer(a, b) -> bool:
    """Two Generations alike but for their ids: text, counts, finish and every OpenAI entry's token and alternatives
    (two requests' logprobs within 1e-4: vLLM's prefix cache may compute a prompt's end apart)."""
    def shape(g):
        entries = [*(g.logprobs or []), *([g.end] if g.end else []), *(g.prompt_logprobs or [])]
        return (g.text, g.prompt_tokens, g.completion_tokens, g.finish_reason,
                [(e["token"], [t["token"] for t in e["top_logprobs"] or []]) for e in entries])

    def floats(g):
        entries = [*(g.logprobs or []), *([g.end] if g.end else []), *(g.prompt_logprobs or [])]
        return [v if v is not None else 0.0 for e in entries
                for v in (e["logprob"], *(t["logprob"] for t in e["top_logprobs"] or []))]

    return shape(a) == shape(b) and floats(a) == pytest.approx(floats(b), rel=1e-4, abs=1e-5)


def test_token_ids_decode_to_the_text_and_their_logprobs_are_the_openai_entries(served):
    """A greedy answer's ids: its tokens (the end of sequence last) decode to its text, one logprob each (the entries'
    floats, the end's last), the built-in engine's tokens and logprobs; the OpenAI side as without ids."""
    engine, builtin = served["engine"], served["builtin"]
    prompt = engine.chat_prompt_ids(CAPITAL)
    gen = ids_of(engine, prompt, GenParams(30), logprobs=0)
    tokens, logprobs = gen.ids.tokens, gen.ids.logprobs
    assert gen.finish_reason == "stop" and tokens[-1] == engine.tokenizer.eos_token_id and gen.ids.prompt is None
    assert engine.tokenizer.decode(tokens, skip_special_tokens=True) == gen.text
    assert len(logprobs) == len(tokens) == gen.completion_tokens
    assert logprobs == [e["logprob"] for e in gen.logprobs] + [gen.end["logprob"]]
    plain = generations(engine, prompt, [GenParams(30)], logprobs=0)[0]
    assert plain.ids is None and same_answer(gen, plain)
    theirs = ids_of(builtin, prompt, GenParams(30), logprobs=0).ids
    assert tokens == theirs.tokens and logprobs == pytest.approx(theirs.logprobs, rel=1e-4, abs=1e-5)
    assert ids_of(engine, prompt, GenParams(30)).ids.logprobs is None  # logprobs not asked


def test_a_stop_token_id_ends_the_row_there_and_is_its_last_id(served):
    """``stop_token_ids`` naming a token of the greedy answer: the row ends on it (``stop``), its text before it, the
    token last in its ids and kept apart from the OpenAI entries (``end``), as on the built-in engine."""
    engine, builtin = served["engine"], served["builtin"]
    prompt = engine.chat_prompt_ids(CAPITAL)
    greedy_ids = ids_of(engine, prompt, GenParams(30)).ids.tokens
    at = next(j for j in range(len(greedy_ids) // 2, len(greedy_ids)) if greedy_ids[j] not in greedy_ids[:j])
    params = GenParams(30, stop_token_ids=(greedy_ids[at], 12345))
    gen = ids_of(engine, prompt, params, logprobs=0)
    assert gen.finish_reason == "stop" and gen.ids.tokens == greedy_ids[:at + 1]
    assert gen.text == engine.tokenizer.decode(greedy_ids[:at], skip_special_tokens=True)
    assert len(gen.logprobs) == at and gen.end["logprob"] == gen.ids.logprobs[-1]
    theirs = ids_of(builtin, prompt, params, logprobs=0)
    assert (theirs.text, theirs.finish_reason, theirs.ids.tokens) == (gen.text, "stop", gen.ids.tokens)
    listed = ids_of(engine, prompt, GenParams(30, stop_token_ids=(engine.tokenizer.eos_token_id,)))
    assert listed.ids.tokens == greedy_ids  # the end of sequence listed: it ends the row as by default


def test_no_stop_token_ids_and_the_greedy_answer_runs_past_its_end_of_sequence(served):
    """``stop_token_ids=()``: no token ends the row, the end of sequence is one more token (left out of the text) and
    the answer goes on to ``max_tokens``, as on the built-in engine."""
    engine, builtin = served["engine"], served["builtin"]
    prompt = engine.chat_prompt_ids(CAPITAL)
    greedy_ids = ids_of(engine, prompt, GenParams(30)).ids.tokens
    params = GenParams(len(greedy_ids) + 6, stop_token_ids=())
    gen = ids_of(engine, prompt, params, logprobs=0)
    assert gen.finish_reason == "length" and len(gen.ids.tokens) == len(gen.ids.logprobs) == params.max_tokens
    assert gen.ids.tokens[:len(greedy_ids)] == greedy_ids and gen.end is None
    assert gen.text == engine.tokenizer.decode(gen.ids.tokens, skip_special_tokens=True)
    theirs = ids_of(builtin, prompt, params, logprobs=0)
    assert (theirs.text, theirs.finish_reason, theirs.ids.tokens) == (gen.text, "length", gen.ids.tokens)


def test_top_k_1_sampling_is_greedy(served):
    engine = served["engine"]
    prompt = engine.chat_prompt_ids([{"role": "user", "content": "Name three colours."}])
    greedy_ids = ids_of(engine, prompt, GenParams(24)).ids.tokens
    sampled = generations(engine, prompt, [GenParams(24, temperature=1.5, top_k=1, seed=s) for s in (1, 2, None)],
                          token_ids=True)
    assert [g.ids.tokens for g in sampled] == [greedy_ids] * 3
    wide = generations(engine, prompt, [GenParams(24, temperature=1.5, seed=s) for s in (1, 2)], token_ids=True)
    assert any(g.ids.tokens != greedy_ids for g in wide)  # the same draws without top_k are not greedy


def test_prompt_logprobs_as_ids(served):
    """A scored prompt's ids: one entry per token after the first, its logprob the OpenAI entry's, its ``k`` top
    alternatives as ids (most probable first), as the built-in engine scores it; the OpenAI entries as without ids."""
    engine, builtin = served["engine"], served["builtin"]
    prompt = engine.text_prompt_ids("Message: my card has not arrived\nIntent: card_arrival")
    gen = ids_of(engine, prompt, GenParams(2), logprobs=0, prompt_logprobs=2)
    entries = gen.ids.prompt
    assert [e.token for e in entries] == prompt[1:] and gen.ids.logprobs is not None
    assert [e.logprob for e in entries] == [e["logprob"] for e in gen.prompt_logprobs[1:]]
    assert all(len(e.top) == 2 and e.top[0][1] >= e.top[1][1] and e.top[0][1] >= e.logprob - 1e-6 for e in entries)
    assert all(any(t == e.token for t, _ in e.top) for e in entries if e.logprob >= e.top[1][1])
    plain = generations(engine, prompt, [GenParams(2)], logprobs=0, prompt_logprobs=2)[0]
    assert plain.ids is None and same_answer(gen, plain)  # the entries' tokens named as text, as without ids
    theirs = ids_of(builtin, prompt, GenParams(2), logprobs=0, prompt_logprobs=2).ids.prompt
    assert [e.token for e in theirs] == prompt[1:]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in theirs], rel=1e-4, abs=1e-5)
    assert [[t for t, _ in e.top] for e in entries] == [[t for t, _ in e.top] for e in theirs]
    alone = ids_of(engine, prompt, GenParams(0), prompt_logprobs=0)
    assert alone.ids.tokens == [] and alone.ids.logprobs is None
    assert [(e.token, e.top) for e in alone.ids.prompt] == [(t, ()) for t in prompt[1:]]


def test_a_row_without_stop_tokens_paused_past_its_end_of_sequence_goes_on_as_unpaused(served):
    """A row whose continuation starts after an end of sequence that ended nothing (``stop_token_ids=()``): paused
    by recompute and resumed, its ids and logprobs are those of the row unpaused."""
    engine = served["engine"]
    prompt = engine.chat_prompt_ids(CAPITAL)
    greedy_ids = ids_of(engine, prompt, GenParams(30)).ids.tokens
    params = GenParams(len(greedy_ids) + 40, stop_token_ids=())
    unpaused = ids_of(engine, prompt, params, logprobs=0)

    async def paused():
        request = engine.submit(engine.base_name, prompt, [params], logprobs=0, token_ids=True, tenant="pausing")
        row = next(r for r in list(engine.rows) if r.request is request)
        assert row.pausable
        pauses = engine.pauses
        async with asyncio.timeout(120):
            while len(row.generated) <= len(greedy_ids) + 2:  # past the end of sequence
                await asyncio.sleep(0.002)
            engine._pause(row)
            gen = (await request.results())[0]
        return gen, engine.pauses - pauses

    gen, pauses = asyncio.run(paused())
    assert pauses == 1 and gen.finish_reason == "length"
    assert gen.ids.tokens == unpaused.ids.tokens and gen.text == unpaused.text
    assert gen.ids.logprobs == pytest.approx(unpaused.ids.logprobs, rel=1e-4, abs=1e-5)


def test_the_body_carries_top_k_and_stop_token_ids_to_every_continuation():
    """What vLLM is sent (no vLLM needed): nothing new for the defaults; ``top_k`` and the stop tokens (with
    ``ignore_eos``) kept by a paused row's continuation, which may pause."""
    from tunesmith.serve.engines.vllm.sharing import Row, may_pause
    from tunesmith.serve.engines.vllm.wire import IdsAsked, completion_body

    plain = completion_body("m", [1, 2], GenParams(8), None, None)
    assert not {"top_k", "stop_token_ids", "ignore_eos", "return_tokens_as_token_ids"} & set(plain)
    assert "return_tokens_as_token_ids" not in completion_body("m", [1, 2], GenParams(8), None, 0, None,
                                                               IdsAsked(True, None))
    assert completion_body("m", [1, 2], GenParams(8), None, 0, 2, IdsAsked(True, 2))["return_tokens_as_token_ids"]
    for params, fields in ((GenParams(8, temperature=0.7, top_k=5), {"top_k": 5}),
                           (GenParams(8, stop_token_ids=()), {"stop_token_ids": [], "ignore_eos": True}),
                           (GenParams(8, stop_token_ids=(7, 9)), {"stop_token_ids": [7, 9], "ignore_eos": True})):
        assert may_pause(params, constrained=False)
        row = Row(request=None, index=0, body=completion_body("m", [1, 2], params, None, None), model_id="m",
                  params=params, pausable=True, generated=[5, 6])
        body = row.continuation()
        assert body["prompt"] == [1, 2, 5, 6] and body["max_tokens"] == 6 and fields.items() <= body.items()
