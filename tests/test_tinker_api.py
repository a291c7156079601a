"""The Tinker API (tunesmith.serve.tinker) driven by the real ``tinker`` SDK (0.38.0), as a team's own training loop
would: a LoRA training client on the served base, cross_entropy and importance_sampling steps, AdamW steps, a
training state saved and loaded with its optimizer, sampler weights sampled from and served as a model on the OpenAI
API, another key kept out of all of it, and wrong calls answered with their reason."""

from __future__ import annotations

import math

import httpx
import numpy as np
import openai
import pytest

from tunesmith.serve.tinker import wire

from .conftest import tiny_server

KEYS = frozenset({"key-a", "key-b"})


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """A tiny-model server with two keys; yields (its root URL, the base's name, its data folder)."""
    from tunesmith.serve.store.quotas import Quotas

    data = tmp_path_factory.mktemp("tinker-data")  # one client of key A holds every test's runs: room for them all
    with tiny_server(tiny_model_dir, data, api_keys=KEYS, quotas=Quotas(tinker_runs=32)) as url:
        yield url[:-3], str(tiny_model_dir), data


@pytest.fixture(scope="module")
def service_a(served):
    import tinker

    with tinker.ServiceClient(base_url=served[0], api_key="tml-key-a") as client:
        yield client


def reference_logprobs(model_dir, tokens: list[int], targets: list[int]) -> np.ndarray:
    """The base model's log-probability of each target after its prefix, computed here with transformers alone."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(targets)[:, None])[:, 0].numpy()


def holding(app, training, rows):
    """A long forward of ``training``'s run, once it runs on the server (the calls sent next wait behind it)."""
    import time

    call = training.forward(rows, "cross_entropy")
    deadline = time.monotonic() + 30
    while not any(p.kind == "forward_backward" and p.started and not p.done.is_set()
                  for p in list(app.state.tinker.futures.items.values())):
        assert time.monotonic() < deadline, "the long call never started"
        time.sleep(0.005)
    return call


def datum(tokens: list[int], weights: list[float]):
    from tinker import types

    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]})


def example(tokenizer) -> tuple[list[int], list[float]]:
    prompt = tokenizer.encode("Classify the message: my card has not arrived")
    answer = tokenizer.encode(" card_arrival")
    return prompt + answer, [0.0] * len(prompt) + [1.0] * len(answer)


# --- the wire, against the SDK's own codec ---------------------------------------------------------------------

def test_the_wire_reads_what_the_sdk_writes_and_writes_what_it_reads():
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto
    from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

    data = [types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7]),
                        loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [0.0, 0.5, 1.0]}),
            types.Datum(model_input=types.ModelInput.from_ints([1, 2]),
                        loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 1.0]})]
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy",
                                                          loss_fn_config={"scale": 2.0, "mode": "x"}),
        model_id="run-1", seq_id=7)
    read = wire.read_forward_backward(forward_backward_request_to_proto(request).SerializeToString())
    assert (read.model_id, read.seq_id, read.loss_fn, read.forward_only) == ("run-1", 7, "cross_entropy", False)
    assert read.config == {"scale": 2.0, "mode": "x"}
    assert [d.tokens for d in read.data] == [[5, 6, 7], [1, 2]]
    assert read.data[0].inputs["target_tokens"].tolist() == [6, 7, 8]
    assert read.data[0].inputs["weights"].tolist() == [0.0, 0.5, 1.0]

    out = deserialize_forward_backward_output(wire.forward_backward_output(
        {"logprobs": [np.array([-1.0, -2.0, -3.0]), np.array([-0.5, -0.25])]}, {"loss:sum": 6.75}))
    assert out.metrics == {"loss:sum": 6.75}
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-1.0, -2.0, -3.0], [-0.5, -0.25]]

    answer = deserialize_sample_response(wire.sample_response(
        [wire.Sequence([4, 5], [-0.1, -0.2], stopped=True), wire.Sequence([6], [-0.3], stopped=False)],
        prompt_logprobs=[None, -1.5]))
    assert [(s.tokens, s.stop_reason) for s in answer.sequences] == [([4, 5], "stop"), ([6], "length")]
    assert np.allclose(answer.sequences[0].logprobs, [-0.1, -0.2])
    assert answer.prompt_logprobs == [None, -1.5]


def test_a_message_the_schema_cannot_be_is_refused_naming_where():
    with pytest.raises(wire.WireError, match="wire type 3"):
        wire.read_forward_backward(bytes([0x1B]))  # field 3 with a group start: never in this schema
    with pytest.raises(wire.WireError, match="past the end"):
        wire.read_forward_backward(bytes([0x0A, 0x05, 0x61]))  # model_id says 5 bytes, 1 follows


# --- a training loop through the SDK ---------------------------------------------------------------------------

