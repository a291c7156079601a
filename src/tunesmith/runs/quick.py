"""``tunesmith run --quick``: a first verdict in about :data:`QUICK_TOTAL_S` seconds on any data, a laptop CPU
included. Every input is cut to a few tokens (the same cut for every contender), the label-scored evaluation runs
on a stratified sample without free generation or the validation scoring, only the baselines that need no model
run, a head's linear probe reads a sample, and each arm trains the steps its share of the time buys at this
machine's measured speed (:mod:`tunesmith.runs.plan`), on as many examples as those steps read. What it cut is said.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager

from tunesmith.config import Recipe

QUICK_TOTAL_S = 240  # the plan a quick run aims at, start-up to report (the first verdict must come in 5 minutes)
QUICK_EXAMPLES = 80  # test examples scored, a seeded sample stratified by label
QUICK_INPUT_TOKENS = 128  # the input fields of an example together, cut to about this many tokens
QUICK_FIELD_TOKENS = 32  # ...but each field keeps at least this many
QUICK_PROBE_EXAMPLES = 256  # training rows a head's linear probe is fitted on
QUICK_STEPS = (4, 40)  # the fewest and the most optimizer steps an arm takes
QUICK_HEAD_BATCH = 16  # a head's batch (an encoder at 128 tokens: little memory; its steps cost mostly their overhead)


@contextmanager
def quick_threads(recipe: Recipe):
    """On a CPU that other work keeps busy, the torch threads that are free, for the run's length (then as before);
    yields what it cut (nothing on an idle machine or a GPU). PyTorch's threads wait on each other at every
    operation, so two threads on two cores where other jobs hold one run a training step many times slower than one
    thread does (measured on 2 cores at a load average of 9: 12 to 18 s a step against 1 s, docs/experiments.md)."""
    import os

    import torch

    from tunesmith.machine.placement import pick_placement

    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, min(threads, round(threads - load)))
    if free >= threads or pick_placement(recipe.model.precision, recipe.model.device).device != "cpu":
        yield []
        return
    torch.set_num_threads(free)
    try:
        yield [f"{free} of {threads} CPU threads: the load average is {load:.1f} (other work on this machine), and "
               "threads that wait on each other would cost more than they add"]
    finally:
        torch.set_num_threads(threads)


def quick_overrides(recipe: Recipe) -> tuple[list[str], list[str]]:
    """``(--set overrides, what each one cuts)`` that do not depend on the data's lengths or the machine's speed;
    :func:`quick_steps` adds the steps once the data is prepared. The user's own ``--set`` values go after these
    and win."""
    from tunesmith.config.kinds import kind_class

    sets, cut = [], []
    if recipe.data is not None and recipe.data.task != "qa" and recipe.data.input_fields:
        fields = recipe.data.input_fields
        each = max(QUICK_FIELD_TOKENS, QUICK_INPUT_TOKENS // len(fields))
        step = {"step": "token_length", "fields": list(fields), "max": each, "truncate": True}
        steps = [s.model_dump(mode="json", exclude_defaults=False) for s in recipe.data.steps]
        sets.append("data.steps=" + json.dumps([*steps, step]))
        cut.append(f"every input field cut to its first {each} tokens ({', '.join(fields)}; every contender, the "
                   "baselines too, reads the same cut text)")
    if recipe.eval.max_examples is None or recipe.eval.max_examples > QUICK_EXAMPLES:
        sets.append(f"eval.max_examples={QUICK_EXAMPLES}")
        cut.append(f"{QUICK_EXAMPLES} test examples are scored (a seeded sample, stratified by label where there are "
                   "labels)")
    if recipe.data is not None and recipe.data.task == "classification" and recipe.eval.label_scoring:
        sets.append("eval.free_generation=false")
        cut.append("language models are scored by label log-likelihood only (no free generation)")
    split = recipe.data.split if recipe.data is not None else None
    if split is not None and split.val and (recipe.data.splits is None or recipe.data.splits.val is None):
        sets.append("data.split.val=0")
        if split.train <= 1 and split.test <= 1 and recipe.data.splits is None:
            sets.append(f"data.split.train={round(1 - split.test, 6)}")
        cut.append("no validation split (the validation loss while training and the arm recommended on it are a full "
                   "run's)")
    elif len(recipe.arms) > 1:
        sets.append("eval.recommend=false")
        cut.append("no arm is scored on the validation split to be recommended")
    cheap = [b.name for b in kind_class(recipe.data.task).baselines() if b.needs is None and b.name != "random"] \
        if recipe.data is not None else []
    if cheap and recipe.eval.baselines != cheap:
        sets.append(f"eval.baselines=[{', '.join(cheap)}]")
        cut.append(f"baselines: {', '.join(cheap)} (none that loads an embedding model)")
    for prefix, arm in arm_prefixes(recipe):
        sets.append(f"{prefix}.grad_accum=1")
        if arm.train.head != "generative":  # a head's step costs little besides its fixed cost: fuller batches
            sets += [f"{prefix}.probe_examples={QUICK_PROBE_EXAMPLES}", f"{prefix}.batch_size={QUICK_HEAD_BATCH}"]
    cut.append(f"each arm steps without gradient accumulation (a head in batches of {QUICK_HEAD_BATCH}); a head's "
               f"linear probe reads {QUICK_PROBE_EXAMPLES} training rows")
    return sets, cut


def arm_prefixes(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """``(the --set prefix of each arm's train section, the arm's recipe)``: ``train`` without arms."""
    from tunesmith.eval.runner import arm_recipes

    if not recipe.arms:
        return [("train", recipe)]
    return [(f"arms.{spec.name}.train", arm) for spec, arm in zip(recipe.arms, arm_recipes(recipe), strict=True)]


def quick_steps(recipe: Recipe, console):
    """``(--set overrides, what they cut, the plan with those steps)``: each arm's steps and examples from an equal
    share of the time left in :data:`QUICK_TOTAL_S` once everything else in the plan is counted (start-up, data,
    model loads, probes, scoring, baselines, report), at this machine's speed now; :data:`QUICK_STEPS` bounds
    them."""
    from tunesmith.runs.plan import TOKENIZE_S, plan_run, process_seconds

    plan = plan_run(recipe, console)
    others = plan.total_s - sum(a.steps * a.step_s for a in plan.arms)
    share = max(0.0, QUICK_TOTAL_S - others) / max(1, len(plan.arms))
    sets, said = [], []
    for (prefix, _), a in zip(arm_prefixes(recipe), plan.arms, strict=True):
        steps = min(QUICK_STEPS[1], max(QUICK_STEPS[0], math.floor(share / a.step_s)))
        examples = min(a.examples, steps * a.per_step)
        steps = min(steps, math.ceil(examples / a.per_step))
        sets += [f"{prefix}.max_steps={steps}", f"{prefix}.examples={examples}"]
        said.append(f"{a.name} {steps} steps on {examples:,} examples")
        a.tokens = round(a.tokens / max(1, a.steps) * steps)
        a.fixed_s -= TOKENIZE_S * (a.examples - examples)  # fewer examples to measure and cut
        a.steps, a.examples = steps, examples
    plan.so_far_s = process_seconds()
    cut = [f"each arm trains what {share:,.0f} s buy at {plan.gflops:,.0f} GFLOP/s ({'; '.join(said)}), not its "
           "epochs"]
    return sets, cut, plan
