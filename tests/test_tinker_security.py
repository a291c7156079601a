"""The Tinker API (``/api/v1``) attacked as a hostile key would, from other processes: a real `tunesmith serve` with
keys A and B, key A training through the ``tinker`` SDK, key B naming A's session, runs, paths, checkpoints, futures
and samplers, through the SDK and with raw HTTP. Nothing of A's changes (its weights' bytes, its greedy answer, its
next training client), nothing is written outside the data folder, and every such call is a 4xx or the SDK's
not-found error. Then every route fed wrong types and hostile values: never a 500."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import httpx
import pytest

from .test_serve_hostile import served

A, B = "tml-key-a", "tml-key-b"


def post(root: str, route: str, body, key: str = B, **kw) -> httpx.Response:
    return httpx.post(f"{root}/api/v1/{route}", json=body, headers={"X-API-Key": key}, timeout=60, **kw)


def files_under(folder: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file below ``folder`` (those under ``skip`` left out) by its path, with its bytes' digest."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        if skip is not None and Path(dirpath).is_relative_to(skip):
            continue
        for name in names:
            path = Path(dirpath) / name
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "?"
    return out


def outside(around: Path, data: Path) -> dict[str, str]:
    """The files around the data folder, the server's own log left out (it grows as the server answers)."""
    return {p: d for p, d in files_under(around, skip=data).items() if not Path(p).name.startswith("serve-")}


def greedy(service, path: str, prompt: list[int]) -> list[int]:
    from tinker import types

    client = service.create_sampling_client(model_path=path)
    answer = client.sample(types.ModelInput.from_ints(prompt), 1,
                           types.SamplingParams(max_tokens=6, temperature=0.0)).result()
    return list(answer.sequences[0].tokens)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """`tunesmith serve` with keys A and B; yields (its root URL, its data folder, the folder around it)."""
    around = tmp_path_factory.mktemp("tinker-attack")
    data = around / "data"
    data.mkdir()
    with served(tiny_model_dir, data) as (url, _):
        yield url[:-3], data, around