def test_a_supervised_loop_trains_saves_loads_and_samples(served, service_a):
    from tinker import types

    root, base, _ = served
    training = service_a.create_lora_training_client(base_model=base, rank=8, seed=0).result()
    tokenizer = training.get_tokenizer()
    tokens, weights = example(tokenizer)
    batch = [datum(tokens, weights)]

    # the first step's loss is the base's weighted NLL (LoRA's B starts at zero), as transformers computes it
    expected = reference_logprobs(base, tokens[:-1], tokens[1:])
    first = training.forward_backward(batch, "cross_entropy").result()
    assert first.metrics["loss:sum"] == pytest.approx(-float((expected * np.array(weights[1:])).sum()), abs=1e-4)
    assert np.allclose(first.loss_fn_outputs[0]["logprobs"].to_numpy(), expected, atol=1e-4)
    step = training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert step.metrics["grad_norm:mean"] > 0

    losses = [first.metrics["loss:sum"]]
    for _ in range(7):
        losses.append(training.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"])
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert losses[-1] < 0.5 * losses[0] and min(losses[4:]) < min(losses[:4]), losses

    # a training state with its optimizer: a new client from it steps exactly as the original does
    state = training.save_state("after-5").result().path
    assert state.endswith("/weights/after-5")
    restored = service_a.create_training_client_from_state_with_optimizer(state).result()
    for client in (training, restored):
        client.forward_backward(batch, "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = [c.forward(batch, "cross_entropy").result().metrics["loss:sum"] for c in (training, restored)]
    assert after[0] == pytest.approx(after[1], abs=1e-5)

    # sampler weights: sampled through the SDK with the logprobs a forward computes
    path = training.save_weights_for_sampler("final").result().path
    sampler = service_a.create_sampling_client(model_path=path).result()
    prompt = types.ModelInput.from_ints(tokens[:-2])
    got = sampler.sample(prompt=prompt, num_samples=2,
                         sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=3)).result()
    assert len(got.sequences) == 2 and all(len(s.tokens) >= 1 for s in got.sequences)
    seq = got.sequences[0]
    scored = training.forward([datum(tokens[:-2] + seq.tokens, [0.0] * (len(tokens) - 2) + [1.0] * len(seq.tokens))],
                              "cross_entropy").result()
    assert np.allclose(scored.loss_fn_outputs[0]["logprobs"].to_numpy()[-len(seq.tokens):], seq.logprobs, atol=1e-3)
    prompt_scores = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert prompt_scores[0] is None and len(prompt_scores) == len(tokens)

    # the same checkpoint is a model of the key on the OpenAI API
    client = openai.OpenAI(base_url=f"{root}/v1", api_key="key-a")
    assert path in [m.id for m in client.models.list()]
    answer = client.chat.completions.create(model=path, max_tokens=4, temperature=0,
                                            messages=[{"role": "user", "content": "my card has not arrived"}])
    assert answer.choices[0].message.content is not None

    runs = httpx.get(f"{root}/api/v1/training_runs", headers={"X-API-Key": "tml-key-a"}).json()
    assert {r["training_run_id"] for r in runs["training_runs"]} >= {training.model_id, restored.model_id}
    listed = httpx.get(f"{root}/api/v1/training_runs/{training.model_id}/checkpoints",
                       headers={"X-API-Key": "tml-key-a"}).json()
    assert {c["tinker_path"] for c in listed["checkpoints"]} == {state, path}
    mine = httpx.get(f"{root}/api/v1/checkpoints", params={"limit": 1},
                     headers={"X-API-Key": "tml-key-a"}).json()
    assert len(mine["checkpoints"]) == 1 and mine["cursor"]["total_count"] >= 2


def test_importance_sampling_weighs_each_token_by_its_ratio_and_advantage(served, service_a):
    from tinker import types

    root, base, _ = served
    training = service_a.create_lora_training_client(base_model=base, rank=4, seed=1).result()
    tokens, _ = example(training.get_tokenizer())
    logp = reference_logprobs(base, tokens[:-1], tokens[1:])
    sampling_logp = logp - 0.1  # as if sampled from a slightly different policy
    advantages = np.linspace(-1.0, 1.0, len(logp)).astype(np.float32)
    d = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:], "logprobs": sampling_logp.tolist(),
                                    "advantages": advantages.tolist()})
    out = training.forward_backward([d], "importance_sampling").result()
    assert out.metrics["loss:sum"] == pytest.approx(-float((math.exp(0.1) * advantages).sum()), abs=1e-3)


