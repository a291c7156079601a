"""Settings fitted to the data: ``train.max_seq_length: auto`` and long inputs cut instead of examples dropped.

``auto`` is the 99th percentile of the training examples' token lengths as the arm's trainer sees them (the
chat text with its answer for generative training, the prompt text for a head), rounded up to a multiple of 8
and capped by the model's context; the few longer examples get their longest input field cut until they fit
(``train.long_inputs: cut``, the default), so no example is dropped because of its length. A span head reads
long contexts in overlapping windows and is never cut. Every choice comes with its reason, which the run
prints, writes into the arm's ``config.resolved.yaml`` (``_chosen``) and shows in the report's training table.
"""

from __future__ import annotations

import math
from dataclasses import replace

from tunesmith.config import UNMEASURED_LENGTH, Recipe
from tunesmith.records import Example

PERCENTILE = 99
SPAN_DEFAULT = 384  # a span head's window when the data asks for more: longer contexts are read in windows
CUT_ROUNDS = 4  # a cut is re-measured; the field is cut again (by the new excess) at most this many times


def token_length(recipe: Recipe, tokenizer, example: Example) -> int:
    """Tokens the arm's trainer sees for ``example``: the full chat (system, prompt, answer) for generative
    training, the rendered prompt for a head (its label is not in the text)."""
    from tunesmith.records import render_prompt

    if recipe.train.head == "generative":  # measured as training sets aside what does not fit (train/sft.py)
        from tunesmith.data.formats.chat_rows import row_tokens
        from tunesmith.data.formats.messages import chat_messages

        row = {"prompt": chat_messages(example, recipe.data),
               "completion": [{"role": "assistant", "content": str(example.target)}]}
        return row_tokens(row, tokenizer)
    return len(tokenizer(render_prompt(example, recipe.data.prompt))["input_ids"])


