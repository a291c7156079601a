"""GRPO with each prompt run once per group: the engine prefills a shared prompt once and samples the same
completions as it would row by row; the shared log-probability pass gives TRL's log-probabilities, entropies and
gradients; the auto path trains with it and the reference path with TRL's own trainer."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from tunesmith.generation.engine import ContinuousBatch, Row
from tunesmith.generation.sampling import GenParams
from tunesmith.train.grpo_shared import sample_completions, shared_prompt_logps


def _prompts(tok):
    texts = ["<|im_start|>user\nwhere is my card<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nmy pin is blocked, what do I do<|im_end|>\n<|im_start|>assistant\n"]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_rows_sharing_a_prompt_are_prefilled_once_and_complete_as_alone(tiny_model, monkeypatch):
    model, tok = tiny_model
    a, b = _prompts(tok)
    greedy = GenParams(max_tokens=6)
    alone = []
    for ids in (a, b):
        batch = ContinuousBatch(model, tok)
        row = Row(ids, greedy)
        batch.add(row)
        while batch.busy:
            batch.step()
        alone.append(row.generated)

    prefill_rows = []
    forward = ContinuousBatch._forward

    def spy(self, input_ids, *rest):
        if input_ids.shape[1] > 1:
            prefill_rows.append(input_ids.shape[0])
        return forward(self, input_ids, *rest)

    monkeypatch.setattr(ContinuousBatch, "_forward", spy)
    shared = sample_completions(model, tok, [a, a, a, b, b, b], greedy)
    assert prefill_rows == [2]  # one prefill pass, one row per distinct prompt, not six
    for got, want in zip(shared, [alone[0]] * 3 + [alone[1]] * 3, strict=True):
        assert got[: len(want)] == want
        assert len(got) in (len(want), len(want) + 1) and got[len(want):] in ([], [tok.eos_token_id])


def test_sampled_rows_of_one_prompt_differ_and_keep_their_stop_token(tiny_model):
    model, tok = tiny_model
    a, _ = _prompts(tok)
    params = GenParams(max_tokens=8, temperature=1.0)
    torch.manual_seed(0)
    out = sample_completions(model, tok, [a] * 6, params)
    assert len({tuple(c) for c in out}) > 1  # each row draws its own tokens after the one shared prefill
    for c in out:
        assert 1 <= len(c) <= 9 and tok.eos_token_id not in c[:-1]


def _lora(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_fused_lm_head(base, temperature=0.7, outputs=("log_probs", "entropy"))  # as GRPOTrainer does
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            init_lora_weights=False))
    return model.train()


def _group_batch(tok):
    """Two prompts (different lengths, left-padded) x three completions (different lengths, right-padded)."""
    pad = tok.pad_token_id
    prompts = _prompts(tok)
    width = max(map(len, prompts))
    completions = [[11, 12, 13, 14, 15], [21, 22], [31, 32, 33, 34], [41], [51, 52, 53], [61, 62, 63, 64, 65]]
    keep = max(map(len, completions))
    ids, mask = [], []
    for i, c in enumerate(completions):
        p = prompts[i // 3]
        ids.append([pad] * (width - len(p)) + p + c + [pad] * (keep - len(c)))
        mask.append([0] * (width - len(p)) + [1] * (len(p) + len(c)) + [0] * (keep - len(c)))
    return torch.tensor(ids), torch.tensor(mask), keep


def test_shared_pass_gives_trls_log_probs_entropies_and_gradients(tiny_model_dir, tiny_model):
    from trl import GRPOTrainer

    _, tok = tiny_model
    ids, mask, keep = _group_batch(tok)
    trl_self = SimpleNamespace(accelerator=SimpleNamespace(autocast=contextlib.nullcontext, is_main_process=True))
    results = []
    for run in ("trl", "shared"):
        model = _lora(tiny_model_dir)
        if run == "trl":
            logps, ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(trl_self, model, ids, mask, keep,
                                                                           compute_entropy=True)
        else:
            logps, ent = shared_prompt_logps(model, ids, mask, keep)
        completion_mask = mask[:, -keep:].float()
        weights = torch.linspace(-1, 1, logps.numel()).view_as(logps)  # a loss in which every token counts apart
        (logps * weights * completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((logps.detach(), ent.detach(), grads))
    (lp_trl, ent_trl, g_trl), (lp_ours, ent_ours, g_ours) = results
    assert lp_ours.shape == lp_trl.shape == (6, keep)
    torch.testing.assert_close(lp_ours, lp_trl, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ent_ours, ent_trl, atol=2e-5, rtol=1e-4)
    assert (lp_trl[mask[:, -keep:] == 1] < 0).all()  # real numbers compared, not padding zeros
    assert set(g_ours) == set(g_trl) and len(g_trl) > 4
    for name in g_trl:
        torch.testing.assert_close(g_ours[name], g_trl[name], atol=1e-5, rtol=1e-3, msg=name)
    assert any(g.abs().sum() > 0 for n, g in g_trl.items() if "lora_A" in n)


@pytest.mark.parametrize(("path", "name"), [("auto", "SharedPromptGRPO"), ("reference", "GRPOTrainer")])
def test_the_auto_path_shares_prompts_and_the_reference_path_is_trls_trainer(tmp_path, path, name):
    from tunesmith.config import validate_recipe
    from tunesmith.train.grpo import grpo_trainer_class
    from tunesmith.train.jobs import trainer_for

    from .conftest import banking_recipe

    doc = banking_recipe(tmp_path, "random:llama", tmp_path / "d.jsonl", name="g", seed=1, split={"val": 0},
                         train={"method": "grpo", "path": path})
    recipe = validate_recipe(doc)
    assert grpo_trainer_class(recipe).__name__ == name
    assert trainer_for("grpo", "generative", "fast" if path == "auto" else path) is not None  # auto on a CPU: fast