def test_ppo_and_cispo_clip_the_ratio_as_documented_and_ppo_stops_the_gradient_past_its_clip(served, service_a):
    """A ratio of e^0.5 (1.65) with positive advantages: PPO's objective is clipped at 1.2 (its gradient zero: the
    step changes nothing), CISPO weighs logp by the clipped ratio, detached (its gradient flows); both per token, summed
    (the SDK documentation's formulas), with the thresholds taken from loss_fn_config."""
    from tinker import types

    root, base, _ = served
    training = service_a.create_lora_training_client(base_model=base, rank=4, seed=2).result()
    tokens, _ = example(training.get_tokenizer())
    logp = reference_logprobs(base, tokens[:-1], tokens[1:])
    advantages = np.linspace(0.5, 1.0, len(logp)).astype(np.float32)
    d = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:], "logprobs": (logp - 0.5).tolist(),
                                    "advantages": advantages.tolist()})
    ratio = math.exp(0.5)

    ppo = training.forward_backward([d], "ppo").result()
    assert ppo.metrics["loss:sum"] == pytest.approx(-float((1.2 * advantages).sum()), abs=1e-3)
    assert training.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["grad_norm:mean"] == 0.0
    wider = training.forward_backward([d], "ppo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}).result()
    assert wider.metrics["loss:sum"] == pytest.approx(-float((ratio * advantages).sum()), rel=1e-3)
    training.optim_step(types.AdamParams(learning_rate=0.0)).result()  # clears the gradients

    cispo = training.forward_backward([d], "cispo").result()  # one-sided by default: 1.65 is under 4.0
    assert cispo.metrics["loss:sum"] == pytest.approx(-float((ratio * logp * advantages).sum()), rel=1e-3)
    capped = training.forward_backward([d], "cispo", {"clip_high_threshold": 1.2}).result()
    assert capped.metrics["loss:sum"] == pytest.approx(-float((1.2 * logp * advantages).sum()), rel=1e-3)
    assert training.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["grad_norm:mean"] > 0

    with pytest.raises(Exception, match="clip_low_threshold 1.5 and clip_high_threshold 1.2"):
        training.forward_backward([d], "ppo", {"clip_low_threshold": 1.5}).result()
    with pytest.raises(Exception, match=r"loss_fn_config \['beta'\] is not supported for cispo"):
        training.forward_backward([d], "cispo", {"beta": 0.1}).result()
    with pytest.raises(Exception, match="loss_fn 'dro' is not supported here"):
        training.forward_backward([d], "dro").result()


def rl_datum(prompt, sequence, advantage: float, logprobs: bool = True, on_prompt: float = 0.0):
    """A datum as tinker-cookbook's rl_loop builds one for stable_reinforce: the prompt and the sampled tokens but
    the last as input, targets 0 on the prompt, the sampled tokens' advantage, and provenance naming the sequence."""
    import torch
    from tinker import TensorData, types
    from tinker_cookbook.recipes.rl_loop import with_sampled_provenance

    ob = prompt.length - 1
    model_input = prompt.append(types.EncodedTextChunk(tokens=sequence.tokens[:-1]))
    inputs = {"target_tokens": TensorData.from_torch(torch.tensor([0] * ob + sequence.tokens)),
              "advantages": TensorData.from_torch(torch.tensor([on_prompt] * ob + [advantage] * len(sequence.tokens)))}
    if logprobs:
        inputs["logprobs"] = TensorData.from_torch(torch.tensor([0.0] * ob + sequence.logprobs))
    return with_sampled_provenance(types.Datum(model_input=model_input, loss_fn_inputs=inputs), prompt.length,
                                   len(sequence.tokens), sequence.sequence_id)


def test_stable_reinforce_trains_on_the_logprobs_recorded_when_sampling_and_checks_every_claim(served, service_a):
    """Sampled with record_stability_info, trained as the cookbook's rl_loop trains: on policy, each sampled token's
    loss is -A·logp (the recorded logprob its own), its sum the server's; kl_coeff adds its term; a datum whose
    provenance or inputs disagree with the record is refused naming the position; another key's or another session's
    sequences are not found."""
    import dataclasses

    import tinker
    from tinker import types

    root, base, _ = served
    training = service_a.create_lora_training_client(base_model=base, rank=4, seed=3).result()
    tokenizer = training.get_tokenizer()
    sampler = training.save_weights_and_get_sampling_client(record_stability_info=True).result()
    prompt = types.ModelInput.from_ints(tokenizer.encode("Question: what is two plus two? Answer:"))
    sampled = sampler.sample(prompt, num_samples=2, sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0,
                                                                                         seed=5)).result()
    one, two = sampled.sequences
    assert one.sequence_id != two.sequence_id and len(one.tokens) > 1
    data = [rl_datum(prompt, one, 1.0), rl_datum(prompt, two, -0.5)]

    out = training.forward_backward(data, "stable_reinforce").result()
    expected = -(sum(one.logprobs) * 1.0 + sum(two.logprobs) * -0.5)  # on policy: weight 1, logp the recorded one
    assert out.metrics["loss:sum"] == pytest.approx(expected, abs=1e-3)
    kl = training.forward_backward(data, "stable_reinforce", {"kl_coeff": 0.5}).result()
    assert kl.metrics["loss:sum"] == pytest.approx(expected, abs=1e-3)  # on policy, q − logp is 0
    assert training.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["grad_norm:mean"] > 0
    moved = training.forward_backward(data[:1], "stable_reinforce").result()  # the learner moved: r = exp(logp − q)
    logp = moved.loss_fn_outputs[0]["logprobs"].to_numpy()[prompt.length - 1:]
    weight = np.minimum(np.exp(logp - np.asarray(one.logprobs)), 2.0)
    assert moved.metrics["loss:sum"] == pytest.approx(-float((weight * logp).sum()), abs=1e-3)
    training.optim_step(types.AdamParams(learning_rate=0.0)).result()

    def refused(datum, match):
        with pytest.raises(tinker.RequestFailedError, match=match):
            training.forward_backward([datum], "stable_reinforce").result()

    refused(dataclasses.replace(rl_datum(prompt, one, 1.0), model_input_spans=None, loss_fn_input_spans=None),
            "needs provenance")
    wrong = dataclasses.replace(one, tokens_np=None, _tokens_list=[one.tokens[0] + 1, *one.tokens[1:]])
    refused(rl_datum(prompt, wrong, 1.0), r"model_input\[\d+\] is \d+, but its span names token")
    last = dataclasses.replace(one, tokens_np=None, _tokens_list=[*one.tokens[:-1], one.tokens[-1] + 1])
    refused(rl_datum(prompt, last, 1.0), r"target_tokens'\]\[\d+\] is \d+, but its span names sampled token")
    refused(rl_datum(prompt, one, 1.0, on_prompt=1.0), r"advantages'\]\[0\] is not 0 on a prompt position")
    drifted = dataclasses.replace(one, logprobs_np=None, _logprobs_list=[x - 0.5 for x in one.logprobs])
    refused(rl_datum(prompt, drifted, 1.0), r"loss_fn_inputs\['logprobs'\]\[\d+\] .* was sampled with")
    assert training.forward_backward([rl_datum(prompt, one, 1.0, logprobs=False)], "stable_reinforce").result()
    unknown = dataclasses.replace(one, sequence_id="seq-nothing:0")
    refused(rl_datum(prompt, unknown, 1.0), "is not recorded for this key")
    with pytest.raises(tinker.RequestFailedError, match=r"loss_fn_config \['beta'\] is not supported"):
        training.forward_backward(data, "stable_reinforce", {"beta": 1.0}).result()
    with pytest.raises(tinker.RequestFailedError, match="only stable_reinforce reads"):
        training.forward_backward(data, "importance_sampling").result()

    with tinker.ServiceClient(base_url=root, api_key="tml-key-a") as other_session:
        elsewhere = other_session.create_lora_training_client(base_model=base, rank=4).result()
        with pytest.raises(tinker.RequestFailedError, match="sampled in another session"):
            elsewhere.forward_backward(data, "stable_reinforce").result()
    with tinker.ServiceClient(base_url=root, api_key="tml-key-b") as other_key:
        theirs = other_key.create_lora_training_client(base_model=base, rank=4).result()
        with pytest.raises(tinker.RequestFailedError, match="is not recorded for this key"):
            theirs.forward_backward(data, "stable_reinforce").result()


# --- keys, and calls the server refuses ------------------------------------------------------------------------

def post(root: str, route: str, body: dict, key: str = "tml-key-b") -> httpx.Response:
    return httpx.post(f"{root}/api/v1/{route}", json=body, headers={"X-API-Key": key}, timeout=60)


def listed_owner(root: str, key: str) -> str:
    """The owner id the server shows for ``key``'s runs (one of its runs listed)."""
    runs = httpx.get(f"{root}/api/v1/training_runs", headers={"X-API-Key": key}).json()["training_runs"]
    return runs[0]["model_owner"]


