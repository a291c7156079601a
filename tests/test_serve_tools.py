"""Tool calling through the official `openai` client against a live server: a function-calling file
uploaded and fine-tuned by the jobs API, then asked with tools (auto, required, a named function,
none), streamed and not; every answer parsed with the client's own types."""

import json

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tunesmith.serve.app import ServeSettings, create_app
from tunesmith.serve.engines.builtin import Engine
from tunesmith.serve.jobs.worker import work

from .conftest import CHATML, banking_rows, running_server

TOOLS = [
    {"type": "function", "function": {"name": "track_card", "description": "Where a new card is",
                                      "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "unblock_pin", "description": "Unblock a PIN",
                                      "parameters": {"type": "object", "properties": {"card": {"type": "string"}},
                                                     "required": ["card"]}}},
]
CALLS = {"card_arrival": ("track_card", {}), "pin_blocked": ("unblock_pin", {"card": "debit"})}


def example(text: str, label: str, i: int) -> dict:
    name, args = CALLS[label]
    return {"tools": TOOLS, "parallel_tool_calls": False, "messages": [
        {"role": "user", "content": text},
        {"role": "assistant", "tool_calls": [{"id": f"call_{i}", "type": "function",
                                             "function": {"name": name, "arguments": json.dumps(args)}}]}]}


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory):
    """A random 2-layer Llama whose tokenizer has the tool tags as tokens (as Qwen's and Hermes' have) and
    merges for the call JSON, so that a call is ~20 tokens. Weights start at std 0.3: with the tiny
    default (0.02) the frozen tied embeddings cap the logits a LoRA can reach, and its loss stalls."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tool-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["text"] for r in banking_rows(tuple(CALLS), 8)] + [json.dumps(TOOLS)] * 5
    corpus += [json.dumps({"name": n, "arguments": a}) for n, a in CALLS.values()] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>")
    fast.add_tokens(["<tool_call>", "</tool_call>"])  # plain added tokens: decoded text keeps them
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.3,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
    )).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def live(tool_model_dir, tmp_path_factory):
    """A server whose worker has fine-tuned the tiny model on function-calling examples."""
    tiny_model_dir = tool_model_dir
    data_dir = tmp_path_factory.mktemp("serve-tools")
    engine = Engine(str(tiny_model_dir), {}, wait_ms=5)
    settings = ServeSettings(model=str(tiny_model_dir), api_keys=frozenset({"k1"}), data_dir=data_dir)
    rows = banking_rows(tuple(CALLS), 6)
    lines = "".join(json.dumps(example(r["text"], r["category"], i)) + "\n" for i, r in enumerate(rows)).encode()
    with running_server(create_app(settings, engine)) as url:
        c = openai.OpenAI(base_url=url, api_key="k1", max_retries=0)
        train = c.files.create(file=("tools.jsonl", lines), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=train.id, seed=1, method={
            "type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 12, "batch_size": 4, "learning_rate_multiplier": 50}}})
        work(data_dir, once=True)
        job = c.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", job.error
        yield {"client": c, "model": job.fine_tuned_model, "base": str(tiny_model_dir), "rows": rows}


def ask(live, stream=False, model=None, **kw):
    text = live["rows"][-1]["text"]  # a pin_blocked request
    kw.setdefault("max_tokens", 40)
    return live["client"].chat.completions.create(model=model or live["model"], messages=[
        {"role": "user", "content": text}], tools=TOOLS, temperature=0, stream=stream, **kw)


def _collect(stream) -> tuple[list[ChatCompletionChunk], dict[int, dict], str | None]:
    """Chunks, the calls assembled from their deltas as a client does, and the finish reason."""
    chunks, calls, finish = list(stream), {}, None
    for ch in chunks:
        assert isinstance(ch, ChatCompletionChunk)
        for choice in ch.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = d.id or entry["id"]
                entry["name"] = (d.function.name if d.function else None) or entry["name"]
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
    return chunks, calls, finish


def test_fine_tuned_model_calls_the_trained_function(live):
    reply = ask(live)
    assert isinstance(reply, ChatCompletion)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "unblock_pin" and json.loads(call.function.arguments) == {"card": "debit"}


def test_fine_tuned_model_streams_its_call_as_openai_does(live):
    chunks, calls, finish = _collect(ask(live, stream=True))
    assert finish == "tool_calls" and list(calls) == [0]
    first = next(d for ch in chunks for c in ch.choices for d in c.delta.tool_calls or [])
    assert first.id and first.type == "function" and first.function.name == "unblock_pin"
    assert first.function.arguments == ""  # the name comes first, the arguments after
    assert json.loads(calls[0]["arguments"]) == {"card": "debit"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_always_parses_even_on_the_base_model(live, stream):
    """Without max_tokens a forced call may run to its schema's longest form, so it always ends whole."""
    choice = {"type": "function", "function": {"name": "unblock_pin"}}
    if stream:
        _, calls, finish = _collect(ask(live, stream=True, model=live["base"], tool_choice=choice, max_tokens=None))
        name, arguments = calls[0]["name"], calls[0]["arguments"]
    else:
        reply = ask(live, model=live["base"], tool_choice=choice, max_tokens=None).choices[0]
        finish, name, arguments = reply.finish_reason, reply.message.tool_calls[0].function.name, \
            reply.message.tool_calls[0].function.arguments
    assert finish == "tool_calls" and name == "unblock_pin"
    args = json.loads(arguments)  # the random base model's arguments parse under the schema
    assert set(args) == {"card"} and isinstance(args["card"], str)


def test_required_calls_one_of_the_tools_and_none_answers_text(live):
    reply = ask(live, model=live["base"], tool_choice="required").choices[0]
    assert reply.finish_reason == "tool_calls"
    assert reply.message.tool_calls[0].function.name in {"track_card", "unblock_pin"}
    json.loads(reply.message.tool_calls[0].function.arguments)
    text = ask(live, tool_choice="none", max_completion_tokens=5).choices[0]
    assert text.finish_reason in ("stop", "length") and not text.message.tool_calls


def test_a_conversation_with_tool_results_is_answered(live):
    c = live["client"]
    first = ask(live)
    messages = [{"role": "user", "content": live["rows"][-1]["text"]}, first.choices[0].message.model_dump(),
                {"role": "tool", "tool_call_id": first.choices[0].message.tool_calls[0].id, "content": "done"}]
    reply = c.chat.completions.create(model=live["model"], messages=messages, tools=TOOLS, max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize(("kw", "param"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": "track_card"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_requests_are_400s_naming_the_param(live, kw, param):
    with pytest.raises(openai.BadRequestError) as exc:
        live["client"].chat.completions.create(model=live["model"], messages=[{"role": "user", "content": "x"}],
                                               max_tokens=2, **kw)
    assert exc.value.body["param"] == param and exc.value.body["type"] == "invalid_request_error"


def test_an_unanswered_tool_call_is_a_400_on_messages(live):
    call = {"id": "call_1", "type": "function", "function": {"name": "track_card", "arguments": "{}"}}
    with pytest.raises(openai.BadRequestError) as exc:
        live["client"].chat.completions.create(model=live["model"], tools=TOOLS, max_tokens=2, messages=[
            {"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]},
            {"role": "user", "content": "and?"}])
    assert exc.value.body["param"] == "messages" and "tool_call_without_tool_message" in exc.value.body["message"]
