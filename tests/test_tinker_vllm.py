"""A Tinker sampler checkpoint served by vLLM (`make vllm`): trained through the ``tinker`` SDK on the embedded model,
saved for sampling, then answered by vLLM on the OpenAI API with the tokens tunesmith's own sampler draws greedily;
one that adapts the output layer (the SDK's default) is refused by name, as vLLM serves LoRA on the other layers only.
Skips with what to run when vLLM or the model is absent."""

from __future__ import annotations

import openai
import pytest

from .conftest import EMBEDDED, embedded_server, vllm_or_skip

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_a_tinker_sampler_checkpoint_answers_on_vllm(tmp_path):
    import tinker
    from tinker import types

    vllm_or_skip()
    with embedded_server("vllm", tmp_path / "data", api_keys=frozenset({"key-a"})) as url:
        with tinker.ServiceClient(base_url=url[:-3], api_key="tml-key-a") as service:
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
            greedy = service.create_sampling_client(model_path=path).result().sample(
                prompt=types.ModelInput.from_ints(prompt), num_samples=1,
                sampling_params=types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])).result()
            ours = greedy.sequences[0].tokens

            unembed = service.create_lora_training_client(base_model=EMBEDDED, rank=4).result()
            refused = unembed.save_weights_for_sampler("with-lm-head").result().path

        client = openai.OpenAI(base_url=url, api_key="key-a", max_retries=0)
        served = client.completions.create(model=path, prompt=prompt, max_tokens=6, temperature=0)
        assert served.choices[0].text == tokenizer.decode(ours)
        base = client.completions.create(model=EMBEDDED, prompt=prompt, max_tokens=6, temperature=0)
        assert "Zanzibar" in served.choices[0].text and "Zanzibar" not in base.choices[0].text
        with pytest.raises(openai.UnprocessableEntityError, match="lm_head"):
            client.chat.completions.create(model=refused, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
