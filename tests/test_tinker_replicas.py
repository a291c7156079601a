"""The Tinker API across two `tunesmith serve` processes on one PostgreSQL and one data folder: a future is answered
through either replica, a sampling session made on one samples on the other, samples recorded on one are trained on
(stable_reinforce) by the run the other holds, another key finds none of it, a training call sent to the replica
that does not hold the run says so, and a future whose replica is killed before it ends is said to be lost, through
the other, once that replica's presence has run out."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from contextlib import ExitStack

import httpx
import pytest

from .test_serve_replicas_kill import replica
from .test_tinker_api import rl_datum

KEYS = ("key-a", "key-b")
pytestmark = [pytest.mark.slow, pytest.mark.replicas]  # several servers on one PostgreSQL: make test-replicas


def post(root: str, route: str, body: dict | bytes, key: str = "tml-key-a") -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{root}/api/v1/{route}", content=body, timeout=60,
                          headers={"X-API-Key": key, "Content-Type": "application/x-protobuf"})
    return httpx.post(f"{root}/api/v1/{route}", json=body, headers={"X-API-Key": key}, timeout=60)


def retrieved(root: str, rid: str, key: str = "tml-key-a", timeout: float = 120) -> httpx.Response:
    """The future's answer through ``root`` (polled while it says try_again)."""
    deadline = time.time() + timeout
    while True:
        r = post(root, "retrieve_future", {"request_id": rid}, key)
        if r.headers["content-type"].startswith("application/json") and r.json().get("type") == "try_again":
            assert time.time() < deadline, "the future did not end in time"
            continue
        return r


def test_futures_sessions_and_recorded_samples_through_either_replica(tiny_model_dir, tmp_path, postgres,
                                                                       monkeypatch):
    import tinker
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto
    from tinker.proto.response_conv import deserialize_sample_response

    monkeypatch.setenv("TUNESMITH_LEASE_S", "6")  # a killed replica's presence runs out in seconds
    database, data_dir, base = postgres(), tmp_path / "shared", str(tiny_model_dir)
    with ExitStack() as stack:
        (url_a, proc_a), (url_b, _) = [stack.enter_context(replica(tiny_model_dir, data_dir, database,
                                                                  tmp_path / f"r{i}.log", KEYS)) for i in range(2)]
        a, b = url_a[:-3], url_b[:-3]
        with tinker.ServiceClient(base_url=a, api_key="tml-key-a") as service:  # closed before A is killed
            training = service.create_lora_training_client(base_model=base, rank=4, seed=1).result()
            tokenizer = training.get_tokenizer()
            sampler = training.save_weights_and_get_sampling_client(record_stability_info=True).result()
            prompt = types.ModelInput.from_ints(tokenizer.encode("Question: what is two plus two? Answer:"))

            # sampled on B, in the session A made (sessions are rows of the store), retrieved through A
            asked = post(b, "asample", {"sampling_session_id": sampler._sampling_session_id, "num_samples": 2,
                                        "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt.to_ints()}]},
                                        "record_stability_info": True,
                                        "sampling_params": {"max_tokens": 5, "temperature": 1.0, "seed": 3}}).json()
            answer = retrieved(a, asked["request_id"])
            assert answer.headers["content-type"] == "application/x-protobuf", answer.text
            sampled = deserialize_sample_response(answer.content)
            sequences = [dataclasses.replace(s, sequence_id=sid)
                         for s, sid in zip(sampled.sequences, asked["sample_sequence_ids"], strict=True)]
            assert post(b, "retrieve_future", {"request_id": asked["request_id"]}, "tml-key-b").status_code == 404

            # recorded on B, trained on by the run A holds
            data = [rl_datum(prompt, sequences[0], 1.0), rl_datum(prompt, sequences[1], -1.0)]
            out = training.forward_backward(data, "stable_reinforce").result()
            expected = -(sum(sequences[0].logprobs) - sum(sequences[1].logprobs))
            assert out.metrics["loss:sum"] == pytest.approx(expected, abs=1e-3)

            # a training call sent to B, which does not hold the run: said, through either replica
            request = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
                data=data, loss_fn="stable_reinforce"), model_id=training.model_id, seq_id=99)
            body = forward_backward_request_to_proto(request).SerializeToString()
            elsewhere = post(b, "forward_backward", body).json()
            assert "not held by this replica" in retrieved(a, elsewhere["request_id"]).json()["error"]

        # a call still running on A when A is killed: through B, said lost once A's presence ran out
        session = post(a, "create_session", {"tags": [], "sdk_version": "0.38.0"}).json()["session_id"]
        made = post(a, "create_model", {"session_id": session, "model_seq_id": 0, "base_model": base,
                                         "lora_config": {"rank": 4}}).json()
        run = retrieved(b, made["request_id"]).json()["model_id"]
        tokens = tokenizer.encode("a long enough row of text to make a pass take a while " * 4)
        row = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                          loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
        heavy = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
            data=[row] * 600, loss_fn="cross_entropy"), model_id=run, seq_id=1)
        calls = [post(a, "forward_backward", forward_backward_request_to_proto(heavy).SerializeToString()).json()
                 for _ in range(4)]  # the last one surely not answered yet
        os.killpg(proc_a.pid, signal.SIGKILL)
        proc_a.wait()
        t0 = time.time()
        lost = retrieved(b, calls[-1]["request_id"], timeout=60).json()
        assert "The replica that took this forward_backward stopped" in lost["error"], lost
        assert lost["category"] == "server" and time.time() - t0 < 30