def model_context(name: str, tokenizer) -> int | None:
    """The longest input the model takes: its config's position embeddings, else the tokenizer's limit."""
    import json
    from pathlib import Path

    from tunesmith.models.names import resolve

    try:
        cfg = json.loads((Path(resolve(name)) / "config.json").read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - a hub id or an unreadable folder: the tokenizer's limit then
        cfg = {}
    cfg = cfg.get("text_config", cfg)
    limits = [cfg.get("max_position_embeddings"), getattr(tokenizer, "model_max_length", None)]
    limits = [int(v) for v in limits if isinstance(v, int | float) and 0 < v < 1e9]
    if cfg.get("model_type") in ("bert", "xlm-roberta", "roberta") and limits:  # two positions are special
        limits = [min(limits) - 2 if min(limits) == cfg.get("max_position_embeddings") else min(limits)]
    return min(limits) if limits else None


def auto_length(lengths: list[int], cap: int | None, head: str) -> tuple[int, str]:
    """``(max_seq_length, why)``: the 99th percentile of ``lengths`` rounded up to a multiple of 8, capped."""
    if not lengths:
        return min(UNMEASURED_LENGTH, cap or UNMEASURED_LENGTH), f"no training examples to measure; {UNMEASURED_LENGTH}"
    ordered = sorted(lengths)
    p = ordered[min(len(ordered) - 1, math.ceil(PERCENTILE / 100 * len(ordered)) - 1)]
    value = max(16, 8 * math.ceil(p / 8))
    why = (f"the {PERCENTILE}th percentile of {len(lengths):,} training examples' token lengths is {p} "
           f"(longest {ordered[-1]}, median {ordered[len(ordered) // 2]}); rounded up to {value}")
    if head == "span":  # windows over the context: their width, not the data's lengths, decides
        value, why = SPAN_DEFAULT, (f"a span head reads each context in overlapping windows (train.span_stride "
                                    f"tokens shared); {SPAN_DEFAULT} tokens a window")
    if cap is not None and value > cap:
        value, why = cap, why + f"; capped at the model's context, {cap}"
    return value, why


def cut_example(recipe: Recipe, tokenizer, example: Example, limit: int, length: int) -> tuple[Example, int]:
    """``example`` with its longest input field cut (in tokens) until the whole fits ``limit``; ``(example, new
    length)``. An example whose answer alone does not fit stays too long (training then sets it aside, saying so)."""
    for _ in range(CUT_ROUNDS):
        if length <= limit:
            break
        field = max(example.inputs, key=lambda f: len(str(example.inputs[f])))
        ids = tokenizer(str(example.inputs[field]), add_special_tokens=False)["input_ids"]
        keep = len(ids) - (length - limit) - 1
        if keep <= 0 or not ids:
            break
        cut = tokenizer.decode(ids[:keep], skip_special_tokens=True)
        example = replace(example, inputs={**example.inputs, field: cut})
        length = token_length(recipe, tokenizer, example)
    return example, length


def fit_to_data(recipe: Recipe, train: list[Example], val: list[Example], console) -> tuple[Recipe, list, list, dict]:
    """The recipe with ``max_seq_length: auto`` resolved, and the train and validation examples with long inputs
    cut (``train.long_inputs: cut``); returns ``(recipe, train, val, chosen)`` where ``chosen`` maps each decided
    setting to its value and reason (empty when nothing was decided)."""
    t = recipe.train
    needs_length = t.max_seq_length == "auto"
    cuts = t.long_inputs == "cut" and t.head != "span" and t.method == "sft" and recipe.data is not None
    if recipe.data is None or not train or not (needs_length or cuts):
        if needs_length:
            recipe = recipe.with_train(max_seq_length=UNMEASURED_LENGTH)
            return recipe, train, val, {"train.max_seq_length": f"{UNMEASURED_LENGTH} (no training examples to measure)"}
        return recipe, train, val, {}
    from tunesmith.models.loading import load_tokenizer

    tokenizer = load_tokenizer(recipe.model.name)
    lengths = [token_length(recipe, tokenizer, e) for e in train]
    chosen = {}
    if needs_length:
        value, why = auto_length(lengths, model_context(recipe.model.name, tokenizer), t.head)
        recipe = recipe.with_train(max_seq_length=value)
        chosen["train.max_seq_length"] = f"{value} ({why})"
        console.print(f"train.max_seq_length: auto → {value}: {why}")
    if not cuts:
        return recipe, train, val, chosen
    limit = recipe.train.max_seq_length
    train, n_train = _cut_all(recipe, tokenizer, train, lengths, limit)
    val, n_val = _cut_all(recipe, tokenizer, val, None, limit)
    if n_train or n_val:
        chosen["train.long_inputs"] = (f"cut: {n_train:,} training and {n_val:,} validation example(s) longer than "
                                       f"{limit} tokens had their longest input cut to fit (none dropped)")
        console.print(f"train.long_inputs: {chosen['train.long_inputs']}")
    return recipe, train, val, chosen


def _cut_all(recipe: Recipe, tokenizer, examples: list[Example], lengths: list[int] | None, limit: int):
    lengths = lengths or [token_length(recipe, tokenizer, e) for e in examples]
    out, n = [], 0
    for e, length in zip(examples, lengths, strict=True):
        if length > limit:
            e, _ = cut_example(recipe, tokenizer, e, limit, length)
            n += 1
        out.append(e)
    return out, n


def fitted_estimate(recipe: Recipe, console):
    """``tunesmith train --estimate``: the memory estimate, after ``max_seq_length: auto`` is decided from the
    prepared train split (prepared, or read from the data cache, as training would)."""
    from tunesmith.machine.estimate import estimate_recipe

    if recipe.train.max_seq_length == "auto":
        from tunesmith.data.prepare import prepare

        data = prepare(recipe, recipe.run_dir / "data", console)
        recipe, _, _, _ = fit_to_data(recipe.with_train(long_inputs="set_aside"), data.splits["train"], [], console)
    return estimate_recipe(recipe)
