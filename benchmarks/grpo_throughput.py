"""tunesmith's GRPO path (``train.method: grpo``) vs plain TRL GRPOTrainer, in one process, on the same prompts,
reward and model.

Both sides get the embedded SmolLM2-135M-Instruct, a LoRA (r=16, alpha=32, dropout 0.05, all linear layers), the
same BANKING77 prompts (the intent list in the system message), the same reward (a ``text_similarity`` grader,
fuzzy_match of the completion against the gold intent, through :mod:`tunesmith.graders`), the same group size,
completion length, sampling, batch, learning rate and steps. The peer is TRL's GRPOTrainer with the CPU-hostile
defaults switched off (``bf16=False``, ``gradient_checkpointing=False``: as in benchmarks/train_throughput.py) and
everything else as TRL ships it. tunesmith's side is :func:`tunesmith.train.grpo.train_grpo` with the recipe's
defaults: :class:`tunesmith.train.grpo_shared.SharedPromptGRPO`, which samples on tunesmith's continuous-batching
engine (a prompt shared by a group prefilled once) and runs each prompt once per group in the log-probability
pass. Both sides sample with their own random streams, so their completions, and so their reward curves, differ
step by step; the means over the run are what should agree.

Reported per side: completions/s over the whole training, the mean step time split into generation (TRL's
``_generate``), reward (``_calculate_rewards``) and the rest (log-probabilities, loss, backward, optimizer), peak
resident memory above the level before training (Linux VmHWM, reset before each side), the reward curve (mean
reward of each step's completions) and its mean over all steps and over the second half; the load average before
and after.

    python benchmarks/grpo_throughput.py --prompts 40 --steps 20 --max-completion 16
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

MODEL = "smollm2-135m-instruct"
DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "banking77_10intents.csv"
GRADER = {"type": "text_similarity", "name": "intent", "input": "{{sample.output_text}}",
          "reference": "{{item.category}}", "evaluation_metric": "fuzzy_match"}
TIMES: dict[str, list[float]] = defaultdict(list)  # phase -> seconds of each call, for the side running now


def prompt_rows(n: int, seed: int) -> list[dict]:
    """GRPO rows (prompt messages, JSON item) from BANKING77, the intent list in the system message."""
    import random

    with open(DATA, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    labels = sorted({r["category"] for r in rows})
    random.Random(seed).shuffle(rows)
    system = "Name the intent of the customer's message. Answer with exactly one of: " + ", ".join(labels) + "."
    return [{"prompt": [{"role": "system", "content": system}, {"role": "user", "content": r["text"]}],
             "item": json.dumps({"category": r["category"]})} for r in rows[:n]]


def timed_phases() -> None:
    """Time TRL's generation and reward calls (the same class methods on both sides)."""
    from trl import GRPOTrainer

    for name, phase in (("_generate", "generation"), ("_calculate_rewards", "reward")):
        original = getattr(GRPOTrainer, name)

        def wrapper(self, *a, _original=original, _phase=phase, **k):
            start = time.perf_counter()
            try:
                return _original(self, *a, **k)
            finally:
                TIMES[_phase].append(time.perf_counter() - start)

        setattr(GRPOTrainer, name, wrapper)


def step_clock():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            TIMES["step"].append(time.perf_counter() - self.start)

    return Clock()


def reward():
    from tunesmith.graders import check, reward_function

    return reward_function(check(GRADER), item_column="item")


def run_tunesmith(rows, args, out: Path) -> dict:
    import tunesmith.kinds  # noqa: F401 - registers the task kinds the schema checks
    import tunesmith.train  # noqa: F401 - registers the training methods (their shapes and trainers)
    from tunesmith.config import validate_recipe
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model, load_tokenizer
    from tunesmith.train.grpo import train_grpo

    recipe = validate_recipe({
        "name": "ours", "output_dir": str(out), "seed": args.seed, "model": {"name": MODEL},
        "train": {"method": "grpo", "max_steps": args.steps, "batch_size": args.batch_size,
                  "learning_rate": args.lr, "lr_scheduler": "linear", "warmup_ratio": 0, "logging_steps": 1,
                  "save_steps": 10_000, "grpo": {"reward": GRADER, "num_generations": args.generations,
                                                "max_completion_length": args.max_completion,
                                                "temperature": args.temperature}}})
    placement = pick_placement()
    model, tokenizer = load_model(MODEL, placement), load_tokenizer(MODEL)
    from contextlib import nullcontext

    bar = lambda desc, total: nullcontext(lambda *a, **k: None)  # noqa: E731 - no progress output
    def train() -> list[dict]:
        train_grpo(recipe, model, tokenizer, rows, [reward()], placement, bar, callbacks=[step_clock()])
        return json.loads((recipe.run_dir / "train" / "grpo_log.json").read_text(encoding="utf-8"))

    return _measure(train, args.batch_size)


