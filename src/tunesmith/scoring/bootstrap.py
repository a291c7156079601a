"""Seeded percentile bootstrap: 95% intervals for a mean-of-per-example metric and for the paired
difference between two contenders (same resampled examples for both, so shared difficulty cancels).

Per-example values are floats with NaN where a value does not exist (e.g. an unparseable price
has no error); each resample averages the values it has.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_array(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _resample_means(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    sample = x[idx]
    counts = (~np.isnan(sample)).sum(axis=1)
    sums = np.nansum(sample, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(stats: np.ndarray, level: float) -> list[float] | None:
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return None
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))]


def mean_ci(values: Sequence[float | None], resamples: int = 1000, seed: int = 0, level: float = 0.95):
    """Percentile interval of the mean of ``values`` under resampling of examples."""
    x = _as_array(values)
    if x.size == 0 or resamples <= 0:
        return None
    return _interval(_resample_means(x, _indices(x.size, resamples, seed)), level)


def diff_ci(
    a: Sequence[float | None],
    b: Sequence[float | None],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
):
    """Percentile interval of ``mean(a) - mean(b)`` over the same resampled examples."""
    xa, xb = _as_array(a), _as_array(b)
    if xa.size != xb.size:
        raise ValueError(f"paired bootstrap needs equal lengths, got {xa.size} and {xb.size}")
    if xa.size == 0 or resamples <= 0:
        return None
    idx = _indices(xa.size, resamples, seed)
    return _interval(_resample_means(xa, idx) - _resample_means(xb, idx), level)


def paired_difference(a, b, resamples: int, seed: int) -> tuple:
    """Mean of a − b over the examples both contenders (results with ``per_example``) have a value for,
    and its paired bootstrap 95% interval."""
    pairs = [(x, y) if x is not None and y is not None else (None, None)
             for x, y in zip(a.per_example, b.per_example, strict=True)]
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    both = [(x, y) for x, y in pairs if x is not None]
    mean = sum(x - y for x, y in both) / len(both) if both else None
    return mean, diff_ci(xs, ys, resamples, seed)