def test_another_key_reaches_nothing_of_a_keys_runs_futures_and_checkpoints(served, service_a):
    root, base, _ = served
    training = service_a.create_lora_training_client(base_model=base, rank=4).result()
    path = training.save_weights_for_sampler("for-a").result().path
    submitted = post(root, "optim_step", {"model_id": training.model_id, "adam_params": {}}, key="tml-key-a").json()

    assert post(root, "retrieve_future", {"request_id": submitted["request_id"]}).status_code == 404
    assert post(root, "get_info", {"model_id": training.model_id}).status_code == 404
    listed = httpx.get(f"{root}/api/v1/training_runs", headers={"X-API-Key": "tml-key-b"}).json()["training_runs"]
    assert all(r["model_owner"] != listed_owner(root, "tml-key-a") for r in listed) and training.model_id not in [
        r["training_run_id"] for r in listed]
    assert httpx.get(f"{root}/api/v1/training_runs/{training.model_id}/checkpoints",
                     headers={"X-API-Key": "tml-key-b"}).status_code == 404
    sample = post(root, "asample", {"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                                    "sampling_params": {"max_tokens": 2}, "model_path": path})
    assert sample.status_code == 404 and "No checkpoint" in sample.json()["error"]["message"]  # before it is queued
    steal = post(root, "optim_step", {"model_id": training.model_id, "adam_params": {}})
    assert steal.status_code == 404 and "No training run" in steal.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{root}/v1", api_key="key-b").chat.completions.create(
            model=path, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    # the key's own future still answers it, once
    done = post(root, "retrieve_future", {"request_id": submitted["request_id"]}, key="tml-key-a").json()
    assert "metrics" in done


def test_wrong_calls_are_refused_with_their_reason(served, service_a):
    import tinker
    from tinker import types

    root, base, _ = served
    no_key = httpx.post(f"{root}/api/v1/create_session", json={"tags": [], "sdk_version": "0.38.0"})
    assert no_key.status_code == 401 and "X-API-Key" in no_key.json()["error"]["message"]
    assert post(root, "create_session", {"tags": [], "sdk_version": "0.38.0"}, key="key-b").status_code == 200
    unknown = post(root, "create_session", {"tags": [], "sdk_version": "0.38.0", "billing_tier": "x"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "billing_tier"
    assert "copy_weights" in post(root, "copy_weights", {}).json()["error"]["message"]

    with pytest.raises(Exception, match="not served here"):
        service_a.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=4).result()
    runs = httpx.get(f"{root}/api/v1/training_runs", headers={"X-API-Key": "tml-key-a"}).json()["cursor"]["total_count"]
    with pytest.raises(tinker.BadRequestError, match=r"lora_config\.rank: Input should be greater than or equal to 1"):
        service_a.create_lora_training_client(base_model=base, rank=0).result()
    assert httpx.get(f"{root}/api/v1/training_runs",  # a wrong lora_config writes no run
                     headers={"X-API-Key": "tml-key-a"}).json()["cursor"]["total_count"] == runs
    training = service_a.create_lora_training_client(base_model=base, rank=4).result()
    tokens, weights = example(training.get_tokenizer())
    with pytest.raises(tinker.RequestFailedError, match="loss_fn 'dro' is not supported"):
        training.forward_backward([datum(tokens, weights)], "dro").result()
    lacking = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                          loss_fn_inputs={"target_tokens": tokens[1:]})
    with pytest.raises(tinker.RequestFailedError, match=r"lacks \['weights'\]"):
        training.forward_backward([lacking], "cross_entropy").result()
    outside = types.Datum(model_input=types.ModelInput.from_ints([*tokens[:-2], 10**6]),
                          loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]})
    with pytest.raises(tinker.RequestFailedError, match=r"data\[0\]\.model_input\[\d+\]: 1000000 is not a token id"):
        training.forward_backward([outside], "cross_entropy").result()
    sample = post(root, "asample", {"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 10**6]}]},
                                    "sampling_params": {"max_tokens": 2}, "base_model": base}, key="tml-key-a")
    assert sample.status_code == 400  # checked before its rows are queued: no future
    assert "prompt token 1 (1000000) is not a token id" in sample.json()["error"]["message"]
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds: Input should be greater than or equal to 3600"):
        training.save_weights_for_sampler("short", ttl_seconds=60).result()


def test_a_key_with_many_calls_queued_does_not_hold_back_another_keys_call(served, service_a):
    """Calls take turns on the one base, keys served in turn: key B's single step is answered while key A still
    has most of its twelve queued."""
    import threading
    import time

    import tinker

    root, base, _ = served
    a = service_a.create_lora_training_client(base_model=base, rank=8).result()
    with tinker.ServiceClient(base_url=root, api_key="tml-key-b") as service_b:
        b = service_b.create_lora_training_client(base_model=base, rank=8).result()
        tokens, weights = example(a.get_tokenizer())
        batch = [datum(tokens * 8, weights * 8)] * 96  # a call of a few hundred milliseconds (its datums share passes)
        ended: dict[str, float] = {}
        a_futures = [a.forward_backward(batch, "cross_entropy") for _ in range(12)]

        def watch(name, fut):
            fut.result()
            ended[name] = time.monotonic()

        watchers = [threading.Thread(target=watch, args=(f"a{i}", f)) for i, f in enumerate(a_futures)]
        for w in watchers:
            w.start()
        time.sleep(0.5)  # A's twelve submitted (each is answered with a future at once)
        watch("b", b.forward_backward(batch, "cross_entropy"))
        for w in watchers:
            w.join(120)
    done_before_b = sum(1 for i in range(12) if ended[f"a{i}"] < ended["b"])
    assert done_before_b <= 5, (done_before_b, ended)  # first come, first served: all twelve


