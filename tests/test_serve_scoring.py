"""Scoring through /v1/completions on the built-in engine, read with the official `openai` client's types: every
prompt form of OpenAI's spec; ``echo`` with ``logprobs`` returns the prompt's tokens with their logprobs (the first
None), alternatives and offsets, then the answer's; ``max_tokens: 0`` scores the prompt alone; the numbers are the
model's own (one plain forward pass); the end of sequence that ends an answer is listed; bad ids are 400s naming
their index; a scoring request is charged its tokens like any other."""

import openai
import pytest
import torch
from openai.types import Completion

from tunesmith.serve.api.rate_limits import KeyLimits
from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine

from .conftest import running_server


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    engine = Engine(str(tiny_model_dir), {}, wait_ms=5)
    settings = ServeSettings(model=str(tiny_model_dir), data_dir=tmp_path_factory.mktemp("scoring"))
    with running_server(create_app(settings, engine)) as url:
        yield {"client": openai.OpenAI(base_url=url, api_key="none", max_retries=0), "model": str(tiny_model_dir),
               "engine": engine}


def plain_logprobs(engine, ids: list[int]) -> list[float]:
    """Each token's logprob after the ones before it: one forward pass of the model alone."""
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return [float(logp[p, ids[p + 1]]) for p in range(len(ids) - 1)]


def test_every_prompt_form_answers_the_same(live):
    c, model, tok = live["client"], live["model"], live["engine"].tokenizer
    texts = ["my card has not arrived", "pin blocked"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    kw = {"model": model, "max_tokens": 4, "temperature": 0}
    by_text = [ch.text for ch in c.completions.create(prompt=texts, **kw).choices]
    assert [ch.text for ch in c.completions.create(prompt=ids, **kw).choices] == by_text
    assert c.completions.create(prompt=ids[0], **kw).choices[0].text == by_text[0]
    assert c.completions.create(prompt=texts[1], **kw).choices[0].text == by_text[1]
    echoed = c.completions.create(prompt=ids, echo=True, **kw)
    assert [ch.text for ch in echoed.choices] == [t + a for t, a in zip(texts, by_text, strict=True)]


def test_echo_with_logprobs_scores_the_prompt_then_the_answer(live):
    c, model, engine = live["client"], live["model"], live["engine"]
    ids = engine.tokenizer("what is the exchange rate", add_special_tokens=False)["input_ids"]
    reply = c.completions.create(model=model, prompt=[ids], echo=True, logprobs=2, max_tokens=3, temperature=0)
    assert isinstance(reply, Completion)  # the client's own reading (its types say float; the first is None, as
    choice = reply.choices[0]  # OpenAI's legacy models and vLLM answer)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(plain_logprobs(engine, ids), abs=1e-5)
    assert [engine.tokenizer.convert_tokens_to_ids(engine.tokenizer.tokenize(t))[0] for t in lp.tokens[:len(ids)]] == ids
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert token in top and top[token] == value and len(top) in (2, 3)  # two alternatives and the chosen one
        assert max(top.values()) >= value
    assert lp.text_offset[0] == 0 and all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:],
                                                                               lp.tokens, strict=False))
    assert choice.text.startswith(engine.tokenizer.decode(ids)) and reply.usage.prompt_tokens == len(ids)
    alone = c.completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=0)
    assert alone.choices[0].text == engine.tokenizer.decode(ids) and alone.choices[0].finish_reason == "length"
    assert alone.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:len(ids)], abs=1e-5)
    assert alone.usage.completion_tokens == 0
    two = c.completions.create(model=model, prompt=[ids, ids[:3]], echo=True, logprobs=0, max_tokens=0, n=2)
    assert [len(ch.logprobs.tokens) for ch in two.choices] == [len(ids), len(ids), 3, 3]
    assert two.choices[1].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:len(ids)], abs=1e-5)


def test_an_answer_ended_by_its_end_of_sequence_lists_it(live):
    """A harness reads a scored continuation as every entry but the last (the one token it asked to generate): an
    answer whose one token is the end of sequence must list it, or the continuation's last token is lost."""
    c, model, engine = live["client"], live["model"], live["engine"]
    tok = engine.tokenizer
    ids = tok("my card", add_special_tokens=False)["input_ids"]
    end = tok.eos_token_id
    reply = c.completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=1,
                                 logit_bias={str(end): 100})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.text == tok.decode(ids)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.tokens[-1] == tok.decode([end])
    assert lp.text_offset[-1] == len(choice.text)


def test_bad_ids_and_forms_are_400s_naming_where(live):
    c, model, engine = live["client"], live["model"], live["engine"]
    vocab = len(engine.tokenizer)
    for prompt, where in (([[5, 6], [7, vocab]], "prompt[1][1]"), ([5, -1], "prompt[1]"), ([[5], "x"], "prompt[1]"),
                          ([[5], []], "prompt[1]")):
        with pytest.raises(openai.BadRequestError) as exc:
            c.completions.create(model=model, prompt=prompt, max_tokens=1)
        assert exc.value.body["param"] == "prompt" and where in exc.value.body["message"], exc.value.body


def test_a_scoring_request_is_charged_its_tokens(tiny_model_dir, tmp_path):
    """max_tokens 0 is not free: its prompt's tokens count against the key's tokens per minute."""
    engine = Engine(str(tiny_model_dir), {}, wait_ms=5)
    settings = ServeSettings(model=str(tiny_model_dir), data_dir=tmp_path, api_keys=frozenset({"k"}),
                             key_limits=KeyLimits(tokens_per_minute=60))
    with running_server(create_app(settings, engine)) as url:
        c = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        ids = list(range(10, 50))  # 40 tokens
        c.completions.create(model=str(tiny_model_dir), prompt=ids, echo=True, logprobs=1, max_tokens=0)
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model=str(tiny_model_dir), prompt=ids, echo=True, logprobs=1, max_tokens=0)
    engine.close()
