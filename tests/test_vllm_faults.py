"""A real vLLM (`make vllm`) killed under load: `tunesmith serve --engine vllm` on the embedded model with five
LoRA adapters, sixteen streamed requests in flight, one adapter's folder deleted, then kill -9 of vLLM's process
group. Skips with what to run when vLLM or the model is absent."""

import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from tunesmith.serve.app import ServeSettings, create_app

from .conftest import EMBEDDED, kill_under_streams, running_server, vllm_engine, vllm_or_skip

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
DEADLINE_S = 180.0
NAMES = [f"lora-{i}" for i in range(5)]


def random_adapters(folder: Path, names: list[str] = NAMES) -> dict[str, Path]:
    """Different LoRA adapters (random A and B, rank 8) for the embedded model, one per name."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model

    out = {}
    for i, name in enumerate(names):
        torch.manual_seed(i)
        config = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(load_model(EMBEDDED, pick_placement()), config)
        model.save_pretrained(folder / name)
        out[name] = folder / name
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    vllm_or_skip()
    tmp = tmp_path_factory.mktemp("vllm-faults")
    adapters = random_adapters(tmp / "adapters")
    with vllm_engine(tmp / "vllm", request_timeout_s=DEADLINE_S) as engine:
        for name, path in adapters.items():
            engine.add_adapter(name, path)
        settings = ServeSettings(model=EMBEDDED, data_dir=tmp / "data", engine="vllm", request_timeout_s=DEADLINE_S)
        with running_server(create_app(settings, engine)) as url:
            yield {"url": url, "engine": engine, "adapters": adapters}


def ask(client: openai.OpenAI, model: str) -> str:
    return client.chat.completions.create(model=model, temperature=0, max_tokens=12, messages=[
        {"role": "user", "content": "What is the capital of France?"}]).choices[0].message.content


def vllm_models(engine) -> set[str]:
    with httpx.Client(transport=httpx.HTTPTransport(uds=engine.server.socket_path), timeout=30) as c:
        return {m["id"] for m in c.get("http://vllm/v1/models", headers=engine.server.headers).json()["data"]}


def test_kill9_under_16_streams_with_5_adapters_one_deleted(served):
    engine, url = served["engine"], served["url"]
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=DEADLINE_S + 60)
    before = {m: ask(client, m) for m in [EMBEDDED, *NAMES]}
    assert vllm_models(engine) == {EMBEDDED, *NAMES}
    outcomes = kill_under_streams(client, [EMBEDDED, *NAMES], engine, served["adapters"]["lora-4"], 24, DEADLINE_S,
                                  max_tokens=300, temperature=0, messages=[{"role": "user", "content": "Count to 300."}])
    assert all(o is not None for o in outcomes), outcomes
    assert all(seconds < DEADLINE_S + 5 for _, seconds in outcomes), outcomes
    assert all(kind == "answer" or "restarting" in kind for kind, _ in outcomes), outcomes
    assert engine.in_flight() == 0
    deadline = time.monotonic() + 600
    while not (engine.server.restarts and engine.server.ready.is_set()):
        assert time.monotonic() < deadline, f"vLLM was not restarted; its log: {engine.server.log_path}"
        time.sleep(2)
    for name in [EMBEDDED, *NAMES[:4]]:  # answers again, each model as before the kill
        assert ask(client, name) == before[name]
    with pytest.raises(openai.UnprocessableEntityError, match="lora-4.*could not be loaded"):
        ask(client, "lora-4")
    assert vllm_models(engine) == {EMBEDDED, *NAMES[:4]}
    assert engine.loader.failed().keys() == {"lora-4"}
    assert engine.server.endpoint.start == 2 and engine.in_flight() == 0