def test_a_sampler_checkpoint_exports_merged_with_its_output_layer_change_kept_apart(served, service_a, tmp_path):
    """``tunesmith export`` of a sampler checkpoint's folder (LoRA on every layer, the output one tied to the input
    embeddings in this base): the merged model answers as the adapter does, and its input embeddings are the base's."""
    import torch
    from peft import PeftModel
    from tinker import types
    from transformers import AutoModelForCausalLM

    from tunesmith.cli import app

    _, base, data = served
    training = service_a.create_lora_training_client(base_model=base, rank=8, seed=2).result()
    tokens, weights = example(training.get_tokenizer())
    for _ in range(3):
        training.forward_backward([datum(tokens, weights)], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    path = training.save_weights_for_sampler("to-export").result().path
    (folder,) = data.glob("tinker/keys/*/*/sampler_weights/to-export")
    assert path.endswith("/sampler_weights/to-export")  # the checkpoint's folder on the data folder

    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["export", str(folder), "--merged", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                        str(folder)).eval()
    ids = torch.tensor([tokens])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4)
        assert not torch.allclose(merged(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-3)
    assert torch.equal(merged.get_input_embeddings().weight, plain.get_input_embeddings().weight)



def test_a_keys_runs_are_bounded_and_let_go_when_its_client_closes(tiny_model_dir, tmp_path):
    import tinker

    from tunesmith.serve.store.quotas import Quotas

    with tiny_server(tiny_model_dir, tmp_path / "data", api_keys=KEYS, quotas=Quotas(tinker_runs=1)) as url:
        root, base = url[:-3], str(tiny_model_dir)
        with tinker.ServiceClient(base_url=root, api_key="tml-key-a") as first:
            held = first.create_lora_training_client(base_model=base, rank=4).result()
            state = held.save_state("kept").result().path
            with pytest.raises(Exception, match=r"holds 1 training runs here \(at most 1, --quota tinker_runs\)"):
                first.create_lora_training_client(base_model=base, rank=4).result()
            with tinker.ServiceClient(base_url=root, api_key="tml-key-b") as other:  # another key is not held back
                other.create_lora_training_client(base_model=base, rank=4).result()
        with tinker.ServiceClient(base_url=root, api_key="tml-key-a") as second:  # the first client's run let go
            resumed = second.create_training_client_from_state_with_optimizer(state).result()
            assert resumed.get_info().model_data.model_name == base
        step = post(root, "optim_step", {"model_id": held.model_id, "adam_params": {}}, key="tml-key-a")
        assert step.status_code == 410 and "was finished" in step.json()["error"]["message"]


def test_a_custom_loss_from_the_client_trains_as_the_same_loss_on_the_server(served, service_a):
    """forward_backward_custom (the loss computed by the SDK from a forward's logprobs, its gradients sent back as
    cross_entropy weights) steps a run exactly as cross_entropy steps its twin."""
    from tinker import types

    _, base, _ = served
    def custom(data, logprobs):
        loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs, strict=True))
        return loss, {"custom:sum": float(loss)}

    twins = [service_a.create_lora_training_client(base_model=base, rank=4, seed=7).result() for _ in range(2)]
    tokens, weights = example(twins[0].get_tokenizer())
    batch = [datum(tokens, weights)]
    outs = [twins[0].forward_backward(batch, "cross_entropy").result(),
            twins[1].forward_backward_custom(batch, custom).result()]
    assert outs[1].metrics["loss:sum"] == pytest.approx(outs[0].metrics["loss:sum"], abs=1e-4)
    for twin in twins:
        twin.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = [t.forward(batch, "cross_entropy").result().metrics["loss:sum"] for t in twins]
    assert after[1] == pytest.approx(after[0], abs=1e-4) and after[0] < outs[0].metrics["loss:sum"]


