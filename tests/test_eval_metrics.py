"""Classification extras, ordinal and regression metrics, hit bands, bootstrap, chrF/ROUGE-L, baselines."""

import math

import numpy as np
import pytest

from tunesmith.config import BandsSection
from tunesmith.records import parse_number
from tunesmith.scoring import baselines
from tunesmith.scoring.bootstrap import diff_ci, mean_ci
from tunesmith.scoring.metrics import band, is_ordinal, ordinal_metrics, per_class, regression_metrics
from tunesmith.scoring.textsim import chrf, rouge_l


def test_per_class_precision_recall_counts_unparseable_as_miss():
    pc = per_class(["a", "a", "b", "b"], ["a", None, "a", "b"], ["a", "b"])
    assert pc["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert pc["b"]["precision"] == 1.0 and pc["b"]["recall"] == 0.5


def test_ordinal_mae_and_within_one():
    assert is_ordinal(["1", "2", "3", "4", "5"]) and not is_ordinal(["pos", "neg", "x"])
    m = ordinal_metrics(["1", "5", "3", "2"], ["2", "2", "3", None])
    assert m["ordinal_mae"] == pytest.approx((1 + 3 + 0) / 3)  # over the 3 parseable answers
    assert m["within_one"] == pytest.approx(2 / 4)  # unparseable is not within one


def test_parse_number_is_strict_about_missing_numbers():
    assert parse_number("₹1,299.00") == 1299.0
    assert parse_number("About 450 rupees, maybe 500") == 450.0
    assert parse_number("It is priced at .5") == 0.5
    assert parse_number("expensive") is None and parse_number("") is None and parse_number(None) is None


def test_bands_defaults_and_configurable():
    b = BandsSection()
    assert band(130, 100, b) == "green"  # error 30 < 40
    assert band(1100, 1000, b) == "green"  # error 100 but 10% < 20%
    assert band(1300, 1000, b) == "orange"  # 300 and 30%
    assert band(1500, 1000, b) == "red"  # 500 and 50%
    assert band(None, 10, b) == "red"
    tight = BandsSection(green_abs=1, green_rel=0.01, orange_abs=2, orange_rel=0.02)
    assert band(130, 100, tight) == "red"


def test_regression_metrics_by_hand_and_unparseable_counted():
    gold = [100.0, 200.0, 400.0, 1000.0]
    pred = [110.0, None, 300.0, 1000.0]
    m = regression_metrics(gold, pred, BandsSection())
    assert m["unparseable"] == 1 and m["n_scored"] == 3 and m["n"] == 4
    assert m["mae"] == pytest.approx((10 + 100 + 0) / 3)
    logs = [(math.log1p(110) - math.log1p(100)) ** 2, (math.log1p(300) - math.log1p(400)) ** 2, 0]
    assert m["rmsle"] == pytest.approx(math.sqrt(sum(logs) / 3))
    g = np.array([100, 400, 1000.0])
    assert m["r2"] == pytest.approx(1 - (100 + 10000) / ((g - g.mean()) ** 2).sum())
    assert (m["hit_green"], m["hit_orange"], m["hit_red"]) == (0.5, 0.25, 0.25)


def test_bootstrap_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(1)
    x = rng.random(200) < 0.7
    ci = mean_ci(x.astype(float), 2000, seed=3)
    assert ci == mean_ci(x.astype(float), 2000, seed=3)
    assert ci[0] < x.mean() < ci[1] and 0.05 < ci[1] - ci[0] < 0.2
    assert mean_ci([1.0, None, 3.0], 500, 0)[0] >= 1.0  # NaN (no value) is left out of each resample


def test_paired_difference_interval_excludes_zero_only_for_a_real_gap():
    rng = np.random.default_rng(0)
    base = (rng.random(300) < 0.5).astype(float)
    better = np.where(rng.random(300) < 0.3, 1.0, base)  # flips some wrong answers to right
    lo, hi = diff_ci(better, base, 1000, seed=0)
    assert 0 < lo < hi
    lo, hi = diff_ci(base, base, 1000, seed=0)
    assert lo == hi == 0
    with pytest.raises(ValueError):
        diff_ci([1.0], [1.0, 0.0])


def test_chrf_and_rouge_l():
    assert chrf("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(100)
    assert 0 < chrf("the cat sat", ["the cat sat on the mat"]) < 100
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)
    assert rouge_l("서울 은 수도", "한국 의 수도 는 서울") == pytest.approx(
        100 * 2 * (1 / 3) * (1 / 5) / (1 / 3 + 1 / 5)
    )
    assert rouge_l("", "x") == 0


def test_regression_and_random_baselines():
    texts = ["usb cable"] * 10 + ["steel refrigerator 300 litre"] * 10
    values = [200.0] * 10 + [30000.0] * 10
    pred = baselines.tfidf_ridge(texts, values, ["usb cable", "refrigerator"])
    assert pred[0] < 1000 < 5000 < pred[1]
    assert baselines.mean_value(values, 2) == [15100.0, 15100.0]
    guess = baselines.random_guess(["1", "2", "3"], 50, seed=5)
    assert guess == baselines.random_guess(["1", "2", "3"], 50, seed=5) and set(guess) == {"1", "2", "3"}
