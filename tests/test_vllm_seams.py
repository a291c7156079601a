"""The vLLM engine's lifecycle, boundary and faults without vLLM: the real launch (the shim, a private Unix socket,
the key by environment, the guard middleware, a network namespace where allowed, restarts) runs a stand-in
server (tests/fake_vllm) in vLLM's place. What vLLM itself does is tested in test_vllm_engine.py and
test_vllm_faults.py (`make test-vllm`)."""

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.interface import GenParams
from tunesmith.serve.engines.vllm.server import ask_models
from tunesmith.serve.engines.vllm.shim import RequireKey
from tunesmith.serve.errors import APIError

from .conftest import REPO, kill_under_streams, running_server

FAKE = REPO / "tests" / "fake_vllm"
DEADLINE_S = 8.0


def adapter(folder: Path, fake: str | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **({"fake": fake} if fake else {})}))
    return folder


@pytest.fixture(scope="module")
def fake_engine(tiny_model_dir, tmp_path_factory):
    """The vLLM engine over a stand-in vLLM server, with adapters that hang, break and are refused."""
    from tunesmith.serve.engines.vllm.engine import VllmEngine

    tmp = tmp_path_factory.mktemp("fake-vllm")
    adapters = {"hang": adapter(tmp / "hang", "hang"), "broken": adapter(tmp / "broken", "broken"),
                "refused": adapter(tmp / "refused", "refuse"), "fine": adapter(tmp / "fine")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(FAKE), os.environ.get("PYTHONPATH", "")]))
        engine = VllmEngine(str(tiny_model_dir), adapters, tmp / "log", python=sys.executable,
                            request_timeout_s=DEADLINE_S, start_timeout_s=120)
        try:
            yield engine
        finally:
            engine.close()


def ask(engine, model: str, stream: bool = False, max_tokens: int = 4):
    async def run():
        return await engine.submit(model, [1, 2, 3], [GenParams(max_tokens)], stream=stream).results()

    return asyncio.run(run())


def error_of(engine, model: str, stream: bool = False) -> APIError:
    with pytest.raises(APIError) as err:
        ask(engine, model, stream)
    return err.value


def test_every_request_ends_within_its_deadline_with_an_openai_error(fake_engine, monkeypatch):
    t0 = time.monotonic()
    late = error_of(fake_engine, "hang", stream=True)
    assert (late.status, late.body["code"]) == (504, "timeout") and time.monotonic() - t0 < DEADLINE_S + 3
    broken = error_of(fake_engine, "broken")  # a 200 whose body is not JSON
    assert broken.status == 502 and broken.body["type"] == "server_error"
    monkeypatch.setattr("tunesmith.serve.engines.vllm.wire.prompt_entries", lambda *a: 1 / 0)  # any exception at all
    assert "ZeroDivisionError" in error_of(fake_engine, "fine").body["message"]
    assert fake_engine.in_flight() == 0