def test_the_base_samples_through_a_sampling_session_and_a_checkpoint_saved_again_is_sampled_anew(served, service_a):
    from tinker import types

    root, base, _ = served
    training = service_a.create_lora_training_client(base_model=base, rank=4, seed=3).result()
    tokens, weights = example(training.get_tokenizer())
    prompt = types.ModelInput.from_ints(tokens[:-2])
    greedy = types.SamplingParams(max_tokens=4, temperature=0.0)
    plain = service_a.create_sampling_client(base_model=base).result()
    from_base = plain.sample(prompt=prompt, num_samples=1, sampling_params=greedy).result().sequences[0]

    path = training.save_weights_for_sampler("again").result().path  # B at zero: the base's answer
    first = service_a.create_sampling_client(model_path=path).result()
    assert first.sample(prompt=prompt, num_samples=1, sampling_params=greedy).result().sequences[0].tokens == \
        from_base.tokens
    for _ in range(6):
        training.forward_backward([datum(tokens, weights)], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    httpx.delete(f"{root}/api/v1/training_runs/{training.model_id}/checkpoints/sampler_weights/again",
                 headers={"X-API-Key": "tml-key-a"}).raise_for_status()
    assert training.save_weights_for_sampler("again").result().path == path  # the same path, new weights
    again = service_a.create_sampling_client(model_path=path).result()
    trained = again.sample(prompt=prompt, num_samples=1, sampling_params=greedy).result().sequences[0].tokens
    assert trained != from_base.tokens  # the weights saved last, not the first ones still loaded


def both_waiting(futures) -> None:
    """At a turn point while one key's call waits, a moment for the second key's (sent right after it) to arrive, so
    that the turn finds both waiting: the two calls are sent one after the other, and a tiny model's turn points come
    every few milliseconds."""
    import time

    turn = futures.others_turn

    def later():
        deadline = time.monotonic() + 5
        while sum(1 for queue in futures.waiting.values() if queue) == 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        return turn()

    futures.others_turn = later


def test_two_keys_steps_waiting_together_run_as_one_step_each_run_learning_from_its_own_rows(tiny_model_dir,
                                                                                              tmp_path):
    """Key A's and key B's forward_backward calls, waiting together behind key C's long call, run as one step on the
    base at its first turn point (each row through its own run's adapter, the server's default): each answer is what
    the base gives its own data, and after an AdamW step B's run is exactly a run trained alone on B's data (its
    gradients came from its rows only). A call too large to share a pass with them runs alone."""
    import tinker
    from tinker import types

    from tunesmith.serve.app import ServeSettings, create_app
    from tunesmith.serve.engines.builtin import Engine

    from .conftest import running_server

    app = create_app(ServeSettings(model=str(tiny_model_dir), data_dir=tmp_path,
                                   api_keys=frozenset({"key-a", "key-b", "key-c"})),
                     Engine(str(tiny_model_dir), {}, max_batch=4, wait_ms=1))
    base = str(tiny_model_dir)
    with running_server(app) as url, tinker.ServiceClient(base_url=url[:-3], api_key="tml-key-a") as sa, \
            tinker.ServiceClient(base_url=url[:-3], api_key="tml-key-b") as sb, \
            tinker.ServiceClient(base_url=url[:-3], api_key="tml-key-c") as sc:
        a = sa.create_lora_training_client(base_model=base, rank=4, seed=3).result()
        b = sb.create_lora_training_client(base_model=base, rank=4, seed=3).result()
        c = sc.create_lora_training_client(base_model=base, rank=4, seed=3).result()
        alone = sb.create_lora_training_client(base_model=base, rank=4, seed=3).result()
        tokens, weights = example(a.get_tokenizer())
        data_a = [datum(tokens, weights)]
        data_b = [datum(tokens[:-2], weights[:-2]), datum(tokens[2:], weights[2:])]
        both_waiting(app.state.tinker.futures)
        long_call = holding(app, c, [datum(tokens * 8, weights * 8)] * 16)  # holds the base a while
        fa, fb = a.forward_backward(data_a, "cross_entropy"), b.forward_backward(data_b, "cross_entropy")
        long_call.result()
        out_a, out_b = fa.result(), fb.result()
        assert app.state.tinker.futures.fused_steps == 1
        for out, data in ((out_a, data_a), (out_b, data_b)):
            for got, d in zip(out.loss_fn_outputs, data, strict=True):
                t = d.model_input.to_ints()
                want = reference_logprobs(base, t, d.loss_fn_inputs["target_tokens"].tolist())
                assert np.allclose(got["logprobs"].to_numpy(), want, atol=1e-4)
        assert out_b.metrics["loss:sum"] == pytest.approx(alone.forward_backward(data_b, "cross_entropy").result()
                                                          .metrics["loss:sum"], abs=1e-5)
        adam = types.AdamParams(learning_rate=1e-2)
        for run in (a, b, alone):
            run.optim_step(adam).result()
        after_b = b.forward(data_b, "cross_entropy").result().metrics["loss:sum"]
        after_alone = alone.forward(data_b, "cross_entropy").result().metrics["loss:sum"]
        assert after_b == pytest.approx(after_alone, abs=1e-5) and after_b < out_b.metrics["loss:sum"]

        steps = app.state.tinker.futures.fused_steps  # a wrong call in a step of two keys fails alone
        long_call = holding(app, c, [datum(tokens * 8, weights * 8)] * 16)
        wrong, right = a.forward_backward(data_a, "dro"), b.forward_backward(data_b, "cross_entropy")
        long_call.result()
        with pytest.raises(Exception, match="loss_fn 'dro' is not supported here"):
            wrong.result()
        assert right.result().metrics["loss:sum"] == pytest.approx(after_b, abs=1e-5)
        assert app.state.tinker.futures.fused_steps == steps + 1

        steps = app.state.tinker.futures.fused_steps  # a call of more than a pass's tokens joins no step
        long_call = holding(app, c, [datum(tokens * 8, weights * 8)] * 16)
        large = [datum(tokens * 8, weights * 8)] * 8
        assert sum(len(d.model_input.to_ints()) for d in large) > 1024
        fa, fb = a.forward(large, "cross_entropy"), b.forward(data_b, "cross_entropy")
        long_call.result()
        fa.result(), fb.result()
        assert app.state.tinker.futures.fused_steps == steps


def test_a_run_made_after_every_other_was_let_go_saves_and_trains(tiny_model_dir, tmp_path):
    """peft keeps a deleted adapter active when it was the last one and fails on it in later saves; the trainer makes
    the next adapter active (before, the next run's save_weights_for_sampler failed as a server error)."""
    from tunesmith.serve.tinker.trainer import Trainer

    trainer = Trainer(str(tiny_model_dir))
    trainer.create("first", 4, 0)
    trainer.drop("first")
    trainer.create("second", 4, 0)
    trainer.save_adapter("second", tmp_path / "second")
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    tokens, weights = example(trainer.tokenizer)
    d = wire.Datum(tokens[:-1], {"target_tokens": np.asarray(tokens[1:]), "weights": np.asarray(weights[1:], np.float32)})
    before = trainer.forward_backward("second", [d], "cross_entropy", {}, True)[1]["loss:sum"]
    trainer.optim_step("second", {"learning_rate": 1e-2})
    assert trainer.forward_backward("second", [d], "cross_entropy", {}, False)[1]["loss:sum"] < before


def engine_rows(app) -> list[tuple]:
    """Every submission to the server's engine from now on, as ``(model, tenant, rows)`` (a spy at the seam)."""
    engine, seen = app.state.engine, []
    submit = engine.submit

    def spied(model_id, prompt_ids, params, *args, **kwargs):
        seen.append((model_id, kwargs.get("tenant"), len(params)))
        return submit(model_id, prompt_ids, params, *args, **kwargs)

    engine.submit = spied
    return seen


def test_sample_calls_are_rows_of_the_engine_beside_a_long_training_call_each_as_if_alone(tiny_model_dir, tmp_path):
    """Sample calls of two keys sent while a long training call holds the trainer (a group of single calls, a
    num_samples=3 call, greedy calls of different prompts with a stop token, a seeded call, a wrong call) become rows
    of the server's inference engine as their keys' (not calls behind the training call): each sequence's logprobs are
    what transformers computes alone, each greedy answer is the one the call gets alone and the one the OpenAI
    completions route gives (cut after its stop token), the seeded call gives the same sequences again, and the
    wrong call is refused alone with its reason."""
    import tinker
    from tinker import types

    from tunesmith.serve.app import ServeSettings, create_app
    from tunesmith.serve.engines.builtin import Engine

    from .conftest import running_server

    app = create_app(ServeSettings(model=str(tiny_model_dir), data_dir=tmp_path, api_keys=KEYS),
                     Engine(str(tiny_model_dir), {}, max_batch=4, wait_ms=1))
    base = str(tiny_model_dir)
    with running_server(app) as url, tinker.ServiceClient(base_url=url[:-3], api_key="tml-key-a") as sa, \
            tinker.ServiceClient(base_url=url[:-3], api_key="tml-key-b") as sb:
        training = sa.create_lora_training_client(base_model=base, rank=4, seed=3).result()
        tokens, weights = example(training.get_tokenizer())
        short, long = types.ModelInput.from_ints(tokens[:4]), types.ModelInput.from_ints(tokens)
        greedy = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
        client_a = sa.create_sampling_client(base_model=base).result()
        client_b = sb.create_sampling_client(base_model=base).result()
        alone = {p.length: client_a.sample(p, 1, greedy).result().sequences[0].tokens for p in (short, long)}
        stop_at = alone[short.length][2]
        cut = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[stop_at])
        seeded = types.SamplingParams(max_tokens=6, temperature=1.0, seed=11)

        rows = engine_rows(app)
        long_call = holding(app, training, [datum(tokens * 8, weights * 8)] * 32)  # holds the trainer a while
        calls = [client_a.sample(long, 1, types.SamplingParams(max_tokens=6)) for _ in range(4)]
        calls += [client_b.sample(short, 3, types.SamplingParams(max_tokens=5, temperature=0.7)),
                  client_a.sample(short, 1, cut), client_b.sample(long, 1, greedy), client_a.sample(short, 2, seeded)]
        with pytest.raises(Exception, match="is not a token id of this model"):
            client_b.sample(types.ModelInput.from_ints([10**6]), 1, greedy).result()
        answers = [c.result() for c in calls]
        long_call.result()
        owners = {"key-a": listed_owner(url[:-3], "tml-key-a")}
        assert sorted((m, n) for m, _, n in rows) == sorted((base, n) for n in (1, 1, 1, 1, 3, 1, 1, 2))
        assert [t for _, t, _ in rows].count(owners["key-a"]) == 6  # each call: its key's rows

        assert [len(a.sequences) for a in answers] == [1, 1, 1, 1, 3, 1, 1, 2]
        prompts = [long] * 4 + [short, short, long, short]
        for answer, prompt in zip(answers, prompts, strict=True):
            for seq in answer.sequences:
                p = prompt.to_ints()
                want = reference_logprobs(base, p + seq.tokens, (p + seq.tokens)[1:])[len(p) - 1:]
                assert np.allclose(seq.logprobs, want, atol=1e-4)
        expected = alone[short.length][:alone[short.length].index(stop_at) + 1]
        assert answers[5].sequences[0].tokens == expected and answers[5].sequences[0].stop_reason == "stop"
        assert answers[6].sequences[0].tokens == alone[long.length]
        client = openai.OpenAI(base_url=url, api_key="key-b", max_retries=0)
        completion = client.completions.create(model=base, prompt=long.to_ints(), max_tokens=8, temperature=0)
        assert completion.choices[0].text == training.get_tokenizer().decode(alone[long.length])
        again = client_a.sample(short, 2, seeded).result()
        assert [s.tokens for s in again.sequences] == [s.tokens for s in answers[7].sequences]


