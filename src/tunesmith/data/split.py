"""Seeded, optionally stratified train/val/test split."""

from __future__ import annotations

import random
from collections import defaultdict

from tunesmith.config import SplitSection
from tunesmith.errors import DataError
from tunesmith.records import Example


def split_sizes(n: int, cfg: SplitSection) -> tuple[int, int, int]:
    """Counts for (train, val, test): sizes all <= 1 are fractions of ``n``, otherwise counts."""
    if all(p <= 1 for p in (cfg.train, cfg.val, cfg.test)):
        val, test = round(n * cfg.val), round(n * cfg.test)
        train = min(round(n * cfg.train), n - val - test)
    else:
        train, val, test = int(cfg.train), int(cfg.val), int(cfg.test)
    if train + val + test > n:
        raise DataError(f"the split asks for {train}+{val}+{test} examples but only {n} are available")
    if train < 1:
        raise DataError(f"the split leaves no training examples out of {n}")
    return train, val, test


def split_examples(examples: list[Example], cfg: SplitSection, seed: int) -> dict[str, list[Example]]:
    """Shuffle with ``seed`` and cut test, val, train (in that order) from one ordering.

    With ``stratify``, examples of each label are spread evenly through the ordering, so every
    contiguous slice keeps the label proportions. Examples beyond the requested sizes are
    returned under ``"unused"`` so that the caller can count them.
    """
    rng = random.Random(seed)
    order = list(examples)
    rng.shuffle(order)
    if cfg.stratify:
        by_label: dict[str, list[Example]] = defaultdict(list)
        for ex in order:
            by_label[ex.target].append(ex)
        keyed = []
        for items in by_label.values():
            offset = rng.random()
            keyed += [((i + offset) / len(items), rng.random(), ex) for i, ex in enumerate(items)]
        order = [ex for _, _, ex in sorted(keyed, key=lambda t: (t[0], t[1]))]
    n_train, n_val, n_test = split_sizes(len(order), cfg)
    test = order[:n_test]
    val = order[n_test : n_test + n_val]
    train = order[n_test + n_val : n_test + n_val + n_train]
    unused = order[n_test + n_val + n_train :]
    return {"train": train, "val": val, "test": test, "unused": unused}
