"""Train/val/test split by a seeded hash of each example's content, optionally stratified or grouped.

The split works on arrays of keys (``SplitKeys``: content hashes, label and group codes), so the in-memory path,
the streaming data stage and the Ray engine's split task cut the same rows the same way; an example's split does
not depend on its position, the batch size or the engine.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

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
    """Cut test, val and train (in that order) from one ordering of the examples by a hash of each one's content
    with ``seed``, so that an example's split depends on what it says, not on where or how it was read.

    With ``stratify``, examples of each label are spread evenly through the ordering, so every contiguous slice
    keeps the label proportions; with ``group_field``, whole groups go to one split. Examples beyond the requested
    sizes are returned under ``"unused"``; each split keeps the input's order."""
    keys = keys or example_keys(cfg)
    codes = split_codes(item_split_keys(examples, cfg, seed, keys), cfg, seed)
    return {name: [e for e, c in zip(examples, codes.tolist(), strict=True) if c == k] for k, name in enumerate(SPLITS)}


SPLITS = ("train", "val", "test", "unused")  # an item's split code is its place here


def content_key(inputs: dict, target) -> str:
    """The text an example's split hash is taken over: its inputs and target as JSON."""
    return json.dumps([inputs, target], ensure_ascii=False, default=str)


def content_hash(text: str, seed: int) -> int:
    """A 64-bit hash of ``text`` keyed with ``seed``: the same on every engine, batch size and run."""
    key = str(seed).encode()
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=key).digest(),
                          "little")


@dataclass
class SplitKeys:
    """What the split reads of every item, in read order: a hash of its content with the seed, and its label and
    group as small codes with their values (``None`` where the split does not use them); ``where`` names an item
    in an error."""

    hashes: np.ndarray
    labels: np.ndarray | None = None
    label_values: list | None = None
    groups: np.ndarray | None = None
    group_values: list | None = None
    where: Callable[[int], object] = str


def item_split_keys(items: list, cfg: SplitSection, seed: int, keys: ItemKeys) -> SplitKeys:
    """``SplitKeys`` of in-memory examples."""
    hashes = np.array([content_hash(content_key(e.inputs, e.target), seed) for e in items], dtype=np.uint64)
    labels = _codes([keys.label(e) for e in items]) if cfg.stratify or cfg.stratify_field else (None, None)
    groups = _codes([keys.group(e) for e in items]) if cfg.group_field else (None, None)
    return SplitKeys(hashes, *labels, *groups, where=lambda i: keys.where(items[i]))


def _codes(values: list) -> tuple[np.ndarray, list]:
    of: dict = {}
    codes = np.array([of.setdefault(v, len(of)) for v in values], dtype=np.int64)
    return codes, list(of)


def split_codes(keys: SplitKeys, cfg: SplitSection, seed: int) -> np.ndarray:
    """Each item's split as its index in ``SPLITS`` (uint8), from the arrays alone."""
    n = len(keys.hashes)
    if cfg.group_field:
        return _group_codes(keys, cfg, seed)
    stratify = cfg.stratify or cfg.stratify_field
    order = hash_order(keys.hashes, keys.labels if stratify else None, keys.label_values, seed)
    return _cut(order, split_sizes(n, cfg), n)


def _cut(order: np.ndarray, sizes: tuple[int, int, int], n: int) -> np.ndarray:
    n_train, n_val, n_test = sizes
    codes = np.full(n, SPLITS.index("unused"), dtype=np.uint8)
    codes[order[:n_test]] = SPLITS.index("test")
    codes[order[n_test : n_test + n_val]] = SPLITS.index("val")
    codes[order[n_test + n_val : n_test + n_val + n_train]] = SPLITS.index("train")
    return codes


def hash_order(hashes: np.ndarray, labels: np.ndarray | None, label_values: list | None, seed: int) -> np.ndarray:
    """Items ordered by hash; with labels, each label's items (in hash order) spread evenly through the ordering
    from a seeded offset per label, so that every contiguous slice keeps the label proportions."""
    if labels is None:
        return np.argsort(hashes, kind="stable")  # ties in read order, without an index array beside it
    idx = np.arange(len(hashes))
    by = np.lexsort((idx, hashes, labels))
    lab = labels[by]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]) if len(lab) else np.empty(0, np.int64)
    counts = np.diff(np.r_[starts, len(lab)])
    rank = np.arange(len(lab)) - np.repeat(starts, counts)
    offset = np.array([content_hash(f"label {label_values[c]}", seed) / 2.0**64 for c in lab[starts].tolist()])
    key = (rank + np.repeat(offset, counts)) / np.repeat(counts, counts)
    return by[np.lexsort((by, hashes[by], key))]


def _group_codes(keys: SplitKeys, cfg: SplitSection, seed: int) -> np.ndarray:
    """Whole groups (e.g. one movie or article) go to one split, in the order of a hash of the group's value;
    sizes are met at group granularity."""
    groups, values = keys.groups, keys.group_values
    if None in values:
        first = int(np.flatnonzero(groups == values.index(None))[0])
        raise DataError(f"{keys.where(first)}: no value for data.split.group_field '{cfg.group_field}'")
    unit_hash = np.array([content_hash(f"group {v}", seed) for v in values], dtype=np.uint64)
    majority = _majority(groups, keys.labels, len(values)) if cfg.stratify or cfg.stratify_field else None
    order = hash_order(unit_hash, majority, keys.label_values, seed).tolist()
    size = np.bincount(groups, minlength=len(values)).tolist()
    n_train, n_val, n_test = split_sizes(len(groups), cfg)
    targets, filled, t = [n_test, n_val, n_train], [0, 0, 0], 0
    unit_code = np.full(len(values), SPLITS.index("unused"), dtype=np.uint8)
    for u in order:
        while t < 3 and filled[t] >= targets[t]:
            t += 1
        if t < 3:
            unit_code[u] = SPLITS.index(("test", "val", "train")[t])
            filled[t] += size[u]
    if not filled[2]:
        raise DataError(f"grouping by '{cfg.group_field}' left no training examples ({len(values)} groups)")
    return unit_code[groups]


def _majority(groups: np.ndarray, labels: np.ndarray, n_groups: int) -> np.ndarray:
    """Each group's most common label (of equals, the one seen first)."""
    n_labels = int(labels.max()) + 1 if len(labels) else 1
    pair = groups * n_labels + labels
    uniq, first, count = np.unique(pair, return_index=True, return_counts=True)
    order = np.lexsort((first, -count, uniq // n_labels))
    g = (uniq // n_labels)[order]
    lead = np.r_[True, g[1:] != g[:-1]]
    out = np.zeros(n_groups, dtype=np.int64)
    out[g[lead]] = (uniq % n_labels)[order][lead]
    return out


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