def test_samples_of_several_weights_share_the_engines_steps_each_row_through_its_own(tiny_model_dir, tmp_path):
    """Two keys' sampler checkpoints (trained apart, so that they answer differently) and the base, sampled while a
    long sample of a third key runs: their rows join the engine's running batch and share its forward passes (each
    row through its own adapter), each greedy answer the one its weights give alone and each sampled token's logprob
    what a forward of its own run computes (1e-4)."""
    import time

    import tinker
    from tinker import types

    from tunesmith.serve.app import ServeSettings, create_app
    from tunesmith.serve.engines.builtin import Engine

    from .conftest import running_server

    app = create_app(ServeSettings(model=str(tiny_model_dir), data_dir=tmp_path, api_keys=KEYS | {"key-c"}),
                     Engine(str(tiny_model_dir), {}, max_batch=8, wait_ms=1))
    base = str(tiny_model_dir)
    with running_server(app) as url, tinker.ServiceClient(base_url=url[:-3], api_key="tml-key-a") as sa, \
            tinker.ServiceClient(base_url=url[:-3], api_key="tml-key-b") as sb, \
            tinker.ServiceClient(base_url=url[:-3], api_key="tml-key-c") as sc:
        runs = [service.create_lora_training_client(base_model=base, rank=4, seed=i).result()
                for i, service in enumerate((sa, sb))]
        tokens, _ = example(runs[0].get_tokenizer())
        for run, taught in zip(runs, (tokens[6], tokens[7]), strict=True):  # each run taught to repeat its own token
            target = tokens[:5] + [taught] * 8
            for _ in range(4):
                run.forward_backward([datum(target, [0.0] * 5 + [1.0] * 8)], "cross_entropy").result()
                run.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        clients = [run.save_weights_and_get_sampling_client().result() for run in runs]
        clients.append(sb.create_sampling_client(base_model=base).result())
        prompt = types.ModelInput.from_ints(tokens[:5])
        greedy = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
        alone = [c.sample(prompt, 1, greedy).result().sequences[0].tokens for c in clients]
        assert len({tuple(a) for a in alone}) == 3  # three weights, three answers

        batch, widest = app.state.engine.batch, []
        names = batch._adapter_names
        batch._adapter_names = lambda rows: widest.append(len({r.adapter for r in rows})) or names(rows)
        holder = sc.create_sampling_client(base_model=base).result().sample(  # a long row of a third key's
            prompt, 1, types.SamplingParams(max_tokens=200, temperature=0.0, stop=[]))
        deadline = time.monotonic() + 30
        while not batch.active:
            assert time.monotonic() < deadline, "the long sample never started"
            time.sleep(0.005)
        calls = [c.sample(prompt, 1, greedy) for c in clients]
        sampled = [c.sample(prompt, 2, greedy) for c in clients[:2]]
        together = [c.result().sequences[0].tokens for c in calls]
        assert not holder.done() or len(holder.result().sequences[0].tokens) == 200
        assert max(widest) >= 3  # one forward pass held rows of three weights
        assert together == alone
        for run, answer in zip(runs, sampled, strict=True):
            for seq in answer.result().sequences:
                scored = run.forward([datum(prompt.to_ints() + seq.tokens, [0.0] * 5 + [1.0] * len(seq.tokens))],
                                     "cross_entropy").result()
                assert np.allclose(scored.loss_fn_outputs[0]["logprobs"].to_numpy()[-len(seq.tokens):], seq.logprobs,
                                   atol=1e-4)
        holder.result()


