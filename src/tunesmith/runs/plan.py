"""Memory and time to expect for every arm of a run and for its evaluation, before it starts.

Memory comes from :mod:`tunesmith.machine.estimate`. Time is arithmetic on this machine's measured speed: a short
fp32 matrix-multiply calibration (about a second), cached per CPU/GPU under ``$TUNESMITH_HOME/cache/speed.json``;
a training token costs ``6 × parameters`` floating-point operations, a scored token ``2 × parameters``, at the
share of that speed the training and the evaluation reach (measured once: LoRA on the 135M model trains at about
150 tokens/s on 2 cores that multiply at about 165 GFLOP/s, DESIGN.md). It is a plan, good to about a factor of two.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from tunesmith.config import Recipe

TRAIN_EFFICIENCY = 0.74  # 150 tokens/s × 6 × 134.5M parameters / 165 GFLOP/s (DESIGN.md)
EVAL_EFFICIENCY = 0.25  # greedy decoding runs far below the matmul peak (a token at a time, small batches)
BASELINES_S = 10  # TF-IDF baselines on a few thousand examples


@dataclass
class ArmPlan:
    name: str
    examples: int
    steps: int
    tokens: int
    memory_mb: float
    fits: bool | None
    train_s: float
    eval_s: float


def machine_speed(device: str = "cpu") -> tuple[float, str]:
    """``(GFLOP/s, how it was found)``: fp32 matmul speed of this machine, measured once and cached."""
    import platform

    import torch

    from tunesmith.paths import tunesmith_home

    key = f"{device} {platform.processor() or platform.machine()} threads={torch.get_num_threads()}"
    path = tunesmith_home() / "cache" / "speed.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            return cached["gflops"], f"measured {cached['when']}, cached in {path}"
    except (OSError, ValueError, KeyError):
        pass
    gflops = measure_matmul(device)
    when = time.strftime("%Y-%m-%d %H:%M")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "gflops": gflops, "when": when}), encoding="utf-8")
    return gflops, f"measured now ({when}), cached in {path}"


def measure_matmul(device: str, n: int = 2048, tries: int = 3) -> float:
    """The best of ``tries`` timed ``n × n`` fp32 multiplies (large enough to reach the matmul kernels' speed)."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def plan_arm(arm: Recipe, name: str, train: list, test_n: int, val_n: int, gflops: float, console) -> ArmPlan:
    """An arm's size of training (examples, steps, tokens), its peak memory and its train and scoring time."""
    from pathlib import Path

    from tunesmith.machine.estimate import estimate_recipe, model_shape

    fitted, mean = fitted_lengths(arm, train, console)
    t = fitted.train
    n = min(len(train), t.examples) if getattr(t, "examples", None) else len(train)
    per_step = t.batch_size * t.grad_accum
    steps = t.max_steps or math.ceil(n / per_step) * math.ceil(t.epochs)
    tokens = int(steps * per_step * mean)
    params = model_shape(Path(arm.model.folder)).params
    est = estimate_recipe(fitted)
    train_s = 6 * params * tokens / (gflops * 1e9 * TRAIN_EFFICIENCY)
    scored = test_n + val_n
    answer = 0 if t.head != "none" else arm.eval.max_new_tokens
    eval_s = 2 * params * scored * (mean + answer) / (gflops * 1e9 * EVAL_EFFICIENCY)
    return ArmPlan(name, n, steps, tokens, est.total / 2**20, est.fits, train_s, eval_s)


def fitted_lengths(arm: Recipe, train: list, console) -> tuple[Recipe, float]:
    """The arm with ``max_seq_length: auto`` decided on the train split, and its mean example length in tokens."""
    from rich.console import Console

    from tunesmith.models.loading import load_tokenizer
    from tunesmith.runs.fitting import fit_to_data, token_length

    fitted = arm
    if arm.train.max_seq_length == "auto":
        fitted, _, _, _ = fit_to_data(arm.with_train(long_inputs="set_aside"), train, [], Console(quiet=True))
    tokenizer = load_tokenizer(arm.model.name)
    sample = train[:: max(1, len(train) // 500)]
    lengths = [min(token_length(fitted, tokenizer, e), fitted.train.max_seq_length) for e in sample]
    return fitted, sum(lengths) / max(1, len(lengths))


def plan_run(recipe: Recipe, console) -> tuple[list[ArmPlan], float, str, float]:
    """``(arms, base model's scoring seconds, how the speed was found, GFLOP/s)`` for ``recipe``."""
    from pathlib import Path

    from tunesmith.eval.runner import arm_name, arm_recipes
    from tunesmith.machine.estimate import model_shape
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.encoders import is_encoder
    from tunesmith.runs.data import prepare_data_once

    data = prepare_data_once(recipe, recipe.run_dir / "data", console)
    device = pick_placement(recipe.model.precision, recipe.model.device).device
    gflops, how = machine_speed(device)
    cap = recipe.eval.max_examples or 10**9
    test_n, val_n = min(len(data.splits["test"]), cap), min(len(data.splits["val"]), cap)
    arms = [plan_arm(a, arm_name(recipe, a), data.splits["train"], test_n, val_n if len(recipe.arms) > 1 else 0,
                     gflops, console) for a in arm_recipes(recipe)]
    base_s = 0.0
    if not is_encoder(recipe.model.name):
        params = model_shape(Path(recipe.model.folder)).params
        mean = arms[0].tokens / max(1, arms[0].steps * recipe.train.batch_size * recipe.train.grad_accum)
        base_s = 2 * params * test_n * (mean + recipe.eval.max_new_tokens) / (gflops * 1e9 * EVAL_EFFICIENCY)
    return arms, base_s + BASELINES_S, how, gflops


def render_plan(recipe: Recipe, arms: list[ArmPlan], eval_s: float, how: str, gflops: float) -> str:
    """The plan as a table a person can read: one line per arm, the evaluation, the total."""
    lines = [f"Time and memory to expect for {recipe.name} (a plan, good to about 2x):",
             f"  this machine: {gflops:,.0f} GFLOP/s fp32, {how}",
             f"  {'arm':<14} {'examples':>8} {'steps':>6} {'tokens':>9} {'memory':>9} {'train':>7} {'scoring':>7}"]
    for a in arms:
        fits = "" if a.fits is not False else "  does NOT fit"
        lines.append(f"  {a.name[:14]:<14} {a.examples:>8,} {a.steps:>6,} {a.tokens:>9,} {a.memory_mb:>6,.0f} MB "
                     f"{minutes(a.train_s):>7} {minutes(a.eval_s):>7}{fits}")
    lines.append(f"  {'evaluation':<14} base model and baselines: {minutes(eval_s)}")
    total = sum(a.train_s + a.eval_s for a in arms) + eval_s
    lines.append(f"  {'total':<14} about {minutes(total)}")
    return "\n".join(lines)


def minutes(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds < 90 else f"{seconds / 60:,.0f} min"


def estimate_text(recipe: Recipe, console) -> str:
    """What ``tunesmith train --estimate`` and the start of ``tunesmith run`` print."""
    arms, eval_s, how, gflops = plan_run(recipe, console)
    return render_plan(recipe, arms, eval_s, how, gflops)