def run_trl(rows, args, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.loading import load_model, load_tokenizer

    model, tokenizer = load_model(MODEL, pick_placement()), load_tokenizer(MODEL)
    config = GRPOConfig(output_dir=str(out / "trl"), seed=args.seed, data_seed=args.seed, max_steps=args.steps,
                        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, logging_steps=1,
                        num_generations=args.generations, max_completion_length=args.max_completion,
                        temperature=args.temperature, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                        gradient_checkpointing=False, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward()], args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[step_clock()],
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))

    def train() -> list[dict]:
        trainer.train()
        return trainer.state.log_history

    return _measure(train, args.batch_size)


def _measure(train, per_step: int) -> dict:
    """Run ``train`` (returning the trainer's log history) and measure it."""
    from tunesmith.machine.memory import peak_rss, reset_peak_rss

    TIMES.clear()
    gc.collect()
    before = reset_peak_rss()
    start = time.perf_counter()
    history = train()
    seconds = time.perf_counter() - start
    peak = peak_rss()
    rewards = [round(h["reward"], 3) for h in history if "reward" in h]
    steps = len(TIMES["step"]) or 1
    gen, rew, step = (sum(TIMES[k]) / steps for k in ("generation", "reward", "step"))
    return {"seconds": seconds, "completions_per_s": steps * per_step / seconds,
            "step_s": step, "generation_s": gen, "reward_s": rew, "update_s": step - gen - rew,
            "peak_mb": (peak - before) / 2**20, "rewards": rewards}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8, help="completions per step")
    ap.add_argument("--generations", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-completion", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--order", choices=["ours-first", "trl-first"], default="ours-first")
    args = ap.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(torch.get_num_threads())
    timed_phases()
    rows = prompt_rows(args.prompts, args.seed)
    print("load average before: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    with tempfile.TemporaryDirectory() as tmp:
        args.out_dir = tmp
        sides = [("tunesmith", run_tunesmith), ("trl", run_trl)]
        if args.order == "trl-first":
            sides.reverse()
        results = {name: run(rows, args, Path(tmp)) for name, run in sides}
    print(f"{args.prompts} prompts, {args.steps} steps x {args.batch_size} completions "
          f"({args.generations} per prompt, up to {args.max_completion} tokens), {torch.get_num_threads()} threads")
    print(f"{'side':10} {'compl/s':>8} {'step s':>7} {'gen s':>6} {'reward s':>8} {'update s':>8} {'peak MB':>8}  "
          "reward per step")
    for name, r in results.items():
        print(f"{name:10} {r['completions_per_s']:8.2f} {r['step_s']:7.2f} {r['generation_s']:6.2f} "
              f"{r['reward_s']:8.3f} {r['update_s']:8.2f} {r['peak_mb']:8.0f}  {r['rewards']}")
    for name, r in results.items():
        curve = r["rewards"]
        late = curve[len(curve) // 2:]
        print(f"{name:10} mean reward {sum(curve) / max(len(curve), 1):.3f} over all steps, "
              f"{sum(late) / max(len(late), 1):.3f} over the second half")
    print("load average after: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    ours, trl = results["tunesmith"], results["trl"]
    print(f"ratio tunesmith / trl: completions/s {ours['completions_per_s'] / trl['completions_per_s']:.2f}x, "
          f"peak memory {ours['peak_mb'] / max(trl['peak_mb'], 1):.2f}x")


if __name__ == "__main__":
    main()
