"""The GRPO configuration of ``benchmarks/gpu_train.py`` (``1b-grpo``): tunesmith's GRPO
(:func:`tunesmith.train.grpo.train_grpo`, its :class:`~tunesmith.train.grpo_shared.SharedPromptGRPO`: each prompt
run once per group in the log-probability pass) against plain TRL ``GRPOTrainer`` with the same LoRA, prompts,
reward, group size, completion length, batch and steps, each side in its own process as the others.

Prompts are the benchmark's chat rows (their system and user turns); the reward is a ``text_similarity`` grader
(fuzzy match of the completion against the row's answer) through :mod:`tunesmith.graders`. With random weights a
completion never ends early, so every step samples ``max_completion`` tokens per completion on both sides and
their work per step is the same. A step's time is split into rollout (TRL's ``_generate``: sampling),
reward (``_calculate_rewards``) and update (the rest: log-probabilities, loss, backward, optimizer), each bracketed
by a device synchronisation so that queued work is charged to the phase that queued it (those marks count among
the step's host syncs, beside generation's own per-token reads). Both sides sample with their own random streams,
so their losses are not comparable step by step: the row gives the mean reward instead.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

GENERATIONS = 8  # completions per prompt (one group)
GRADER = {"type": "text_similarity", "name": "answer", "input": "{{sample.output_text}}",
          "reference": "{{item.target}}", "evaluation_metric": "fuzzy_match"}
PHASES = (("_generate", "rollout"), ("_calculate_rewards", "reward"))
TIMES: dict[str, list[float]] = defaultdict(list)


def prompt_rows(rows: list[dict]) -> list[dict]:
    """GRPO rows (prompt messages, the answer as the grader's item) from the benchmark's chat rows."""
    return [{"prompt": r["prompt"], "item": json.dumps({"target": r["completion"][0]["content"]}, ensure_ascii=False)}
            for r in rows]


def prompt_tokens(rows: list[dict], tokenizer) -> list[int]:
    return [len(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"])
            for r in rows]


def completions_per_step(rows: list[dict], tokenizer, tokens_per_step: int, max_completion: int) -> int:
    """Completions per step (whole groups) so that prompts and completions come to about ``tokens_per_step``."""
    lengths = prompt_tokens(rows[:200], tokenizer)
    per_completion = sum(lengths) / len(lengths) + max_completion
    return GENERATIONS * max(1, round(tokens_per_step / (GENERATIONS * per_completion)))


def time_phases(device: str) -> None:
    """Time TRL's rollout and reward calls (the same class methods on both sides), each bracketed by a device
    synchronisation."""
    from trl import GRPOTrainer


    def sync():
        if device == "cuda":
            import torch

            torch.cuda.synchronize()

    for name, phase in PHASES:
        original = getattr(GRPOTrainer, name)

        def timed(self, *a, _original=original, _phase=phase, **k):
            sync()
            start = time.perf_counter()
            try:
                return _original(self, *a, **k)
            finally:
                sync()
                TIMES[_phase].append(time.perf_counter() - start)

        setattr(GRPOTrainer, name, timed)


def phase_summary(res: dict, measured_steps: int) -> dict:
    """The measured steps' mean step, rollout, reward and update seconds (the last ``measured_steps`` calls)."""
    step = res["step_s"]
    rollout, reward = (sum(TIMES[p][-measured_steps:]) / measured_steps if TIMES[p] else 0.0
                       for p in ("rollout", "reward"))
    return {"phases": {"step_s": step, "rollout_s": rollout, "reward_s": reward,
                       "update_s": None if step is None else step - rollout - reward}}


def reward_mean(history: list[dict]) -> float | None:
    values = [h["reward"] for h in history if "reward" in h]
    return sum(values) / len(values) if values else None


def run_tunesmith_grpo(bench, cfg, args, rows, out, reference: bool = False) -> dict:
    """tunesmith's GRPO on the path chosen here (``train.path: fast``)."""
    from tunesmith.machine.path import take_path
    from tunesmith.models.loading import load_model_for, load_tokenizer
    from tunesmith.train.grpo import train_grpo

    tokenizer = load_tokenizer(bench.model_name(cfg, args))
    batch = completions_per_step(rows, tokenizer, args.tokens_per_step, args.max_completion)
    longest = max(prompt_tokens(rows, tokenizer)) + args.max_completion  # what a sequence of this run can reach
    recipe, path, placement = take_path(bench.recipe_for(cfg, args, out, batch, max_seq_length=longest, grpo={
        "reward": GRADER, "num_generations": GENERATIONS, "max_completion_length": args.max_completion}))
    model = load_model_for(recipe.model.name, placement, cfg.adapter)
    time_phases(placement.device)
    history: list[dict] = []

    def train(callbacks):
        result = train_grpo(recipe, model, tokenizer, prompt_rows(rows), [reward()], placement, bench.no_bar,
                            callbacks=callbacks)
        history.extend(json.loads((recipe.run_dir / "train" / "grpo_log.json").read_text(encoding="utf-8")))
        return result

    res = bench.measure(train, placement.device, args.steps, args.profile, args.warmup)
    return res | phase_summary(res, args.steps - args.warmup) | bench.losses_of(history) | {
        "steps": args.steps, "params": res["result"].total_params, "reward": reward_mean(history),
        "path": path.describe() + f" (GRPO, {batch} completions of {args.max_completion} tokens per step"
                                  f"{bench._micro(recipe)})"}


def run_trl_grpo(bench, cfg, args, rows, out) -> dict:
    """Plain TRL ``GRPOTrainer`` (bf16 where the device has it) with the same LoRA, prompts, reward and batch."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_tokenizer

    cuda = pick_placement().device == "cuda"
    tokenizer = load_tokenizer(bench.model_name(cfg, args))
    tokenizer.padding_side = "left"
    batch = completions_per_step(rows, tokenizer, args.tokens_per_step, args.max_completion)
    model = bench.trl_model(cfg, args, cuda)
    micro, accum = bench.split(batch, cfg, args)
    settings = {k: v for k, v in bench.trl_settings(args, cuda, accum).items() if k != "max_length"}
    config = GRPOConfig(output_dir=str(out / "trl-grpo"), per_device_train_batch_size=micro,
                        num_generations=GENERATIONS, max_completion_length=args.max_completion, **settings)
    time_phases("cuda" if cuda else "cpu")
    trainer = GRPOTrainer(model=model, reward_funcs=[reward()], args=config,
                          train_dataset=Dataset.from_list(prompt_rows(rows)), processing_class=tokenizer)
    res = bench.measure_trl(trainer, args, cuda)
    return res | phase_summary(res, args.steps - args.warmup) | {
        "params": bench.count_params(model), "reward": reward_mean(trainer.state.log_history),
        "path": f"TRL GRPOTrainer ({'bf16' if cuda else 'fp32'}, {batch} completions per step)"}


def reward():
    from tunesmith.graders import check, reward_function

    return reward_function(check(GRADER), item_column="item")
