"""A served classifier head's label probabilities through OpenAI's ``logprobs``, read by the official client."""

import io
import math
from contextlib import redirect_stderr, redirect_stdout

import openai
import pytest

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine

from .conftest import banking_recipe, banking_rows, running_server, write_jsonl, write_recipe

LABELS = ("card_arrival", "pin_blocked", "age_limit")


def train_intent_head(tmp_path, model_dir):
    """A classifier head (+ LoRA) on the tiny Llama, a few steps on BANKING77 rows with `tunesmith train`;
    the folder `tunesmith serve --adapter` takes."""
    from rich.console import Console

    import tunesmith.cli as cli_mod

    data = write_jsonl(tmp_path / "d.jsonl", banking_rows(LABELS, 8))
    recipe = write_recipe(tmp_path / "r.yaml", banking_recipe(
        tmp_path, model_dir, data, name="intents", seed=5, split={"train": 21, "val": 0, "test": 3},
        train={"head": "classifier", "max_steps": 4, "batch_size": 7, "learning_rate": 1e-2, "logging_steps": 2,
               "max_seq_length": 48, "lr_scheduler": "constant"}))
    buf = io.StringIO()
    cli_mod.common.console = cli_mod.common.err_console = Console(file=buf, width=200, force_terminal=False)
    with redirect_stdout(buf), redirect_stderr(buf):
        code = cli_mod.main(["train", str(recipe)])
    assert code == 0, buf.getvalue()
    folder = tmp_path / "runs" / "intents" / "train" / "classifier"
    assert (folder / "adapter_model.safetensors").is_file(), buf.getvalue()
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    folder = train_intent_head(tmp_path_factory.mktemp("intent-head"), tiny_model_dir)
    engine = Engine(str(tiny_model_dir), {"intents": str(folder)}, max_batch=4, wait_ms=10)
    settings = ServeSettings(model=str(tiny_model_dir), data_dir=tmp_path_factory.mktemp("serve"))
    with running_server(create_app(settings, engine)) as url:
        yield {"client": openai.OpenAI(base_url=url, api_key="none", max_retries=0), "folder": folder,
               "base": str(tiny_model_dir)}


def test_classifier_head_answers_logprobs_over_its_labels_streamed_or_not(served):
    from tunesmith.models.head_predictor import HeadPredictor

    client = served["client"]
    texts = [r["text"] for r in banking_rows(LABELS, 2)]
    local = HeadPredictor(served["folder"])
    labels = local.meta["labels"]  # the head's own order (not LABELS')
    for text, probs in zip(texts, local.probabilities(texts), strict=True):
        messages = [{"role": "user", "content": text}]
        reply = client.chat.completions.create(model="intents", messages=messages, logprobs=True, top_logprobs=20, n=2)
        content = reply.choices[0].message.content
        [token] = reply.choices[0].logprobs.content
        top = token.top_logprobs
        assert [t.token for t in top] and len(top) == len(LABELS) and {t.token for t in top} == set(LABELS)
        assert math.fsum(math.exp(t.logprob) for t in top) == pytest.approx(1, abs=1e-5)
        assert token.token == top[0].token == content and token.logprob == top[0].logprob
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert bytes(token.bytes).decode() == content
        expected = dict(zip(labels, probs, strict=True))  # the head's own forward pass, outside the server
        assert {t.token: math.exp(t.logprob) for t in top} == pytest.approx(expected, abs=1e-5)
        assert reply.choices[1].logprobs == reply.choices[0].logprobs  # every choice carries them

        stream = client.chat.completions.create(model="intents", messages=messages, logprobs=True, top_logprobs=20,
                                                stream=True)
        chunks = [c.choices[0] for c in stream if c.choices]
        assert "".join(c.delta.content or "" for c in chunks) == content
        streamed = [t for c in chunks if c.logprobs for t in c.logprobs.content]
        assert [t.model_dump() for t in streamed] == [token.model_dump()]

        two = client.chat.completions.create(model="intents", messages=messages, logprobs=True, top_logprobs=2)
        assert [t.token for t in two.choices[0].logprobs.content[0].top_logprobs] == [t.token for t in top[:2]]
        bare = client.chat.completions.create(model="intents", messages=messages, logprobs=True)
        assert bare.choices[0].logprobs.content[0].top_logprobs == []  # as at OpenAI: top_logprobs not asked for
        assert bare.choices[0].logprobs.content[0].token == content
        plain = client.chat.completions.create(model="intents", messages=messages)
        assert plain.choices[0].message.content == content and plain.choices[0].logprobs is None

    models = {m.id: m.model_dump() for m in client.models.list()}
    assert models["intents"]["head"] == "classifier" and "head" not in models[served["base"]]
    with pytest.raises(openai.BadRequestError, match="logprobs: true"):
        client.chat.completions.create(model="intents", messages=[{"role": "user", "content": texts[0]}], top_logprobs=3)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="intents", messages=[{"role": "user", "content": texts[0]}],
                                       logprobs=True, top_logprobs=21)
