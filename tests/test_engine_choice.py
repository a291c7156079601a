"""Which inference engine `tunesmith serve` runs, and what it says when vLLM is not there (no vLLM needed)."""

import pytest

from tunesmith.errors import ConfigError
from tunesmith.serve.engines.vllm.server import VllmLaunch, vllm_command, vllm_env, vllm_python
from tunesmith.serve.engines.vllm.wire import chat_logprobs, vllm_error
from tunesmith.serve.launch import pick_engine


def test_auto_is_the_builtin_engine_without_a_gpu_and_names_are_checked(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_engine("auto") == "builtin" and pick_engine("builtin") == "builtin"
    with pytest.raises(ConfigError, match="--engine is auto, builtin or vllm"):
        pick_engine("llama")


def test_a_missing_vllm_says_what_to_run(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="run `make vllm`"):
        vllm_python(str(tmp_path / "nowhere" / "python"))
    monkeypatch.chdir(tmp_path)  # no ./.vllm-venv here
    monkeypatch.delenv("TUNESMITH_VLLM_PYTHON", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="vLLM is not installed: run `make vllm`"):
        vllm_python()
    with pytest.raises(ConfigError, match="vLLM is not installed: run `make vllm`"):
        pick_engine("vllm")


def test_the_vllm_command_has_no_secret_and_listens_on_a_private_socket(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_API_KEYS", "tenant-a,tenant-b")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    cmd = vllm_command("py", VllmLaunch("/m", "base", dtype="float32"), tmp_path)
    assert cmd[:2] == ["py", str(tmp_path / "tunesmith_vllm_shim.py")]
    joined = " ".join(cmd)
    assert f"--uds {tmp_path}/api.sock" in joined and "--host" not in joined and "--port" not in joined
    assert "--api-key" not in joined and "--middleware tunesmith_vllm_shim.RequireKey" in joined
    assert "--served-model-name base" in joined and "--enable-lora" in joined
    assert "--max-model-len auto" in joined and "--generation-config vllm" in joined  # vLLM fits it; no repetition penalty
    env = vllm_env("s3cret", tmp_path, own_network=False)
    assert env["VLLM_API_KEY"] == "s3cret" and env["VLLM_RPC_BASE_PATH"] == env["TMPDIR"] == str(tmp_path)
    assert "TUNESMITH_API_KEYS" not in env and "HF_TOKEN" not in env  # the server's secrets stay with the server
    assert env["VLLM_NO_USAGE_STATS"] == env["DO_NOT_TRACK"] == "1"
    mine = vllm_command("py", VllmLaunch("/m", "base", extra_args=("--max-model-len=4096", "--generation-config",
                                                                   "auto")), tmp_path)
    assert mine.count("--max-model-len") == 0 and mine.count("--generation-config") == 1  # the user's, not ours


def test_vllm_errors_and_logprobs_take_openais_shapes():
    err = vllm_error(404, '{"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", '
                          '"param": "model", "code": 404}}')
    assert (err.status, err.body) == (404, {"message": "The model `x` does not exist.", "type": "invalid_request_error",
                                            "param": "model", "code": None})
    assert vllm_error(500, "boom").body["type"] == "server_error"
    content = chat_logprobs({"tokens": ["Hi", "!"], "token_logprobs": [-0.1, -2.0],
                             "top_logprobs": [{"Hi": -0.1, "Hello": -2.5}, {"!": -2.0, ".": -0.5}]})
    assert [t["token"] for t in content] == ["Hi", "!"] and content[0]["bytes"] == list(b"Hi")
    assert [t["token"] for t in content[1]["top_logprobs"]] == [".", "!"]  # most probable first