def test_a_long_call_gives_another_keys_call_its_turn_between_two_passes(tiny_model_dir, tmp_path):
    """Key A's call of many passes over the base does not hold key B's small call to its end: B's runs between two
    of A's passes, is answered while A's still runs, and each answer is what the call gives alone."""
    import tinker

    from tunesmith.serve.app import ServeSettings, create_app

    from .conftest import running_server

    app = create_app(ServeSettings(model=str(tiny_model_dir), data_dir=tmp_path, api_keys=frozenset({"key-a", "key-b"})))
    base = str(tiny_model_dir)
    with running_server(app) as url, tinker.ServiceClient(base_url=url[:-3], api_key="tml-key-a") as sa, \
            tinker.ServiceClient(base_url=url[:-3], api_key="tml-key-b") as sb:
        a = sa.create_lora_training_client(base_model=base, rank=4, seed=3).result()
        b = sb.create_lora_training_client(base_model=base, rank=4, seed=3).result()
        tokens, weights = example(a.get_tokenizer())
        small = [datum(tokens, weights)]
        alone = b.forward(small, "cross_entropy").result().metrics["loss:sum"]
        futures = app.state.tinker.futures
        long_call = holding(app, a, [datum(tokens * 8, weights * 8)] * 300)  # ~50 passes of 1,024 tokens
        waiting = next(p for p in futures.items.values() if p.kind == "forward_backward" and p.started
                       and not p.done.is_set())
        got = b.forward(small, "cross_entropy").result().metrics["loss:sum"]
        assert not waiting.done.is_set(), "B's call waited for the whole of A's"
        assert futures.turns_between >= 1 and got == pytest.approx(alone, abs=1e-6)
        assert len(long_call.result().loss_fn_outputs) == 300


def test_other_keys_calls_run_between_two_layers_of_a_pass_forward_and_backward_and_change_nothing_of_it(
        tiny_model_dir):
    """One long datum is one pass: another key's forward_backward and optim_step, run between two of its decoder layers
    in the forward and between two slices of its output layer in the backward (nested on the pass's thread), leave the
    pass's losses and gradients those of the pass alone (its output layer whole), and their own answers those of the
    calls alone."""
    import torch

    from tunesmith.serve.tinker.trainer import Call, Trainer

    trainer = Trainer(str(tiny_model_dir))
    for name, seed in (("a", 1), ("a-alone", 1), ("b", 2), ("b-alone", 2)):
        trainer.create(name, 4, seed)
    tokens, weights = example(trainer.tokenizer)
    long = [5 + i % 97 for i in range(400)]

    def d(t, w):
        return wire.Datum(t[:-1], {"target_tokens": np.asarray(t[1:]), "weights": np.asarray(w[1:], np.float32)})

    def b_call(name):
        out = trainer.forward_backward(name, [d(tokens, weights)], "cross_entropy", {}, True)[1]["loss:sum"]
        trainer.optim_step(name, {"learning_rate": 1e-2})
        return out

    phases, answers = [], []

    def between():  # B's call before the second layer's forward, and after the last output slice's backward
        grad = torch.is_grad_enabled()
        phases.append(grad)
        if phases.count(grad) == (2 if grad else 1):
            answers.append(b_call("b"))
            return True
        return False

    got = trainer.forward_backward_many([Call("a", [d(long, [1.0] * len(long))], "cross_entropy", {}, True)],
                                        between=between)[0]
    want = trainer.forward_backward_many([Call("a-alone", [d(long, [1.0] * len(long))], "cross_entropy", {}, True)])[0]
    assert trainer.head_apart and phases.count(True) >= 2 + 4  # two layers, four slices of 128 positions
    assert True in phases and False in phases and len(answers) == 2  # forward and backward turns both taken
    assert got[1]["loss:sum"] == pytest.approx(want[1]["loss:sum"], rel=1e-6)
    assert np.allclose(got[0]["logprobs"][0], want[0]["logprobs"][0], atol=1e-5)
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    for n, g in grads.items():
        if ".a." in n:
            assert torch.allclose(g, grads[n.replace(".a.", ".a-alone.")], atol=1e-5), n
    assert answers == [pytest.approx(b_call("b-alone"), abs=1e-6), pytest.approx(b_call("b-alone"), abs=1e-6)]


def test_the_trainer_trains_on_the_engines_own_weights_and_leaves_them_as_served(tiny_model_dir, tmp_path):
    """One base in memory: the training runs' base is the builtin engine's own weight tensors (no copy), its losses
    the base's own; training and sampling a checkpoint on the engine (which wraps its own tree with peft) change
    neither the engine's weights nor its greedy answer nor what the trainer computes."""
    import tinker
    import torch
    from tinker import types

    from tunesmith.serve.app import ServeSettings, create_app
    from tunesmith.serve.engines.builtin import Engine

    from .conftest import running_server

    engine = Engine(str(tiny_model_dir), {}, wait_ms=1)
    app = create_app(ServeSettings(model=str(tiny_model_dir), data_dir=tmp_path, api_keys=KEYS), engine)
    served = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    base = str(tiny_model_dir)
    ask = {"model": base, "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": "pin blocked"}]}
    with running_server(app) as url, tinker.ServiceClient(base_url=url[:-3], api_key="tml-key-a") as sa:
        chat = openai.OpenAI(base_url=url, api_key="key-a", max_retries=0)
        answer = chat.chat.completions.create(**ask).choices[0].message.content
        training = sa.create_lora_training_client(base_model=base, rank=8, seed=0).result()
        trainer = app.state.tinker.trainer
        assert trainer.shares_base
        engine_tensors = {p.data_ptr() for p in engine.model.parameters()}
        frozen = [p for n, p in trainer.model.named_parameters() if "lora_" not in n]
        assert frozen and all(p.data_ptr() in engine_tensors for p in frozen)

        tokens, weights = example(training.get_tokenizer())
        batch = [datum(tokens, weights)]
        expected = reference_logprobs(base, tokens[:-1], tokens[1:])
        losses = []
        for _ in range(4):
            out = training.forward_backward(batch, "cross_entropy").result()
            losses.append(out.metrics["loss:sum"])
            training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        assert losses[0] == pytest.approx(-float((expected * np.array(weights[1:])).sum()), abs=1e-4)
        assert losses[-1] < losses[0]

        before = training.forward(batch, "cross_entropy").result().metrics["loss:sum"]
        path = training.save_weights_for_sampler("shared").result().path
        sampler = sa.create_sampling_client(model_path=path).result()
        sampler.sample(prompt=types.ModelInput.from_ints(tokens[:-2]), num_samples=2,
                       sampling_params=types.SamplingParams(max_tokens=4, temperature=0.0)).result()
        assert training.forward(batch, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(before, abs=1e-6)
        assert chat.chat.completions.create(**ask).choices[0].message.content == answer
    for name, tensor in engine.model.get_base_model().named_parameters() if hasattr(engine.model, "get_base_model") \
            else engine.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(tensor, served[name.replace(".base_layer", "")]), name