@pytest.fixture(scope="module")
def victim(server, tiny_model_dir):
    """Key A's trained run: its session and run ids, its sampler and state checkpoints, its folder's files, its greedy
    answer, a future of its own."""
    import tinker
    from tinker import types

    root, data, _ = server
    with tinker.ServiceClient(base_url=root, api_key=A) as service:
        training = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=1).result()
        tokenizer = training.get_tokenizer()
        tokens = tokenizer.encode("Classify the message: my card has not arrived card_arrival")
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
        for _ in range(2):
            training.forward_backward([datum], "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        sampler = training.save_weights_for_sampler("final").result().path
        state = training.save_state("state").result().path
        run = training.model_id
        future = post(root, "optim_step", {"model_id": run, "adam_params": {}}, key=A).json()["request_id"]
        prompt = tokens[:6]
        yield {"service": service, "run": run, "session": run.partition(":train:")[0], "sampler": sampler,
               "state": state, "prompt": prompt, "answer": greedy(service, sampler, prompt), "future": future,
               "files": files_under(data / "tinker" / "keys"), "base": str(tiny_model_dir)}


def test_another_key_naming_any_session_run_path_or_checkpoint_of_the_first_changes_nothing(server, victim):
    import tinker

    root, data, around = server
    outside_before = outside(around, data)
    session, run, sampler, state = victim["session"], victim["run"], victim["sampler"], victim["state"]
    evil = str(around / "outside" / "evil")
    hostile_sessions = [session, str(data / "tinker" / "keys"), evil, "../../../tmp/x", "session-0\x00", "a" * 20_000,
                        "..%2F..%2Fetc", f"{session}/../..", "/etc/passwd", "session-" + "0" * 24]
    answers: list[tuple[str, int]] = []

    def hit(what: str, response: httpx.Response) -> None:
        answers.append((what, response.status_code))

    base = victim["base"]
    for sid in hostile_sessions:  # runs, samplers, states and heartbeats in a session B did not make
        hit(f"create_model {sid[:30]}", post(root, "create_model", {"session_id": sid, "model_seq_id": 0,
                                                                   "base_model": base, "lora_config": {"rank": 4}}))
        hit(f"create_model seq 9 {sid[:30]}", post(root, "create_model", {"session_id": sid, "model_seq_id": 9,
                                                                         "base_model": base}))
        hit(f"create_sampling_session {sid[:30]}", post(root, "create_sampling_session", {
            "session_id": sid, "sampling_session_seq_id": 0, "base_model": base}))
        hit(f"load_weights {sid[:30]}", post(root, "load_weights", {"session_id": sid, "model_seq_id": 5,
                                                                   "path": sampler, "optimizer": False}))
        hit(f"heartbeat {sid[:30]}", post(root, "session_heartbeat", {"session_id": sid}))
    hit("finish A's session", post(root, f"sessions/{session}/finish", {}))
    for model_id in (run, f"{session}:train:1", evil, "../x:train:0"):  # calls on A's run, or on a path
        hit(f"optim_step {model_id[:30]}", post(root, "optim_step", {"model_id": model_id, "adam_params": {}}))
        hit(f"save_weights {model_id[:30]}", post(root, "save_weights", {"model_id": model_id, "path": "final"}))
        hit(f"save_weights_for_sampler {model_id[:30]}", post(root, "save_weights_for_sampler", {
            "model_id": model_id, "path": "final"}))
        hit(f"load_weights {model_id[:30]}", post(root, "load_weights", {"model_id": model_id, "path": state,
                                                                        "optimizer": True}))
        hit(f"get_info {model_id[:30]}", post(root, "get_info", {"model_id": model_id}))
    for path in (sampler, state, f"tinker://{run}/sampler_weights/..", "tinker://../../etc/passwd",
                 f"tinker://{run}/weights/..%2F..%2Fx", "/etc/passwd", f"tinker://{evil}/weights/x"):
        hit(f"weights_info {path[-30:]}", post(root, "weights_info", {"tinker_path": path}))
        hit(f"asample {path[-30:]}", post(root, "asample", {
            "prompt": {"chunks": [{"tokens": [1, 2]}]}, "sampling_params": {"max_tokens": 2}, "model_path": path}))
        hit(f"sampling session {path[-30:]}", post(root, "create_sampling_session", {
            "session_id": session, "sampling_session_seq_id": 0, "model_path": path}))
    for tail in ("sampler_weights/final", "weights/state", "weights/..%2F..%2F..%2Fetc", "weights/../../x",
                 "weights/%2Fetc%2Fpasswd", "..%2F..%2F..", "sampler_weights/final%00"):
        hit(f"delete {tail}", httpx.delete(f"{root}/api/v1/training_runs/{run}/checkpoints/{tail}",
                                          headers={"X-API-Key": B}))
    for route in (f"training_runs/{run}", f"training_runs/{run}/checkpoints", "training_runs/..%2F..%2Fetc",
                  f"training_runs/{evil}/checkpoints", "samplers/../../x"):
        hit(f"GET {route[:40]}", httpx.get(f"{root}/api/v1/{route}", headers={"X-API-Key": B}))
    hit("retrieve A's future", post(root, "retrieve_future", {"request_id": victim["future"]}))
    chat = httpx.post(f"{root}/v1/chat/completions", headers={"Authorization": "Bearer key-b"},
                      json={"model": sampler, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    hit("chat on A's checkpoint", chat)

    assert [(w, c) for w, c in answers if not 400 <= c < 500] == []
    assert dict(answers)["finish A's session"] == 404 and dict(answers)["retrieve A's future"] == 404
    assert sum(c == 404 for _, c in answers) >= 30  # another key's object is not found, as an unknown one

    # and through the SDK, as key B's own client: not-found errors, nothing of A's touched
    with tinker.ServiceClient(base_url=root, api_key=B) as service_b:
        rest = service_b.create_rest_client()
        with pytest.raises(tinker.NotFoundError):
            rest.delete_checkpoint_from_tinker_path(sampler).result()
        with pytest.raises(tinker.NotFoundError):
            rest.get_training_run(run).result()
        with pytest.raises((tinker.NotFoundError, tinker.BadRequestError)):
            rest.delete_checkpoint_from_tinker_path(f"tinker://{run}/weights/..%2F..").result()
        with pytest.raises(tinker.NotFoundError):
            service_b.create_sampling_client(model_path=sampler).result()
        own = service_b.create_lora_training_client(base_model=base, rank=4).result()
        assert own.model_id.partition(":train:")[0] != session  # B's client runs in B's own session

    # nothing of A's changed, nothing written outside the data folder
    assert files_under(data / "tinker" / "keys", skip=None).items() >= victim["files"].items()
    assert outside(around, data) == outside_before and not (around / "outside").exists()
    assert not Path("/some/absolute/path/evil").exists()
    assert greedy(victim["service"], sampler, victim["prompt"]) == victim["answer"]
    again = victim["service"].create_lora_training_client(base_model=base, rank=4).result()  # A's next client
    assert again.model_id.startswith(session + ":train:")


def test_no_tinker_route_answers_500_to_bad_input(server, victim):
    """Wrong JSON types, unknown fields, numbers out of range, NaN, NUL, lone surrogates, 20 KB ids and malformed
    protobuf, route by route with raw HTTP: each a 4xx naming what is wrong."""
    root, _, _ = server
    run, base = victim["run"], victim["base"]
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}
    sample = {"prompt": prompt, "sampling_params": {"max_tokens": 2}, "base_model": base}
    cases = {
        "create_session": [{"tags": 5}, {"tags": [], "sdk_version": 1}, {"user_metadata": [1]}, {"x": 1}, [1], "s"],
        "session_heartbeat": [{}, {"session_id": None}, {"session_id": 5}, {"session_id": ["a"]}],
        "create_model": [{"session_id": victim["session"], "model_seq_id": "abc", "base_model": base},
                         {"session_id": victim["session"], "model_seq_id": None, "base_model": base},
                         {"session_id": victim["session"], "model_seq_id": 10**25, "base_model": base},
                         {"session_id": victim["session"], "model_seq_id": 0, "base_model": base, "lora_config": 5},
                         {"session_id": victim["session"], "model_seq_id": 0, "base_model": base,
                          "lora_config": {"rank": "big"}},
                         {"session_id": victim["session"], "model_seq_id": 0, "base_model": base,
                          "lora_config": {"rank": 4, "seed": -1}},
                         {"session_id": victim["session"], "model_seq_id": 0, "base_model": base,
                          "optimizer_config": {"type": "sgd"}},
                         {"session_id": victim["session"], "model_seq_id": 0, "base_model": 5}],
        "optim_step": [{"model_id": run, "adam_params": 5}, {"model_id": run, "adam_params": {"learning_rate": "x"}},
                       {"model_id": run, "adam_params": {"beta1": 2}}, {"model_id": 5}, {"model_id": run, "seq_id": "a"},
                       {"model_id": run, "optimizer_params": {"type": "dimuon"}}],
        "save_weights": [{"model_id": run, "path": 5}, {"model_id": run, "ttl_seconds": "x"},
                         {"model_id": run, "overwrite": "yes"}, {"model_id": run, "user_metadata": {"a": 5}},
                         {"model_id": run, "path": "../../x"}, {"model_id": run, "path": "a/b"}],
        "save_weights_for_sampler": [{"model_id": run, "kind": "async"}, {"model_id": run, "path": "x" * 20_000}],
        "load_weights": [{"model_id": run, "path": 5, "optimizer": True}, {"model_id": run, "path": "x",
                                                                          "optimizer": "yes"}, {"path": "x"}],
        "asample": [{**sample, "sampling_params": None}, {**sample, "num_samples": "2"},
                    {**sample, "num_samples": 10**6}, {**sample, "topk_prompt_logprobs": 10**6},
                    {**sample, "sampling_params": {"max_tokens": 2, "stop": ["x"] * 160}},
                    {**sample, "sampling_params": {"max_tokens": 2, "stop": ["x" * 7000]}},
                    {**sample, "sampling_params": {"max_tokens": 10**6}},
                    {**sample, "sampling_params": {"max_tokens": 2, "temperature": -1}},
                    {**sample, "sampling_params": {"max_tokens": 2, "top_p": 0}},
                    {**sample, "prompt": {"chunks": [{"type": "image", "tokens": [1]}]}},
                    {**sample, "prompt": {"chunks": [{"tokens": ["a"]}]}}, {**sample, "prompt": []},
                    {**sample, "sampling_session_id": 5}, {**sample, "target_prompt_logprobs": [1]}],
        "retrieve_future": [{"request_id": [1]}, {"request_id": None}, {"request_id": "x" * 20_000}, {}],
        "weights_info": [{"tinker_path": 5}, {"tinker_path": None}],
        "create_sampling_session": [{"session_id": victim["session"]}, {"session_id": victim["session"],
                                                                          "sampling_session_seq_id": "a"}],
        "telemetry": [{"events": 5}, [1]],
    }
    answers = []
    for route, bodies in cases.items():
        for body in bodies:
            r = post(root, route, body, key=A)
            status = r.status_code
            if status == 200 and "request_id" in r.json():  # accepted: its future must end as the caller's error
                ended = post(root, "retrieve_future", {"request_id": r.json()["request_id"]}, key=A).json()
                status = 400 if ended.get("category") == "user" else 500
            answers.append((route, str(body)[:80], status))
    raw = [("create_model", b'{"session_id": "s", "model_seq_id": NaN, "base_model": "b"}'),
           ("optim_step", b'{"model_id": "%s", "adam_params": {"learning_rate": NaN}}' % run.encode()),
           ("optim_step", b'{"model_id": "%s", "adam_params": {"learning_rate": Infinity}}' % run.encode()),
           ("create_session", b'{"tags": ["\\ud800"], "sdk_version": "x"}'),
           ("create_session", b'{"tags": ["\\u0000"], "sdk_version": "x"}'),
           ("retrieve_future", b"not json"), ("retrieve_future", b"\xff\xfe"),
           ("asample", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}")]
    for route, body in raw:
        r = httpx.post(f"{root}/api/v1/{route}", content=body, headers={"X-API-Key": A,
                                                                          "content-type": "application/json"})
        answers.append((route, body[:60].decode("utf-8", "replace"), r.status_code))
    for wire_body in (b"\x0a\x05\x61", b"\x1b", b"\x0a\x03abc\x12\xff\xff\xff\xff\x0f", b"\xff" * 64):
        r = httpx.post(f"{root}/api/v1/forward_backward", content=wire_body,
                       headers={"X-API-Key": A, "content-type": "application/x-protobuf"})
        ended = post(root, "retrieve_future", {"request_id": r.json()["request_id"]}, key=A).json() \
            if r.status_code == 200 else {"category": "user"}
        answers.append(("forward_backward", repr(wire_body[:20]), 400 if ended.get("category") == "user" else 500))
    for query in ("limit=-1", "offset=10000000000000000000000000", "limit=abc", "access_scope=%00"):
        r = httpx.get(f"{root}/api/v1/training_runs?{query}", headers={"X-API-Key": A})
        answers.append(("training_runs", query, r.status_code))
        r = httpx.get(f"{root}/api/v1/checkpoints?{query}", headers={"X-API-Key": A})
        answers.append(("checkpoints", query, r.status_code))
    bad = [a for a in answers if not 400 <= a[2] < 500]
    assert bad == [], "\n".join(map(str, bad))


def test_nan_and_inf_inputs_are_the_callers_error_and_never_reach_the_weights(server, victim):
    import tinker
    from tinker import types

    root, _, _ = server
    training = victim["service"].create_lora_training_client(base_model=victim["base"], rank=4, seed=3).result()
    tokens = victim["prompt"] + victim["prompt"]
    good = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    for name, bad in (("weights", float("nan")), ("advantages", float("inf")), ("logprobs", float("-inf"))):
        inputs = {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)} if name == "weights" else {
            "target_tokens": tokens[1:], "logprobs": [-1.0] * (len(tokens) - 1), "advantages": [1.0] * (len(tokens) - 1)}
        inputs[name] = [bad] + list(inputs[name])[1:]
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)
        loss = "cross_entropy" if name == "weights" else "importance_sampling"
        with pytest.raises(tinker.RequestFailedError, match=rf"loss_fn_inputs\['{name}'\]\[0\] is .*finite"):
            training.forward_backward([datum], loss).result()
    # the run was not touched: its next step is finite
    out = training.forward_backward([good], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    again = training.forward_backward([good], "cross_entropy").result().metrics["loss:sum"]
    assert math.isfinite(out.metrics["loss:sum"]) and math.isfinite(again) and again < out.metrics["loss:sum"]
    raw = post(root, "optim_step", {"model_id": training.model_id, "adam_params": {"learning_rate": 1e-2}}, key=A)
    assert raw.status_code == 200


def test_a_keys_memory_disk_and_time_are_bounded_before_anything_runs(tiny_model_dir, tmp_path):
    """A run past the key's memory, a datum whose activations would pass it, a checkpoint past the key's bytes and a
    call slower than --request-timeout at the server's pace: each refused naming what to change, before anything
    runs or is written; a sample's rows end at --request-timeout (``length``), as a chat request's do."""
    import dataclasses

    import tinker
    from tinker import types

    from tunesmith.serve.app import ServeSettings, create_app

    from .conftest import running_server

    app = create_app(ServeSettings(model=str(tiny_model_dir), data_dir=tmp_path, api_keys=frozenset({"key-a"})))
    with running_server(app) as url, tinker.ServiceClient(base_url=url[:-3], api_key=A) as service:
        t, base = app.state.tinker, str(tiny_model_dir)
        small = t.trainer.state_bytes(4)
        t.quotas = dataclasses.replace(t.quotas, tinker_memory_bytes=small * 3,
                                       tinker_checkpoint_bytes=t.trainer.state_bytes(4) // 16 * 4 + 100_000)
        training = service.create_lora_training_client(base_model=base, rank=4).result()
        with pytest.raises(tinker.RequestFailedError, match=r"lora_config\.rank: a run of rank 32 .*tinker_memory_bytes"):
            service.create_lora_training_client(base_model=base, rank=32).result()
        assert len(t.trainer.runs) == 1

        per_token = t.trainer.token_bytes(4)
        fits = int(small * 3 / per_token) - 1
        for length, ok in ((min(fits, 60), True), (fits + 40, False)):
            tokens = [5 + i % 50 for i in range(length + 1)]
            datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length})
            call = training.forward_backward([datum], "cross_entropy")
            if ok:
                call.result()
            else:
                with pytest.raises(tinker.RequestFailedError, match="activations .*tinker_memory_bytes"):
                    call.result()

        training.save_weights_for_sampler("fits").result()
        keys = t.root / "keys"
        before = sorted(p.name for p in keys.rglob("*"))
        with pytest.raises(tinker.RequestFailedError, match="tinker_checkpoint_bytes"):
            training.save_state("too-big").result()
        assert sorted(p.name for p in keys.rglob("*")) == before  # no file, no staging folder left
        assert all("too-big" not in c["path"] for c in t.store.checkpoints(training.model_id, next(iter(t.owners.values()))))

        t.pace.per_token["forward_backward"] = 10.0  # as if this server trained 0.1 tokens a second lately
        big = [5 + i % 50 for i in range(1100)]  # a call of 1,024 tokens or more is measured against the pace
        slow = types.Datum(model_input=types.ModelInput.from_ints(big[:-1]),
                           loss_fn_inputs={"target_tokens": big[1:], "weights": [1.0] * (len(big) - 1)})
        t.quotas = dataclasses.replace(t.quotas, tinker_memory_bytes=None)
        with pytest.raises(tinker.RequestFailedError, match=r"would take about .*--request-timeout"):
            training.forward_backward([slow], "cross_entropy").result()
        t.pace.per_token["forward_backward"] = 1e-6

        engine = app.state.engine  # a sample's rows end at --request-timeout, as a chat request's do
        sampler = service.create_sampling_client(base_model=base).result()
        engine.request_timeout_s = 0.0
        cut = sampler.sample(types.ModelInput.from_ints([5, 6]), 4, types.SamplingParams(max_tokens=64, stop=[]))
        assert all(s.stop_reason == "length" and len(s.tokens) < 64 for s in cut.result().sequences)
        engine.request_timeout_s = 300.0
        assert [len(s.tokens) for s in sampler.sample(types.ModelInput.from_ints([5, 6]), 4, types.SamplingParams(
            max_tokens=4, stop=[])).result().sequences] == [4] * 4
