"""Seeded, optionally stratified train/val/test split."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ItemKeys:
    """How the split reads an item: its label (for stratifying), its group and where it came from."""

    label: Callable
    group: Callable
    where: Callable


def example_keys(cfg: SplitSection) -> ItemKeys:
    """Keys of an ``Example``: the stratify field or the target, the group field, the source."""
    label = (lambda ex: str(ex.meta.get(cfg.stratify_field))) if cfg.stratify_field else (lambda ex: ex.target)
    return ItemKeys(label, lambda ex: ex.meta.get(cfg.group_field), lambda ex: ex.meta.get("source", ex.id))


def split_examples(examples: list, cfg: SplitSection, seed: int, keys: ItemKeys | None = None) -> dict[str, list]:
    """Shuffle with ``seed`` and cut test, val, train (in that order) from one ordering.

    With ``stratify``, examples of each label are spread evenly through the ordering, so every
    contiguous slice keeps the label proportions. Examples beyond the requested sizes are
    returned under ``"unused"`` so that the caller can count them. ``keys`` reads other items than
    ``Example``s (the streaming data stage splits row positions); the order depends only on the keys.
    """
    rng = random.Random(seed)
    keys = keys or example_keys(cfg)
    if cfg.group_field:
        return _split_groups(examples, cfg, rng, keys)
    order = list(examples)
    rng.shuffle(order)
    if cfg.stratify or cfg.stratify_field:
        order = spread(order, keys.label, rng)
    n_train, n_val, n_test = split_sizes(len(order), cfg)
    test = order[:n_test]
    val = order[n_test : n_test + n_val]
    train = order[n_test + n_val : n_test + n_val + n_train]
    unused = order[n_test + n_val + n_train :]
    return {"train": train, "val": val, "test": test, "unused": unused}


def spread(items: list, key, rng: random.Random) -> list:
    """Spread each key's items evenly through the ordering so every slice keeps the proportions."""
    by_key: dict[str, list] = defaultdict(list)
    for it in items:
        by_key[key(it)].append(it)
    keyed = []
    for group in by_key.values():
        offset = rng.random()
        keyed += [((i + offset) / len(group), rng.random(), it) for i, it in enumerate(group)]
    return [it for _, _, it in sorted(keyed, key=lambda t: (t[0], t[1]))]


def sample_examples(examples: list[Example], n: int | None, stratify: bool, seed: int) -> tuple[list[Example], str]:
    """At most ``n`` examples and how they were chosen, e.g. '600 of 3,080, stratified by label, seed 42'.

    A seeded sample, never the first rows: files are often sorted (BANKING77's official test by intent, so
    its first 600 rows hold 15 of the 77 intents). Stratified by label where the task has a closed label set
    (each label keeps its share), random otherwise; the sample keeps the input's order. Used for
    ``eval.max_examples`` and ``train.examples``.
    """
    if not n or n >= len(examples):
        return examples, f"all {len(examples):,}"
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    if stratify:
        order = spread(order, lambda i: examples[i].target, rng)
    chosen = sorted(order[:n])
    how = "stratified by label" if stratify else "random"
    return [examples[i] for i in chosen], f"{n:,} of {len(examples):,}, {how}, seed {seed}"


def _split_groups(examples: list, cfg: SplitSection, rng: random.Random, keys: ItemKeys) -> dict[str, list]:
    """Whole groups (e.g. one movie or article) go to one split; sizes are met at group granularity."""
    groups: dict[str, list] = defaultdict(list)
    for ex in examples:
        g = keys.group(ex)
        if g is None:
            raise DataError(f"{keys.where(ex)}: no value for data.split.group_field '{cfg.group_field}'")
        groups[str(g)].append(ex)
    units = list(groups.values())
    rng.shuffle(units)
    if cfg.stratify or cfg.stratify_field:
        units = spread(units, lambda u: Counter(keys.label(e) for e in u).most_common(1)[0][0], rng)
    n_train, n_val, n_test = split_sizes(len(examples), cfg)
    out: dict[str, list] = {"test": [], "val": [], "train": [], "unused": []}
    targets = [("test", n_test), ("val", n_val), ("train", n_train)]
    t = 0
    for unit in units:
        while t < len(targets) and len(out[targets[t][0]]) >= targets[t][1]:
            t += 1
        out[targets[t][0] if t < len(targets) else "unused"] += unit
    if not out["train"]:
        raise DataError(f"grouping by '{cfg.group_field}' left no training examples ({len(units)} groups)")
    return out


def fold_splits(examples: list[Example], cfg: SplitSection, seed: int) -> list[dict[str, list[Example]]]:
    """``cfg.folds`` cross-validation splits: the examples cut into k folds (seeded; labels spread evenly with
    ``stratify``, whole groups with ``group_field``), and for fold i the split that tests on it: fold i as
    test, a ``cfg.val`` share of the other folds as val, the rest as train. Every example is in exactly one
    test split."""
    k = cfg.folds
    rng = random.Random(seed)
    key = (lambda ex: str(ex.meta.get(cfg.stratify_field))) if cfg.stratify_field else (lambda ex: ex.target)
    units = _units(examples, cfg, rng, key)
    if len(units) < k:
        what = f"groups of '{cfg.group_field}'" if cfg.group_field else "examples"
        raise DataError(f"data.split.folds {k} needs at least {k} {what}; there are {len(units)}")
    folds: list[list[list[Example]]] = [[] for _ in range(k)]
    sizes = [0] * k
    for n, unit in enumerate(units):  # contiguous slices of the spread order keep each label's share;
        i = min(range(k), key=lambda f: (sizes[f], f)) if cfg.group_field else n * k // len(units)  # a group
        folds[i].append(unit)  # goes to the smallest fold
        sizes[i] += len(unit)
    out = []
    for i in range(k):
        rest = [u for j in range(k) if j != i for u in folds[j]]
        rest = spread(rest, lambda u: Counter(key(e) for e in u).most_common(1)[0][0], rng)
        n_val, val, train = round(sum(map(len, rest)) * cfg.val), [], []
        for unit in rest:
            (val if len(val) < n_val else train).extend(unit)
        out.append({"train": train, "val": val, "test": [e for u in folds[i] for e in u], "unused": []})
    return out


def _units(examples: list[Example], cfg: SplitSection, rng: random.Random, key) -> list[list[Example]]:
    """What stays together: one example each, or each group of ``group_field``; shuffled, spread by label."""
    if cfg.group_field:
        groups: dict[str, list[Example]] = defaultdict(list)
        for ex in examples:
            g = ex.meta.get(cfg.group_field)
            if g is None:
                raise DataError(f"{ex.meta.get('source', ex.id)}: no value for data.split.group_field '{cfg.group_field}'")
            groups[str(g)].append(ex)
        units = list(groups.values())
    else:
        units = [[ex] for ex in examples]
    rng.shuffle(units)
    if cfg.stratify or cfg.stratify_field:
        units = spread(units, lambda u: Counter(key(e) for e in u).most_common(1)[0][0], rng)
    return units
