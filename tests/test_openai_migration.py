"""The migration guide's script (examples/openai_migration.py), a fine-tuning script as OpenAI's guide writes
it, runs unchanged against the server: only OPENAI_BASE_URL and OPENAI_API_KEY differ, and the model name
it uses, gpt-4o-mini-2024-07-18, is mapped to the local base with a model alias."""

import importlib.util
import threading
from contextlib import ExitStack

import pytest

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.jobs.worker import work

from .conftest import REPO, running_server, vllm_engine


@pytest.mark.parametrize("engine", ["builtin", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])])
def test_the_guides_script_runs_against_the_server(engine, tiny_model_dir, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("openai_migration", REPO / "examples" / "openai_migration.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with ExitStack() as stack:
        if engine == "vllm":  # the embedded model: vLLM's CPU kernels take no 16-wide attention heads
            served = stack.enter_context(vllm_engine(tmp_path / "vllm"))
        else:
            served = Engine(str(tiny_model_dir), {}, wait_ms=5)
        base = served.base_name
        settings = ServeSettings(model=base, data_dir=tmp_path, api_keys=frozenset({"sk-local"}), engine=engine,
                                 model_aliases={"gpt-4o-mini-2024-07-18": base})
        url = stack.enter_context(running_server(create_app(settings, served)))
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(model=script.main(
            str(REPO / "examples" / "data" / "banking_chat_12.jsonl"))), daemon=True)
        thread.start()
        while thread.is_alive():  # the worker `tunesmith serve` starts beside the server, here in-process
            work(tmp_path, once=True)
            thread.join(0.2)
    out = capsys.readouterr().out
    assert result["model"].startswith(f"ft:{base}:banking:"), out
    assert "'n_epochs': 8" in out and "'batch_size': 1" in out  # 'auto' reported as the numbers used
    assert "results file: last row 96," in out and "responses API:" in out
    assert "gpt-4o-mini-2024-07-18: " in out and f"{result['model']}: " in out
