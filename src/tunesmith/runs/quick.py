"""``tunesmith run --quick``: a first look in minutes on a laptop CPU: every arm trains a few steps, the
evaluation scores a stratified sample, and only the baselines that need no model run. What it cut is said."""

from __future__ import annotations

from tunesmith.config import Recipe

QUICK_STEPS = 16  # optimizer steps per arm
QUICK_EXAMPLES = 80  # test (and validation) examples scored, a seeded sample stratified by label


def quick_overrides(recipe: Recipe) -> tuple[list[str], list[str]]:
    """``(--set overrides, what each one cuts)`` for a quick run of ``recipe``; the user's own ``--set``
    values go after these and win."""
    from tunesmith.config.kinds import kind_class

    sets, cut = [], []
    if recipe.train.max_steps is None or recipe.train.max_steps > QUICK_STEPS:
        sets.append(f"train.max_steps={QUICK_STEPS}")
        cut.append(f"each arm trains {QUICK_STEPS} steps instead of its epochs")
    if recipe.eval.max_examples is None or recipe.eval.max_examples > QUICK_EXAMPLES:
        sets.append(f"eval.max_examples={QUICK_EXAMPLES}")
        cut.append(f"{QUICK_EXAMPLES} test and validation examples are scored (a seeded sample, stratified by label "
                   "where there are labels)")
    cheap = [b.name for b in kind_class(recipe.data.task).baselines() if b.needs is None and b.name != "random"]
    if cheap and recipe.eval.baselines != cheap:
        sets.append(f"eval.baselines=[{', '.join(cheap)}]")
        cut.append(f"baselines: {', '.join(cheap)} (none that loads an embedding model)")
    return sets, cut
