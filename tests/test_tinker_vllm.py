"""The Tinker API on a server whose engine is vLLM (`make vllm`): a run trained through the ``tinker`` SDK on the
embedded model, saved for sampling, then sampled through the SDK — rows of vLLM, the engine of every door — and the
same checkpoint answered by vLLM on the OpenAI API with the same tokens; each sampled token's logprob against the
trainer's forward of the same tokens (measured, and the importance ratio's spread it causes stated); a training client
that would adapt the output layer (the SDK's default, which vLLM cannot serve) refused at its creation, by name.
Skips with what to run when vLLM or the model is absent."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from .conftest import EMBEDDED, embedded_server, vllm_or_skip

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_a_tinker_sample_runs_on_vllm_and_its_checkpoint_answers_there_too(tmp_path):
    import tinker
    from tinker import types

    vllm_or_skip()
    with embedded_server("vllm", tmp_path / "data", api_keys=frozenset({"key-a"})) as url:
        with tinker.ServiceClient(base_url=url[:-3], api_key="tml-key-a") as service:
            with pytest.raises(tinker.RequestFailedError, match="train_unembed=False"):
                service.create_lora_training_client(base_model=EMBEDDED, rank=4).result()  # refused at once
            training = service.create_lora_training_client(base_model=EMBEDDED, rank=8, seed=0,
                                                           train_unembed=False).result()
            tokenizer = training.get_tokenizer()
            prompt = tokenizer.encode("The capital of France is")
            answer = tokenizer.encode(" Zanzibar, and the capital of Italy is Zanzibar too.")
            tokens = prompt + answer
            d = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:],
                                            "weights": [0.0] * (len(prompt) - 1) + [1.0] * len(answer)})
            for _ in range(3):
                training.forward_backward([d], "cross_entropy").result()
                training.optim_step(types.AdamParams(learning_rate=5e-3)).result()
            path = training.save_weights_for_sampler("for-vllm").result().path
            sampler = service.create_sampling_client(model_path=path).result()
            greedy = sampler.sample(prompt=types.ModelInput.from_ints(prompt), num_samples=1,
                                    sampling_params=types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
                                    ).result()
            ours = greedy.sequences[0].tokens
            sampled = sampler.sample(prompt=types.ModelInput.from_ints(prompt), num_samples=4,
                                     sampling_params=types.SamplingParams(max_tokens=12, temperature=1.0, seed=5,
                                                                          stop=[])).result()
            gaps = []
            for seq in sampled.sequences:  # vLLM's logprobs against the trainer's forward of the same tokens
                full = prompt + seq.tokens
                scored = training.forward([types.Datum(
                    model_input=types.ModelInput.from_ints(full[:-1]),
                    loss_fn_inputs={"target_tokens": full[1:], "weights": [1.0] * (len(full) - 1)})],
                    "cross_entropy").result()
                trainer = scored.loss_fn_outputs[0]["logprobs"].to_numpy()[-len(seq.tokens):]
                gaps.extend(np.abs(np.asarray(seq.logprobs) - trainer))
            ratio = np.exp(np.asarray(gaps))
            print(f"vLLM logprobs vs the trainer's: largest gap {max(gaps):.2e}, mean {np.mean(gaps):.2e}; "
                  f"importance ratio spread {ratio.min():.4f}..{ratio.max():.4f}")
            assert max(gaps) < 1e-3  # float32 on a CPU both sides (measured: 1.1e-5 at most)

        client = openai.OpenAI(base_url=url, api_key="key-a", max_retries=0)
        served = client.completions.create(model=path, prompt=prompt, max_tokens=6, temperature=0)
        assert served.choices[0].text == tokenizer.decode(ours)  # one engine: the same rows through either door
        base = client.completions.create(model=EMBEDDED, prompt=prompt, max_tokens=6, temperature=0)
        assert "Zanzibar" in served.choices[0].text and "Zanzibar" not in base.choices[0].text
