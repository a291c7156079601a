"""The Tinker API across two `tunesmith serve` processes on one PostgreSQL and one data folder: a future is answered
through either replica, a sampling session made on one samples on the other, samples recorded on one are trained on
(stable_reinforce) by the run the other holds, another key finds none of it, a training call sent to the replica
that does not hold the run is applied by the one that does, and a run whose replica is killed is taken over by the
other from its last save, its calls told the step to resume from. The SDK's own loop runs through a per-request round
robin of the two replicas (as nginx or HAProxy set up by docs/serve.md would send it) and survives its holder's
SIGKILL."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from contextlib import ExitStack

import httpx
import pytest

from .round_robin import round_robin
from .test_serve_replicas_kill import replica, wait_for
from .test_tinker_api import datum, example, rl_datum

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

            # a training call sent to B, which does not hold the run: applied by A, answered through either replica;
            # the SDK's retry of it (the same seq_id) is the same call, not a second one
            request = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
                data=data, loss_fn="stable_reinforce"), model_id=training.model_id, seq_id=99)
            body = forward_backward_request_to_proto(request).SerializeToString()
            elsewhere = post(b, "forward_backward", body).json()
            assert post(a, "forward_backward", body).json()["request_id"] == elsewhere["request_id"]
            answered = retrieved(a, elsewhere["request_id"])
            assert answered.headers["content-type"] == "application/x-protobuf", answered.text
            assert retrieved(b, elsewhere["request_id"]).content == answered.content

        # a call still running on A when A is killed: through B, said lost once A's presence ran out
        session = post(a, "create_session", {"tags": [], "sdk_version": "0.38.0"}).json()["session_id"]
        made = post(a, "create_model", {"session_id": session, "model_seq_id": 0, "base_model": base,
                                         "lora_config": {"rank": 4}}).json()
        run = retrieved(b, made["request_id"]).json()["model_id"]
        tokens = tokenizer.encode("a long enough row of text to make a pass take a while " * 4)
        row = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                          loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
        calls = [post(a, "forward_backward", forward_backward_request_to_proto(types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(data=[row] * 600, loss_fn="cross_entropy"), model_id=run,
            seq_id=seq)).SerializeToString()).json() for seq in range(1, 5)]  # the last one surely not answered yet
        os.killpg(proc_a.pid, signal.SIGKILL)
        proc_a.wait()
        t0 = time.time()
        lost = retrieved(b, calls[-1]["request_id"], timeout=60).json()  # B took the run over from its first save
        assert "another took it over from its state saved after step 0" in lost["error"], lost
        assert f"tinker://{run}/weights/autosave" in lost["error"] and time.time() - t0 < 30


def held_runs(database: str, session: str) -> list[str]:
    """The runs of a client session some replica holds."""
    import psycopg

    with psycopg.connect(database) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM tinker_runs WHERE id LIKE %s AND claimed_by IS NOT NULL",
                                           (session + ":train:%",)).fetchall()]


def holder_pid(database: str, run_id: str) -> int:
    """The pid of the replica whose claim holds the run (a claim's holder is host:pid:random)."""
    import psycopg

    with psycopg.connect(database) as conn:
        return int(conn.execute("SELECT claimed_by FROM tinker_runs WHERE id = %s", (run_id,)).fetchone()[0]
                   .split(":")[1])


def test_the_sdks_loop_through_a_round_robin_of_two_replicas_trains_and_survives_its_holders_sigkill(
        tiny_model_dir, tmp_path, postgres, monkeypatch):
    """The SDK's plain loop (forward_backward, optim_step, a sampler) through a per-request round robin: the calls
    reach both replicas and run on the run's holder in order, with the losses of the same loop run alone. The holder
    SIGKILLed: the calls sent after it are answered, within the lease, with the step and state to resume from; a
    training client made from that state (the SDK's way) goes on with the losses the loop would have had, and the
    killed run itself, once that state is loaded on it, takes calls again."""
    import tinker
    from tinker import types

    monkeypatch.setenv("TUNESMITH_LEASE_S", "6")
    database, data_dir, base = postgres(), tmp_path / "shared", str(tiny_model_dir)
    with ExitStack() as stack:
        replicas = [stack.enter_context(replica(tiny_model_dir, data_dir, database, tmp_path / f"r{i}.log", KEYS,
                                                "--tinker-autosave", "0")) for i in range(2)]
        roots = [url[:-3] for url, _ in replicas]
        proxy, sent = stack.enter_context(round_robin(roots))
        with tinker.ServiceClient(base_url=proxy, api_key="tml-key-a") as service:
            adam = types.AdamParams(learning_rate=1e-2)

            def steps(client, batch, n: int) -> list[float]:
                losses = []
                for _ in range(n):
                    fb, opt = client.forward_backward(batch, "cross_entropy"), client.optim_step(adam)
                    losses.append(fb.result().metrics["loss:sum"])
                    opt.result()
                return losses

            alone = service.create_lora_training_client(base_model=base, rank=4, seed=1).result()
            tokens, weights = example(alone.get_tokenizer())
            batch = [datum(tokens, weights)]
            expected = steps(alone, batch, 5)  # the loop, never interrupted
            assert expected[-1] < expected[0]

            training = service.create_lora_training_client(base_model=base, rank=4, seed=1).result()
            assert steps(training, batch, 3) == pytest.approx(expected[:3], abs=1e-4)
            before = training.forward(batch, "cross_entropy").result().metrics["loss:sum"]
            sampler = training.save_weights_and_get_sampling_client().result()
            prompt = types.ModelInput.from_ints(tokens[:-3])
            greedy = types.SamplingParams(max_tokens=3, temperature=0.0)
            answer = sampler.sample(prompt, 1, greedy).result().sequences[0].tokens
            trained = {u for u, path in sent if path.endswith(("/forward_backward", "/optim_step"))}
            assert trained == set(roots), sent  # both replicas took training calls

            pid = holder_pid(database, training.model_id)
            (holder,) = [proc for _, proc in replicas if proc.pid == pid]
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()
            killed = time.time()
            fb, opt = training.forward_backward(batch, "cross_entropy"), training.optim_step(adam)
            path = f"tinker://{training.model_id}/weights/autosave"
            for call in (fb, opt):  # after the last save: not applied, the step and state to resume from named
                with pytest.raises(tinker.RequestFailedError, match=f"state saved after step 3 \\({path}\\)"):
                    call.result()
            assert time.time() - killed < 6 + 30
            with pytest.raises(tinker.RequestFailedError, match="after step 3"):
                training.optim_step(adam).result()  # every call until a state is loaded

            resumed = service.create_training_client_from_state_with_optimizer(path).result()
            assert resumed.forward(batch, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(before,
                                                                                                       abs=1e-4)
            assert steps(resumed, batch, 2) == pytest.approx(expected[3:], abs=1e-4)  # nothing lost but the calls
            assert sampler.sample(prompt, 1, greedy).result().sequences[0].tokens == answer  # its save samples still
            training.load_state_with_optimizer(path).result()  # the killed run, loaded, takes calls again
            assert training.forward(batch, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(before,
                                                                                                        abs=1e-4)
        # the client closed (through either replica): its runs let go wherever they are held
        wait_for(lambda: held_runs(database, training.model_id.partition(":train:")[0]) == [], 10,
                 "the closed session's runs let go")
