"""Memory and time to expect for every part of a run, before it starts: each arm's model load, tokenizing, linear
probe and training, every contender's scoring (the base model, each arm, the validation scoring that recommends an
arm), the baselines and the report, plus what has run already (start-up and the data stage).

Memory comes from :mod:`tunesmith.machine.estimate`. Time is arithmetic on this machine's speed measured now (a
short fp32 matrix-multiply, about a second, so that it follows the load of the moment): a token costs ``2 ×`` the
model's compute parameters (its layers' weights, and the output layer of a language model; not the embedding table)
in a forward pass and ``6 ×`` in training, at the share of that speed each part reached when measured on this
machine kind (docs/experiments.md, "A first look"). It is a plan, good to about 1.5x.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.config import Recipe

# The share of the measured matmul speed each part reaches (tokens x FLOPs per token / seconds / matmul FLOP/s),
# measured on 2 CPU cores running `run --quick` on the emails export of docs/experiments.md ("A first look").
EFFICIENCY = {"train lora": 0.75, "train full": 0.6, "forward": 0.9, "score": 0.95}
DECODE_COST = 24  # a generated token costs as much as this many prompt tokens (a token at a time, small batches)
STEP_S = 1.0  # an optimizer step besides its arithmetic (optimizer, logging, the many small operations)
LOAD_S = 1.5  # loading a model (or an adapter onto its base)
ARM_S = 1.5  # an arm besides its steps: the training path, saving, its loss plot
PROBE_S = 3.5  # a linear probe besides its forward passes (the fit of the linear model)
TOKENIZE_S = 0.002  # measuring and cutting one example to max_seq_length
BASELINES_S = 6.0  # the LLM-free baselines (TF-IDF fits on a few thousand examples)
REPORT_S = 2.0  # the charts and the report pages
SAMPLE = 200  # examples tokenized to measure lengths for the plan
STARTED = time.time()  # when tunesmith was imported (elsewhere than Linux: the start of the process, nearly)


@dataclass
class ArmPlan:
    name: str
    examples: int
    steps: int
    per_step: int  # examples per optimizer step
    tokens: int
    memory_mb: float
    fits: bool | None
    step_s: float  # one optimizer step
    fixed_s: float  # load, tokenize, save: the arm's time besides its steps and probe
    probe_s: float
    eval_s: float  # scoring its answers on the test sample

    @property
    def train_s(self) -> float:
        return self.fixed_s + self.steps * self.step_s


@dataclass
class Plan:
    arms: list[ArmPlan]
    gflops: float
    how: str
    so_far_s: float  # start-up and the data stage, already run
    base_s: float = 0.0
    recommend_s: float = 0.0
    baselines_s: float = BASELINES_S
    report_s: float = REPORT_S
    notes: list[str] = field(default_factory=list)

    @property
    def evaluation_s(self) -> float:
        return self.base_s + self.recommend_s + self.baselines_s + self.report_s

    @property
    def total_s(self) -> float:
        return self.so_far_s + sum(a.train_s + a.probe_s + a.eval_s for a in self.arms) + self.evaluation_s


def machine_speed(device: str = "cpu") -> tuple[float, str]:
    """``(GFLOP/s, how it was found)``: fp32 matmul speed of this machine now (the load of the moment included)."""
    gflops = measure_matmul(device)
    return gflops, f"measured now ({time.strftime('%H:%M')}), with the load of the moment"


def measure_matmul(device: str, tries: int = 3) -> float:
    """fp32 matmul speed at the shapes a small model's step multiplies: on a CPU twenty ``512 × 576`` by
    ``576 × 1536`` products (a 135M model's MLP over 512 tokens), which also shows what threads waiting on each
    other cost on a busy machine (a square 2048 product hides it); on a GPU one ``4096 × 4096`` product. The best
    of ``tries``."""
    import torch

    rows, inner, cols, reps = (512, 576, 1536, 20) if device == "cpu" else (4096, 4096, 4096, 1)
    a = torch.randn(rows, inner, device=device)
    b = torch.randn(inner, cols, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * inner * cols * reps / best / 1e9


def process_seconds() -> float:
    """Wall seconds since this process started (Linux's /proc; elsewhere since tunesmith was imported)."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return max(0.0, time.time() - (boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")))
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return time.time() - STARTED


def compute_params(folder: Path) -> int:
    """The weights a token passes through: every layer's linear weights and, for a language model, the output
    layer (an encoder's or decoder's embedding table is looked up, not multiplied)."""
    from tunesmith.machine.estimate import model_shape

    s = model_shape(folder)
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type", "")
    encoder = model_type in ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra")
    per_layer = 2 * s.hidden * (s.hidden + s.kv_dim) + (2 if encoder else 3) * s.hidden * s.intermediate
    return s.layers * per_layer + (0 if encoder else s.hidden * s.vocab)


def seconds(tokens: float, params: int, flops_per_token: int, gflops: float, part: str) -> float:
    return flops_per_token * params * tokens / (gflops * 1e9 * EFFICIENCY[part])


def plan_arm(arm: Recipe, name: str, train: list, val_n: int, prompt_tokens: float, scored: int, gflops: float,
             console) -> ArmPlan:
    """An arm's size of training (examples, steps, tokens), its peak memory and its time: load and tokenize,
    the probe (a head started from a linear probe), each optimizer step, the validation loss over ``val_n``
    examples (generative training: each epoch, or every ``train.eval_steps``), and its scoring on ``scored``
    examples."""
    from tunesmith.machine.estimate import estimate_recipe
    from tunesmith.train.heads import head_init, head_pooling

    fitted, mean = fitted_lengths(arm, train, console)
    t = fitted.train
    n = min(len(train), t.examples) if t.examples else len(train)
    per_step = t.batch_size * t.grad_accum
    steps = t.max_steps or math.ceil(n / per_step) * math.ceil(t.epochs)
    tokens = int(steps * per_step * mean)
    folder = Path(arm.model.folder)
    params = compute_params(folder)
    est = estimate_recipe(fitted)
    step_s = STEP_S + seconds(per_step * mean, params, 6, gflops, "train full" if t.adapter == "full" else "train lora")
    probe_s = 0.0
    if t.head != "generative" and head_init(fitted, head_pooling(fitted)) == "probe":
        probe_s = PROBE_S + seconds(min(n, t.probe_examples or n) * mean, params, 2, gflops, "forward")
    fixed_s = LOAD_S + ARM_S + TOKENIZE_S * (n + val_n)
    if t.head == "generative" and val_n:
        evaluations = steps // t.eval_steps if t.eval_steps else max(1, math.ceil(steps * per_step / max(1, n)))
        fixed_s += evaluations * seconds(val_n * mean, params, 2, gflops, "forward")
    eval_s = contender_seconds(arm, params, prompt_tokens, scored, gflops)
    return ArmPlan(name, n, steps, per_step, tokens, est.total / 2**20, est.fits, step_s, fixed_s, probe_s, eval_s)


def contender_seconds(recipe: Recipe, params: int, prompt_tokens: float, n: int, gflops: float) -> float:
    """Scoring ``n`` examples with one model: a head reads each prompt once; a language model scores the labels
    after it (classification) and/or writes its answer (a token at a time)."""
    if n == 0:
        return 0.0
    if recipe.train.head != "generative":
        return LOAD_S + seconds(n * prompt_tokens, params, 2, gflops, "forward")
    ev = recipe.eval
    scores = recipe.data.task == "classification" and ev.label_scoring
    out = LOAD_S + (seconds(n * (prompt_tokens + 8), params, 2, gflops, "score") if scores else 0.0)
    if ev.free_generation or not scores:
        out += seconds(n * (prompt_tokens + DECODE_COST * ev.max_new_tokens), params, 2, gflops, "score")
    return out


def fitted_lengths(arm: Recipe, train: list, console) -> tuple[Recipe, float]:
    """The arm with ``max_seq_length: auto`` decided on (a sample of) the train split, and its mean example length
    in tokens as its trainer sees them."""
    from rich.console import Console

    from tunesmith.models.loading import load_tokenizer
    from tunesmith.runs.fitting import fit_to_data, token_length

    sample = train[:: max(1, len(train) // SAMPLE)]
    fitted = arm
    if arm.train.max_seq_length == "auto":
        fitted, _, _, _ = fit_to_data(arm.with_train(long_inputs="set_aside"), sample, [], Console(quiet=True))
    tokenizer = load_tokenizer(arm.model.name)
    lengths = [min(token_length(fitted, tokenizer, e), fitted.train.max_seq_length) for e in sample]
    return fitted, sum(lengths) / max(1, len(lengths))


def prompt_length(recipe: Recipe, test: list, labels: list[str] | None = None) -> float:
    """The mean length in tokens of the prompts the model is asked on (a sample of the test split): a language
    model's chat prompt, with the label list where the base model is asked with it; an encoder's rendered prompt."""
    from tunesmith.data.formats.messages import chat_messages, prompt_text, render_prompt
    from tunesmith.models.encoders import is_encoder
    from tunesmith.models.loading import load_tokenizer

    tokenizer = load_tokenizer(recipe.model.name)
    sample = test[:: max(1, len(test) // SAMPLE)]
    if is_encoder(recipe.model.name):
        texts = [render_prompt(e, recipe.data.prompt) for e in sample]
    else:
        texts = [prompt_text(tokenizer, chat_messages(e, recipe.data, labels)) for e in sample]
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    return sum(lengths) / max(1, len(lengths))


def plan_run(recipe: Recipe, console) -> Plan:
    """The plan of ``recipe`` on this machine now (the data stage runs first, or is read from its cache)."""
    from tunesmith.eval.runner import arm_name, arm_recipes
    from tunesmith.machine.placement import pick_placement
    from tunesmith.models.encoders import is_encoder
    from tunesmith.runs.data import prepare_data_once

    data = prepare_data_once(recipe, recipe.run_dir / "data", console)
    device = pick_placement(recipe.model.precision, recipe.model.device).device
    gflops, how = machine_speed(device)
    cap = recipe.eval.max_examples or 10**9
    test_n, val_n = min(len(data.splits["test"]), cap), min(len(data.splits["val"]), cap)
    prompt = prompt_length(recipe, data.splits["test"])
    arms = [plan_arm(a, arm_name(recipe, a), data.splits["train"], len(data.splits["val"]), prompt, test_n, gflops,
                     console) for a in arm_recipes(recipe)]
    plan = Plan(arms, gflops, how, process_seconds())
    if not is_encoder(recipe.model.name):
        asked = prompt_length(recipe, data.splits["test"], data.labels) if recipe.eval.base_prompt_with_labels \
            and data.labels else prompt
        plan.base_s = contender_seconds(recipe, compute_params(Path(recipe.model.folder)), asked, test_n, gflops)
    if len(arms) > 1 and recipe.eval.recommend and val_n:
        plan.recommend_s = sum(a.eval_s * val_n / max(1, test_n) for a in arms)
    return plan


def render_plan(recipe: Recipe, plan: Plan) -> str:
    """The plan as a table a person can read: one line per arm, the evaluation, what ran so far, the total."""
    lines = [f"Time and memory to expect for {recipe.name} (a plan, good to about 1.5x):",
             f"  this machine: {plan.gflops:,.0f} GFLOP/s fp32, {plan.how}",
             f"  {'arm':<14} {'examples':>8} {'steps':>6} {'tokens':>9} {'memory':>9} {'probe':>6} {'train':>7} "
             f"{'scoring':>7}"]
    for a in plan.arms:
        fits = "" if a.fits is not False else "  does NOT fit"
        probe = minutes(a.probe_s) if a.probe_s else "–"
        lines.append(f"  {a.name[:14]:<14} {a.examples:>8,} {a.steps:>6,} {a.tokens:>9,} {a.memory_mb:>6,.0f} MB "
                     f"{probe:>6} {minutes(a.train_s):>7} {minutes(a.eval_s):>7}{fits}")
    parts = [f"base model {minutes(plan.base_s)}"] if plan.base_s else []
    if plan.recommend_s:
        parts.append(f"arms on the validation split {minutes(plan.recommend_s)}")
    parts += [f"baselines {minutes(plan.baselines_s)}", f"report {minutes(plan.report_s)}"]
    lines.append(f"  {'evaluation':<14} {', '.join(parts)}: {minutes(plan.evaluation_s)}")
    lines.append(f"  {'so far':<14} start-up and data: {minutes(plan.so_far_s)}")
    lines.append(f"  {'total':<14} about {minutes(plan.total_s)}")
    return "\n".join(lines + [f"  {n}" for n in plan.notes])


def minutes(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds < 90 else f"{seconds / 60:,.1f} min"


def estimate_text(recipe: Recipe, console) -> str:
    """What ``tunesmith train --estimate`` and the start of ``tunesmith run`` print."""
    return render_plan(recipe, plan_run(recipe, console))
