"""tinker-cookbook's recipes (0.6.1) run against ``tunesmith serve`` through ``tunesmith cookbook``, changed only in
the base URL, the model, the data source and the size: the recipe files are the installed package's, run as their
own ``__main__``; the hub dataset each one loads is answered with local rows (real BANKING77 messages) where the
recipe calls ``datasets.load_dataset``. The supervised loop's first loss is the base's own NLL of the batch (to 1e-4)
and falls; DPO's first loss is log 2 (the policy is its reference) and falls; the RL loop samples, scores and trains
with importance sampling every step, resumed (as the cookbook resumes) from a state that answers in its format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import openai
import pytest

from .conftest import banking_rows, tiny_server

pytest.importorskip("tinker_cookbook", reason="tinker-cookbook is installed by `make install` (no-deps, dev)")

KEY = "key-cookbook"
LABELS = ("card_arrival", "pin_blocked", "age_limit", "exchange_rate")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with tiny_server(tiny_model_dir, tmp_path_factory.mktemp("cookbook-data"), api_keys=frozenset({KEY})) as url:
        yield url.removesuffix("/v1"), str(tiny_model_dir)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", f"tml-{KEY}")
    monkeypatch.delenv("TINKER_BASE_URL", raising=False)


def local_hub(monkeypatch, name: str, answer) -> None:
    """``datasets.load_dataset(name, …)`` answered with ``answer`` (a DatasetDict of local rows): the data source."""
    import datasets

    real = datasets.load_dataset

    def load(path, *args, **kwargs):
        return answer if path == name else real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load)


def metrics(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def chats(per_label: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["category"]}]}
            for r in banking_rows(LABELS, per_label)]


def first_batch_spy(monkeypatch) -> list:
    """The data of every forward_backward the recipe sends (the SDK's own call, unchanged)."""
    import tinker

    sent: list = []
    real = tinker.TrainingClient.forward_backward

    def spy(self, data, *args, **kwargs):
        sent.append(list(data))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(tinker.TrainingClient, "forward_backward", spy)
    return sent


def base_nll(model_dir: str, data: list) -> float:
    """The base model's weighted mean NLL of ``data`` (cookbook Datums), computed here with transformers alone."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, weight = 0.0, 0.0
    with torch.no_grad():
        for d in data:
            logits = model(input_ids=torch.tensor([d.model_input.to_ints()])).logits[0].float()
            targets = torch.tensor(np.asarray(d.loss_fn_inputs["target_tokens"].to_numpy(), dtype=np.int64))
            w = torch.tensor(d.loss_fn_inputs["weights"].to_numpy(), dtype=torch.float32)
            logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
            total += float(-(logp * w).sum())
            weight += float(w.sum())
    return total / weight


def test_the_served_base_is_added_to_the_cookbooks_table_with_the_renderer_of_its_chat_template(server, key):
    from tinker_cookbook import model_info, renderers
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    from tunesmith.clients.cookbook import describe, register, served_bases

    root, base = server
    assert served_bases(root, f"tml-{KEY}") == [base]
    register([describe(base)])
    assert model_info.get_recommended_renderer_name(base) == "qwen3_instruct"  # ChatML, as the tiny model's template
    tokenizer = get_tokenizer(base)
    convo = [{"role": "user", "content": "my card has not arrived"}]
    prompt = renderers.get_renderer("qwen3_instruct", tokenizer).build_generation_prompt(convo).to_ints()
    own = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    assert prompt == tokenizer.encode(own, add_special_tokens=False)
    table = model_info.get_model_attributes.__wrapped__  # the cookbook's own table, kept for its own models
    assert model_info.get_model_attributes("Qwen/Qwen3-8B") == table("Qwen/Qwen3-8B")


def test_a_server_that_is_not_there_or_a_wrong_key_is_said_with_what_to_do(server, monkeypatch):
    from tunesmith.clients.cookbook import CookbookError, run

    monkeypatch.setenv("TINKER_API_KEY", "tml-not-a-key")
    with pytest.raises(CookbookError, match="answered 401"):
        run("tinker_cookbook.recipes.sl_loop", [f"base_url={server[0]}"])
    monkeypatch.delenv("TINKER_BASE_URL", raising=False)
    with pytest.raises(CookbookError, match="no server: pass base_url"):
        run("tinker_cookbook.recipes.sl_loop", [])


def test_the_supervised_loop_recipe_trains_from_the_bases_own_loss_and_its_loss_falls(server, key, monkeypatch,
                                                                                        tmp_path):
    import datasets

    from tunesmith.clients.cookbook import run

    root, base = server
    local_hub(monkeypatch, "HuggingFaceH4/no_robots", datasets.DatasetDict(train=datasets.Dataset.from_list(chats(16))))
    sent = first_batch_spy(monkeypatch)
    log = tmp_path / "sl"
    run("tinker_cookbook.recipes.sl_loop", [f"base_url={root}", f"model_name={base}", f"log_path={log}",
                                            "batch_size=8", "max_steps=6", "learning_rate=5e-3", "lora_rank=8",
                                            "save_every=0", "max_length=256"])
    steps = metrics(log)
    assert len(steps) == 6 and len(sent) == 6
    assert steps[0]["train_mean_nll"] == pytest.approx(base_nll(base, sent[0]), abs=1e-4)
    assert steps[-1]["train_mean_nll"] < steps[0]["train_mean_nll"] - 0.5, [s["train_mean_nll"] for s in steps]
    saved = [json.loads(line) for line in (log / "checkpoints.jsonl").read_text().splitlines()]
    assert saved[-1]["name"] == "final" and saved[-1]["sampler_path"].startswith("tinker://")
    chat = openai.OpenAI(base_url=f"{root}/v1", api_key=KEY).chat.completions.create(  # the recipe's checkpoint
        model=saved[-1]["sampler_path"], max_tokens=4, messages=[{"role": "user", "content": "card not arrived"}])
    assert chat.model == saved[-1]["sampler_path"] and chat.choices[0].message.content is not None


def test_the_dpo_recipe_starts_at_log_2_and_prefers_the_chosen_answers(server, key, monkeypatch, tmp_path):
    import datasets

    from tunesmith.clients.cookbook import run

    root, base = server
    rows = banking_rows(LABELS, 16)
    pairs = [{"chosen": f"\n\nHuman: {r['text']}\n\nAssistant: {r['category']}",
              "rejected": f"\n\nHuman: {r['text']}\n\nAssistant: I cannot help with that."}
             for r in rows]
    local_hub(monkeypatch, "Anthropic/hh-rlhf", datasets.DatasetDict(
        train=datasets.Dataset.from_list(pairs), test=datasets.Dataset.from_list(pairs[:4])))
    log = tmp_path / "dpo"
    run("tinker_cookbook.recipes.preference.dpo.train", [
        f"base_url={root}", f"model_name={base}", f"log_path={log}", "dataset=hhh", "batch_size=8", "max_steps=6",
        "learning_rate=2e-3", "dpo_beta=0.5", "max_length=256", "behavior_if_log_dir_exists=delete"])
    steps = [s for s in metrics(log) if "dpo_loss" in s]
    assert len(steps) == 6
    assert steps[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy is its reference at first
    assert steps[-1]["dpo_loss"] < steps[0]["dpo_loss"] - 0.05, [s["dpo_loss"] for s in steps]


def teach_format(root: str, base: str, conversations: list, log: Path) -> None:
    """A state the RL loop resumes from (the cookbook's own resume: the last state in its log folder): the tiny
    random model taught, through the SDK, to answer inside \\boxed{} (else no answer scores, no group's rewards
    differ, and no step trains)."""
    import tinker
    from tinker_cookbook import checkpoint_utils, renderers
    from tinker_cookbook.supervised.data import conversation_to_datum
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    from tunesmith.clients.cookbook import describe, register

    register([describe(base)])
    renderer = renderers.get_renderer("qwen3_instruct", get_tokenizer(base))
    data = [conversation_to_datum(c, renderer, 256) for c in conversations]
    with tinker.ServiceClient(base_url=root) as service:
        client = service.create_lora_training_client(base_model=base, rank=8, seed=0).result()
        for _ in range(25):
            client.forward_backward(data, "cross_entropy")
            client.optim_step(tinker.AdamParams(learning_rate=5e-3, grad_clip_norm=1.0)).result()
        log.mkdir(parents=True, exist_ok=True)
        checkpoint_utils.save_checkpoint(client, "format", str(log), {"batch": 0}, kind="state")


def test_the_rl_loop_recipe_samples_scores_and_trains_each_step(server, key, monkeypatch, tmp_path):
    """GSM8K's format on questions whose answer is 4, from a state that answers some of them right: every step
    samples a group per question (recorded for stable_reinforce, the recipe's default loss), scores it and trains on
    the groups whose rewards differ, each datum naming the sequences it came from."""
    import datasets

    from tunesmith.clients.cookbook import run

    root, base = server
    log = tmp_path / "rl"
    questions = [{"question": f"Card {i}: what is {a} plus {4 - a}?", "answer": f"{a} + {4 - a} = 4\n#### 4"}
                 for i in range(6) for a in range(1, 4)][:16]
    suffix = " Provide a numerical answer without units, written inside \\boxed{}."  # the recipe's own
    teach_format(root, base, [[{"role": "user", "content": q["question"] + suffix},
                               {"role": "assistant", "content": "\\boxed{4}"}] for q in questions], log)
    local_hub(monkeypatch, "openai/gsm8k", datasets.DatasetDict(
        train=datasets.Dataset.from_list(questions * 8), test=datasets.Dataset.from_list(questions)))
    sent = first_batch_spy(monkeypatch)
    run("tinker_cookbook.recipes.rl_loop", [f"base_url={root}", f"model_name={base}", f"log_path={log}",
                                            "batch_size=16", "group_size=4", "max_steps=6", "max_tokens=16",
                                            "learning_rate=1e-3", "lora_rank=8", "save_every=0"])
    steps = [s for s in metrics(log) if "reward/total" in s]
    assert len(steps) == 6 and all(0 < s["reward/total"] < 1 for s in steps), steps  # answers scored, groups vary
    assert len(sent) == 6 and all(s["grad_norm:mean"] > 0 for s in steps)  # each step trained on the server
    assert all(set(d.loss_fn_inputs) == {"target_tokens", "logprobs", "advantages"} and d.loss_fn_input_spans
               for d in sent[0])


def test_the_sessions_a_recipe_opens_are_finished_when_it_ends(server, key):
    """Recipes leave their ServiceClient open; the launcher finishes each session (the server lets its runs go now,
    not after an idle hour, and no heartbeat outlives the recipe)."""
    import tinker

    from tunesmith.clients.cookbook import sessions_closed

    root, base = server
    with sessions_closed() as closing:
        client = tinker.ServiceClient(base_url=root)
        client.create_lora_training_client(base_model=base, rank=4).result()
        closing.status = "success"
    with pytest.raises(Exception):  # noqa: B017 - the SDK's own error for a finished session
        client.create_lora_training_client(base_model=base, rank=4).result()