def test_an_adapter_with_lora_outside_the_served_layers_is_refused_naming_them(tiny_model_dir, tmp_path):
    """vLLM serves adapters on the model's linear layers but its output layer; an adapter that also trains the output
    layer would be served without it, so it is refused before vLLM sees it, naming the layers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.serve.engines.vllm.adapters import lora_targets, untargeted

    targets = lora_targets(str(tiny_model_dir))
    assert set(targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name, modules in (("linear", "all-linear"), ("head", ["q_proj", "lm_head"])):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=2, target_modules=modules))
        model.save_pretrained(tmp_path / name)
    assert untargeted(str(tmp_path / "linear"), targets) is None
    assert "['lm_head']" in untargeted(str(tmp_path / "head"), targets)


def test_a_refused_adapter_is_a_4xx_for_that_model_only(fake_engine):
    refused = error_of(fake_engine, "refused")
    assert refused.status == 422 and refused.body["code"] == "model_load_failed"
    assert "greater than max_lora_rank" in refused.body["message"]
    assert fake_engine.loader.failed().keys() == {"refused"}
    assert ask(fake_engine, "fine")[0].text == "one two three four"
    assert ask(fake_engine, str(fake_engine.base_name))[0].text == "one two three four"


def test_vllm_answers_nothing_without_its_key(fake_engine):
    server = fake_engine.server
    routes = [["/v1/models", ["GET"]], ["/metrics", ["GET"]], ["/v1/load_lora_adapter", ["POST"]],
              ["/v1/completions", ["POST", "OPTIONS"]]]
    attack = subprocess.run([sys.executable, str(REPO / "tests" / "vllm_attack.py")], capture_output=True, text=True,
                            input=json.dumps({"socket": server.socket_path, "routes": routes}), timeout=60, check=True)
    found = json.loads(attack.stdout)
    assert set(map(tuple, found["statuses"].values())) == {(401, 401)}
    if os.geteuid() == 0:
        assert found["other_user"].startswith("refused")
    assert server.endpoint.key not in subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout


def test_the_guard_refuses_every_path_and_method_without_the_key(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "k")
    seen = []

    async def inner(scope, receive, send):
        seen.append(scope["path"])

    guard = RequireKey(inner)

    def call(path: str, method: str, headers: list) -> int | None:
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": path, "method": method, "headers": headers}
        asyncio.run(guard(scope, None, send))
        return sent[0]["status"] if sent else None

    for path in ("/health", "/metrics", "/invocations", "/tokenize", "/v1/models", "/adapters"):
        for method in ("GET", "POST", "OPTIONS"):
            assert call(path, method, []) == 401
            assert call(path, method, [(b"authorization", b"Bearer kk")]) == 401
            assert call(path, method, [(b"authorization", b"Basic k")]) == 401
    assert call("/metrics", "GET", [(b"authorization", b"Bearer k")]) is None and seen == ["/metrics"]


def test_readiness_never_sends_the_key_to_a_listener_it_did_not_start(tmp_path):
    """Another process holding the socket path gets nothing: the peer's process group is checked first."""
    path = str(tmp_path / "api.sock")
    received = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)

        def accept():
            conn, _ = listener.accept()
            conn.settimeout(2)
            try:
                received.append(conn.recv(4096))
            except OSError:
                received.append(b"")
            conn.close()

        t = threading.Thread(target=accept)
        t.start()
        assert ask_models(path, "the-secret", group=os.getpgid(0) + 1) is None
        t.join(5)
    assert b"the-secret" not in b"".join(received)


def test_kill9_under_16_streams_with_5_adapters_one_deleted(fake_engine, tmp_path, caplog):
    """16 streamed requests over 5 adapters; one adapter's folder is deleted, then vLLM is killed: every request
    ends within its deadline (answer or 503), the restarted vLLM (a new socket, a new key) serves the 4 others
    and the fifth's requests name why it is gone; no call is left pending. (The app's shutdown closes the
    engine: this test runs last.)"""
    engine = fake_engine
    names = [f"a{i}" for i in range(5)]
    for name in names:
        engine.add_adapter(name, adapter(tmp_path / name))
    settings = ServeSettings(model=engine.base_name, data_dir=tmp_path / "data", engine="vllm",
                             request_timeout_s=DEADLINE_S)
    first = engine.server.endpoint
    caplog.set_level(logging.WARNING, logger="tunesmith.serve")
    with running_server(create_app(settings, engine)) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        assert {m.id for m in client.models.list()} >= set(names)
        outcomes = kill_under_streams(client, names, engine, tmp_path / "a4", 32, DEADLINE_S, max_tokens=400,
                                      messages=[{"role": "user", "content": "count"}])
        assert all(o is not None for o in outcomes), outcomes
        assert all(seconds < DEADLINE_S + 2 for _, seconds in outcomes), outcomes
        assert all(kind == "answer" or "restarting" in kind for kind, _ in outcomes), outcomes
        deadline = time.monotonic() + 120
        while not (engine.server.restarts and engine.server.ready.is_set()):
            assert time.monotonic() < deadline, engine.server.log_tail()
            time.sleep(0.2)
        for name in names[:4]:
            reply = client.chat.completions.create(model=name, max_tokens=3, messages=[{"role": "user", "content": "x"}])
            assert reply.choices[0].message.content == "one two three"
        with pytest.raises(openai.UnprocessableEntityError, match="could not be loaded.*No adapter found"):
            client.chat.completions.create(model="a4", max_tokens=3, messages=[{"role": "user", "content": "x"}])
        second = engine.server.endpoint
        assert second.start == 2 and second.key != first.key and second.folder != first.folder
        assert not first.folder.exists()  # the old socket's folder is gone: nothing can wait there
        served = ask_models(second.socket_path, second.key, engine.server.proc.pid)
        assert {m["id"] for m in served["data"]} >= set(names[:4]) and "a4" not in {m["id"] for m in served["data"]}
        assert "No adapter found" in engine.loader.failed()["a4"]
        assert any("refused adapter a4" in r.getMessage() for r in caplog.records)
        assert engine.in_flight() == 0
